"""Real encrypted runs of any Concrete ML model (QAT module or built-in sklearn model), timed the same way.

The model is saved with `FHEModelDev` into a temporary directory and loaded back as the two
halves of a deployment (`FHEModelClient` with the secret key, `FHEModelServer` with evaluation
keys only); each molecule goes through `predict.run_encrypted` (encrypt, server run, decrypt), the
same step the prediction backends use. A molcloak bundle is timed through its backend instead
(`predict.LocalBackend`, see `testset_fhe`); these halves are for models that are not bundles.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from molcloak.pipeline.predict import run_encrypted


class DeployedHalves:
    """Client and server halves of a compiled Concrete ML model, with `run_encrypted`'s interface."""

    def __init__(self, model, directory: Path):
        from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer

        FHEModelDev(str(directory / "model"), model).save()
        self.client = FHEModelClient(str(directory / "model"), key_dir=str(directory / "keys"))
        self.server = FHEModelServer(str(directory / "model"))

    def keygen(self) -> tuple[float, bytes]:
        start = time.perf_counter()
        self.client.generate_private_and_evaluation_keys(force=True)
        seconds = time.perf_counter() - start
        return seconds, self.client.get_serialized_evaluation_keys()

    def load_keys(self, evaluation_keys: bytes):
        from concrete import fhe

        return fhe.EvaluationKeys.deserialize(evaluation_keys)

    def encrypt(self, x: np.ndarray) -> bytes:
        return self.client.quantize_encrypt_serialize(np.asarray(x, dtype=np.float32).reshape(1, -1))

    def run(self, ciphertext: bytes, keys) -> bytes:
        from concrete import fhe

        return self.server.run(fhe.Value.deserialize(ciphertext), keys).serialize()

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        return np.asarray(self.client.deserialize_decrypt_dequantize(ciphertext), dtype=np.float64).reshape(
            1, -1
        )


def latency_summary(seconds: list[float]) -> dict:
    """Median and 90th percentile (nearest rank) of per-molecule run times."""
    s = sorted(seconds)
    if not s:
        return {"n_runs": 0}
    return {
        "n_runs": len(s),
        "median_s": statistics.median(s),
        "p90_s": s[min(len(s) - 1, int(np.ceil(0.9 * len(s))) - 1)],
        "min_s": s[0],
        "max_s": s[-1],
    }


def encrypted_runs(halves, X: np.ndarray, on_item: Callable[[int], None] | None = None) -> dict:
    """Keygen once, then encrypt/run/decrypt each row of `X`; outputs, times and sizes.

    `halves` has `keygen() -> (seconds, evaluation key bytes)`, `load_keys`, `encrypt`, `run`, `decrypt`.
    The first row is run once more before timing so one-time setup is not counted as latency.
    """
    keygen_s, eval_keys = halves.keygen()
    keys = halves.load_keys(eval_keys)
    outputs, runs, enc, dec = [], [], [], []
    ct = out = b""
    if len(X):
        run_encrypted(halves, halves, keys, X[0])  # warm-up
    for i, x in enumerate(X):
        raw, ct, out, seconds = run_encrypted(halves, halves, keys, x)
        outputs.append(np.ravel(raw))
        runs.append(seconds["run"])
        enc.append(seconds["encrypt"])
        dec.append(seconds["decrypt"])
        if on_item:
            on_item(i)
    return {
        "keygen_s": keygen_s,
        "evaluation_key_bytes": len(eval_keys),
        "input_ciphertext_bytes": len(ct),
        "output_ciphertext_bytes": len(out),
        "latency": latency_summary(runs),
        "run_s": runs,
        "encrypt_median_s": statistics.median(enc) if enc else None,
        "decrypt_median_s": statistics.median(dec) if dec else None,
        "outputs": np.asarray(outputs),
    }


def measure_concrete(model, X: np.ndarray, on_item: Callable[[int], None] | None = None) -> dict:
    """`encrypted_runs` for a compiled Concrete ML model (QuantizedModule or concrete.ml.sklearn model)."""
    with tempfile.TemporaryDirectory(prefix="molcloak-fhe-") as tmp:
        return encrypted_runs(DeployedHalves(model, Path(tmp)), X, on_item)
