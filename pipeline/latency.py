"""Timing compiled circuits on this machine: a few encrypted runs of a circuit that has keys, or keygen and
runs through both halves of a temporary bundle (what `molcloak fit` measures its candidates with)."""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np

from .bundle import Checkpoint
from .workflow import Compiled, deploy

TIMED_RUNS = 3  # encrypted runs of a candidate's circuit (after one warm-up), median kept


def time_circuit(q_module, X: np.ndarray, runs: int = TIMED_RUNS) -> float | None:
    """Median seconds of `runs` encrypted runs of one row through a compiled circuit that has keys
    (after one warm-up run); None without rows."""
    if not len(X):
        return None
    circuit = q_module.fhe_circuit
    encrypted = circuit.encrypt(q_module.quantize_input(np.asarray(X[:1], dtype=np.float32)))
    circuit.run(encrypted)  # the first run pays one-time setup
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        circuit.run(encrypted)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_latency(ckpt: Checkpoint, compiled: Compiled, n_runs: int) -> dict:
    """Keygen and `n_runs` encrypted runs of test rows through both halves (a temporary bundle)."""
    from .predict import LocalBackend

    with tempfile.TemporaryDirectory(prefix="molcloak-fit-") as tmp:
        deploy(ckpt, compiled, f"{tmp}/bundle", "fit")
        backend = LocalBackend(f"{tmp}/bundle", key_dir=f"{tmp}/keys")
        info = backend.keygen()
        X = ckpt.X_test[: n_runs + 1]
        runs = backend.run_rows(X) if len(X) else []
        seconds = [r.seconds["run"] for r in runs[1:]]  # the first run pays one-time setup
        backend.close()
    return {
        "keygen_s": info.seconds,
        "evaluation_key_bytes": info.evaluation_key_bytes,
        "median_run_s": statistics.median(seconds) if seconds else None,
        "runs": len(seconds),
    }
