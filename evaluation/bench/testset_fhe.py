"""Encrypted evaluation of a bundle on its own test split, for any task and input kind.

Every test row (or the first --n) goes through `predict.LocalBackend`: encrypted by the client
half with fresh keys, run by the server half (evaluation keys and ciphertexts only) and decrypted;
the decrypted outputs are scored like the float, quantized and simulated models the manifest reports. Needs the bundle's
owner/ part (the test split and, for the simulation, the weights).

    python -m molcloak.evaluation.bench.testset_fhe --bundle bundles/breast-cancer --out bc-fhe.json

Prints and writes JSON: metrics (float, quantized, fhe_simulate over the whole test split;
fhe_execute over the rows run), how many executed outputs equal the simulation bit for bit,
server-side run / encrypt / decrypt latency (median, p90), key generation time, evaluation-key and
ciphertext sizes, circuit statistics, the engine that served it (`PrivateServer.engine`: the linear fast path
or Concrete's runtime), the date when the run ends and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from molcloak.pipeline.bundle import load_checkpoint, load_manifest
from molcloak.pipeline.metrics import fhe_equals_simulation, score, to_predictions
from molcloak.pipeline.predict import LocalBackend, Simulator


def _quantiles(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9))} if values else {}


def evaluate(bundle: str | Path, n: int | None = None, on_row=None) -> dict:
    """Run the test split encrypted; `on_row(i, total)` reports progress."""
    manifest = load_manifest(bundle)
    ckpt = load_checkpoint(bundle)
    X, y = ckpt.X_test[:n], ckpt.y_test[:n]
    simulated = Simulator(bundle).compiled.q_module.forward(X, fhe="simulate")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as keys_dir, LocalBackend(bundle, keys_dir) as backend:
        engine = backend.server.engine  # linear fast path or Concrete runtime (`PrivateServer.engine`)
        keyinfo = backend.keygen(force=True)  # fresh keys; the server half gets the evaluation keys only
        runs = []
        for i in range(len(X)):  # one row at a time: per-row latency, and progress
            runs += backend.run_rows(X[i : i + 1])
            if on_row:
                on_row(i + 1, len(X))
    raws = np.asarray([r.raw[0] for r in runs])
    times = {k: [r.seconds[k] for r in runs] for k in ("encrypt", "run", "decrypt")}
    sizes = (len(runs[-1].ciphertext), len(runs[-1].output)) if runs else (0, 0)
    executed = score(ckpt.task, y, to_predictions(ckpt.task, raws, ckpt.scaler))
    return {
        "bundle": str(bundle),
        "name": manifest.name,
        "task": ckpt.task.to_dict(),
        "features": str(ckpt.featurizer),
        "model": {"name": ckpt.model_name, "config": ckpt.model_config},
        "n_test": len(ckpt.y_test),
        "n_executed": len(X),
        "metrics": {**manifest.metrics, "fhe_execute": executed},
        "fhe_equals_simulation": int(fhe_equals_simulation(raws, simulated).sum()),
        "seconds": {k: _quantiles(v) for k, v in times.items()},
        "keygen_seconds": keyinfo.seconds,
        "evaluation_key_bytes": keyinfo.evaluation_key_bytes,
        "input_ciphertext_bytes": sizes[0],
        "output_ciphertext_bytes": sizes[1],
        "circuit": manifest.circuit,
        "compile": manifest.data.get("compile"),
        "server_engine": engine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle directory with its owner/ part")
    parser.add_argument("--n", type=int, default=None, help="only the first N test rows (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )  # evaluation does not import cli
    with bar:
        t = bar.add_task("keygen, then encrypt -> FHE run -> decrypt per test row", total=None)
        result = evaluate(
            args.bundle, args.n, on_row=lambda i, total: bar.update(t, completed=i, total=total)
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
