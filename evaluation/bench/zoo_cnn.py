"""Benchmark of the molecule-image CNNs (cnn1, cnn2) next to the default MLP on `sol-low`.

Each model goes the way a model owner and a user would take it: `train_checkpoint` with the
model's defaults (`molcloak train --model NAME`), `compile_checkpoint` with the default compile
settings, a real bundle (`deploy`), then the client half generates keys and every executed test
molecule is encrypted, run by the server half (evaluation keys only) and decrypted
(`predict.run_encrypted`). Recorded per model: test metrics (float / quantized / FHE-simulated /
FHE-executed), how many executed outputs equal the simulation bit for bit (and, for scale, how many
outputs of a second simulation run equal the first: Concrete simulates approximate rounding and
p_error with randomness, so neither count is an error rate of the encrypted run), server-side latency
(median, p90; one warm-up run first), key generation time, key and ciphertext sizes, PBS count,
maximum bit width, training and compile time, and the machine's load average (other jobs slow
everything down on a shared 2-core machine).

    python -m molcloak.evaluation.bench.zoo_cnn --out evaluation/results/zoo_cnn_sol_low.json

Results are written after each model; a rerun skips models already in the file (--force redoes them),
and with --ckpt-dir reuses the trained checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from molcloak.pipeline.bundle import Checkpoint, load_checkpoint, save_checkpoint
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.data import load_bundled
from molcloak.pipeline.fhe_client import PrivateClient
from molcloak.pipeline.fhe_server import PrivateServer
from molcloak.pipeline.metrics import fhe_equals_simulation, score, to_predictions
from molcloak.pipeline.predict import run_encrypted
from molcloak.pipeline.train import TrainConfig
from molcloak.pipeline.workflow import compile_checkpoint, deploy, train_checkpoint

TASK = "sol-low"


def trained(name: str, seed: int, ckpt_dir: Path | None) -> tuple[Checkpoint, float | None]:
    """`molcloak train --model NAME --seed S` (default options), kept in `ckpt_dir` for reruns."""
    path = ckpt_dir / f"{TASK}-{name}-seed{seed}" if ckpt_dir else None
    if path is not None and path.is_dir():
        return load_checkpoint(path), None
    t0 = time.perf_counter()
    ckpt = train_checkpoint(load_bundled(TASK), None, name, train_config=TrainConfig(seed=seed))
    if path is not None:
        save_checkpoint(ckpt, path)
    return ckpt, time.perf_counter() - t0


def _say(text: str) -> None:
    print(text, flush=True)


def bench_model(name: str, n_exec: int | None, seed: int = 0, ckpt_dir: Path | None = None, say=_say) -> dict:
    """Train, compile, deploy and run `name` encrypted on the first `n_exec` test molecules (None = all)."""
    ckpt, train_s = trained(name, seed, ckpt_dir)
    say(f"{name}: trained (best epoch {ckpt.train_info['best_epoch']}), compiling")
    compiled = compile_checkpoint(ckpt, CompileConfig())
    X = ckpt.X_test[: n_exec or len(ckpt.X_test)]
    simulated = compiled.q_module.forward(X, fhe="simulate")
    simulated_again = compiled.q_module.forward(
        X, fhe="simulate"
    )  # approximate rounding is simulated with randomness
    with tempfile.TemporaryDirectory(prefix="molcloak-zoo-") as tmp:
        deploy(ckpt, compiled, Path(tmp) / "bundle", f"{TASK}-{name}")
        client = PrivateClient(Path(tmp) / "bundle", Path(tmp) / "keys")
        server = PrivateServer(Path(tmp) / "bundle")
        keyinfo = client.keygen()
        keys = server.load_keys(client.evaluation_keys())
        run_encrypted(client, server, keys, X[0])  # warm-up: one-time setup is not latency
        outputs, runs, ct_in, ct_out = [], [], 0, 0
        for i, x in enumerate(X):
            raw, ct, out, seconds = run_encrypted(client, server, keys, x)
            outputs.append(raw[0])
            runs.append(seconds["run"])
            ct_in, ct_out = len(ct), len(out)
            if (i + 1) % 10 == 0:
                say(f"{name}: {i + 1}/{len(X)} encrypted, median run {statistics.median(runs):.2f} s")
    executed = np.asarray(outputs)
    y = ckpt.y_test[: len(X)]
    metrics = {k: compiled.metrics[k] for k in ("float", "quantized", "fhe_simulate")}
    metrics["fhe_execute"] = {
        "n_molecules": len(X),
        **score(ckpt.task, y, to_predictions(ckpt.task, executed, ckpt.scaler)),
    }
    runs_sorted = sorted(runs)
    return {
        "model": name,
        "features": str(ckpt.featurizer),
        "model_config": ckpt.model_config,
        "compile": compiled.config.to_dict(),
        "train_seconds": None if train_s is None else round(train_s, 1),  # None: loaded from --ckpt-dir
        "best_epoch": ckpt.train_info["best_epoch"],
        "epochs_run": ckpt.train_info["epochs_run"],
        "compile_seconds": round(compiled.seconds, 1),
        "metrics": metrics,
        "fhe_equals_simulation": int(fhe_equals_simulation(executed, simulated).sum()),
        "simulation_equals_simulation": int(fhe_equals_simulation(simulated_again, simulated).sum()),
        "latency": {
            "n_runs": len(runs),
            "median_s": statistics.median(runs),
            "p90_s": runs_sorted[int(np.ceil(0.9 * len(runs))) - 1],
            "min_s": runs_sorted[0],
            "max_s": runs_sorted[-1],
        },
        "keygen_s": keyinfo.seconds,
        "evaluation_key_bytes": keyinfo.evaluation_key_bytes,
        "input_ciphertext_bytes": ct_in,
        "output_ciphertext_bytes": ct_out,
        "circuit": compiled.stats.to_dict(),
        "load_average_1min_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn1", "cnn2"])
    parser.add_argument(
        "--n-exec", type=int, default=None, help="encrypted test molecules per model (default: all 257)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("evaluation/results/zoo_cnn_sol_low.json"))
    parser.add_argument("--force", action="store_true", help="redo models already in --out")
    parser.add_argument(
        "--ckpt-dir", type=Path, default=None, help="keep trained checkpoints here and reuse them"
    )
    args = parser.parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"task": TASK, "rows": {}}
    command = "python -m molcloak.evaluation.bench.zoo_cnn " + " ".join(argv or [])
    result.update({"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()})
    for name in args.models:
        if name in result["rows"] and not args.force:
            _say(f"{name}: already in {args.out}, skipped (--force to redo)")
            continue
        result["rows"][name] = {
            **bench_model(name, args.n_exec, args.seed, args.ckpt_dir),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        r = result["rows"][name]
        _say(
            f"{name}: AUC float {r['metrics']['float']['roc_auc']:.3f} / FHE-exec {r['metrics']['fhe_execute']['roc_auc']:.3f}, "
            f"median run {r['latency']['median_s']:.2f} s, {r['circuit']['pbs_count']} PBS, {r['circuit']['max_bit_width']} bits"
        )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
