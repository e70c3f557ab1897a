"""`molcloak demo`: the main job on the bundled sol-low task, end to end, with real FHE."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .bundle import save_checkpoint
from .compile import CompileConfig
from .data import load_bundled
from .fhe_client import PrivateClient
from .fhe_server import PrivateServer
from .metrics import fhe_equals_simulation, score, to_predictions
from .predict import run_encrypted
from .splits import balanced_sample
from .train import TrainConfig, predict_raw
from .workflow import compile_checkpoint, deploy, train_checkpoint

DEMO_TASK = "sol-low"


def run_demo(out_dir: Path, n: int, seed: int, progress, console) -> dict:
    out_dir = Path(out_dir)
    ds = load_bundled(DEMO_TASK)
    with progress() as bar:
        t = bar.add_task("1/4 training the QAT model", total=TrainConfig().epochs, status="")
        ckpt = train_checkpoint(
            ds, train_config=TrainConfig(seed=seed), on_epoch=lambda e, total, row: bar.update(t, completed=e)
        )
    save_checkpoint(ckpt, out_dir / "checkpoint", force=True)
    with console.status("2/4 compiling to a TFHE circuit and simulating the test split..."):
        compiled = compile_checkpoint(ckpt, CompileConfig())
        bundle = out_dir / "bundle"
        deploy(ckpt, compiled, bundle, DEMO_TASK, force=True)

    # The client half: fresh keys in a key directory of its own.
    shutil.rmtree(out_dir / "keys", ignore_errors=True)
    client = PrivateClient(bundle, out_dir / "keys")
    server = PrivateServer(bundle)  # loads server/server.zip only
    with console.status("3/4 generating keys..."):
        keyinfo = client.keygen()
        eval_keys = client.evaluation_keys()
        keys_on_server = server.load_keys(eval_keys)

    idx = balanced_sample(ckpt.y_test, n, seed)
    smiles = [ckpt.smiles_test[i] for i in idx]
    X = ckpt.X_test[idx]
    float_pred = to_predictions(ckpt.task, predict_raw(ckpt.build_model(), X), ckpt.scaler)
    sim_raw = compiled.q_module.forward(X, fhe="simulate")
    sim_pred = to_predictions(ckpt.task, sim_raw, ckpt.scaler)

    rows, fhe_preds = [], []
    with progress() as bar:
        t = bar.add_task("4/4 encrypt -> FHE run -> decrypt", total=len(idx), status="")
        for k, smi in enumerate(smiles):
            x = client.featurize([smi])[0]  # the client featurizes from the spec in the bundle
            raw, ct, ct_out, seconds = run_encrypted(client, server, keys_on_server, x)
            fhe_pred = client.predictions(raw)[0]
            fhe_preds.append(fhe_pred)
            rows.append(
                {
                    "smiles": smi,
                    "true": ckpt.task.labels[int(ckpt.y_test[idx[k]])],
                    "float": _value(float_pred[k]),
                    "simulated": _value(sim_pred[k]),
                    "fhe": _value(fhe_pred),
                    "fhe_equals_simulation": bool(fhe_equals_simulation(raw, sim_raw[k : k + 1])[0]),
                    "fhe_raw": raw[0].tolist(),
                    "simulated_raw": sim_raw[k].tolist(),
                    **{f"{k}_s": v for k, v in seconds.items()},
                    "input_ciphertext_bytes": len(ct),
                    "output_ciphertext_bytes": len(ct_out),
                }
            )
            bar.update(t, advance=1)
    executed = score(ckpt.task, ckpt.y_test[idx], np.asarray(fhe_preds))
    return {
        "bundle": str(bundle),
        "fhe_execute_metrics": {"n_molecules": len(idx), **executed},
        "task": ckpt.task.to_dict(),
        "n_test": len(ckpt.y_test),
        "features": str(ckpt.featurizer),
        "model": {"name": ckpt.model_name, "config": ckpt.model_config},
        "compile": compiled.config.to_dict(),
        "circuit": compiled.stats.to_dict(),
        "metrics": compiled.metrics,
        "keygen_s": keyinfo.seconds,
        "evaluation_key_bytes": len(eval_keys),
        "rows": rows,
    }


def _value(pred) -> list[float] | float:
    return [float(v) for v in pred] if np.ndim(pred) else float(pred)
