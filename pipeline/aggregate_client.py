"""The auditor's half of an aggregate-only audit (`aggregate.py`): keys, chunks, encryption, decryption.

The key set of an aggregate audit lives in memory only: it is generated for one audit (about two seconds),
its evaluation keys are uploaded for that audit and deleted from the server afterwards, and the secret key is
gone when the audit ends. Nothing is stored on disk, so nothing can leak from the key directory later.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .aggregate import PAD_LABEL, AggregateSpec, pack_job
from .errors import AuditError, BundleError, CiphertextError
from .fhe_client import PrivateClient


def chunks(n: int, rows: int) -> list[slice]:
    """`n` molecules in as few chunks of at most `rows` as possible, of nearly equal size (no chunk holds
    only a handful of molecules, whose histogram would say more about each of them)."""
    if n <= 0:
        return []
    k = -(-n // rows)
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class AggregateClient:
    """Encrypt chunks of (molecule, label) for a model's aggregate program and decrypt its counts."""

    def __init__(self, part: str | Path, model_client: PrivateClient):
        from concrete import fhe

        self.directory = Path(part)
        self.spec = AggregateSpec.load(self.directory)
        if self.spec.client_fingerprint != model_client.fingerprint:
            raise BundleError(
                f"the aggregate program of {self.spec.model!r} was built for client part "
                f"{self.spec.client_fingerprint}, the model's client part is {model_client.fingerprint}; the "
                "owner must rebuild it (`molcloak aggregate BUNDLE --force`) after redeploying the model"
            )
        self.model_client = model_client
        try:
            self._fhe = fhe.Client.load(self.directory / "client.zip")
        except (RuntimeError, ValueError, OSError) as exc:
            raise BundleError(
                f"{self.directory / 'client.zip'} is unreadable ({exc}); download it again"
            ) from exc
        self.keygen_seconds: float | None = None

    def keygen(self) -> bytes:
        """A fresh key set for this audit (in memory); returns the serialized evaluation keys."""
        start = time.perf_counter()
        self._fhe.keygen(force=True)  # seed 0: fresh randomness from the OS
        self.keygen_seconds = time.perf_counter() - start
        return self._fhe.evaluation_keys.serialize()

    def encrypt(self, X: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
        """One chunk (at most `spec.rows` molecules, labels 0/1) padded with copies of its first row under
        the padding label, encrypted: (rows ciphertext, labels ciphertext)."""
        qx = self.model_client.quantize(X)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n, rows = len(qx), self.spec.rows
        if not 0 < n <= rows or len(labels) != n:
            raise AuditError(
                f"a chunk has {n} molecules and {len(labels)} labels; expected 1..{rows} of each"
            )
        if not np.isin(labels, (0, 1)).all():
            raise AuditError("aggregate-only audits take labels 0 and 1 only")
        pad = rows - n
        qx = np.concatenate([qx, np.repeat(qx[:1], pad, axis=0)]) if pad else qx
        labels = np.concatenate([labels, np.full(pad, PAD_LABEL, dtype=np.int64)])
        enc = self._fhe.encrypt(qx, labels, None)
        return enc[0].serialize(), enc[1].serialize()

    def decrypt(self, output: bytes) -> np.ndarray:
        """Counts of one chunk, (2, buckets): row 0 the negatives, row 1 the positives, per score bucket
        (lowest scores first); noisy if the server adds noise (may then be negative)."""
        from concrete import fhe

        try:
            value = fhe.Value.deserialize(output)
            counts = np.asarray(self._fhe.decrypt(value), dtype=np.int64)
        except (RuntimeError, ValueError) as exc:
            raise CiphertextError(f"the server's answer could not be decrypted ({str(exc)[:200]})") from exc
        if counts.shape != (self.spec.counters,):
            raise CiphertextError(f"the server answered {counts.shape} counts, expected {self.spec.counters}")
        return (counts - self.spec.noise_offset).reshape(2, self.spec.buckets)


class LocalAggregate:
    """Both halves of an aggregate program in this process, from a bundle (the owner's own check, tests)."""

    def __init__(self, bundle: str | Path, model_client: PrivateClient):
        from .fhe_server import AggregateServer

        part = Path(bundle) / "aggregate"
        self.client = AggregateClient(part, model_client)
        self.server = AggregateServer(part)
        self.epsilon = 0.0
        self.concurrency = 1  # one chunk at a time: Concrete runs it on every core of this machine
        self._keys = None

    def start(self) -> None:
        self._keys = self.server.load_keys(self.client.keygen())

    def run(self, rows: bytes, labels: bytes) -> bytes:
        noise = np.full(self.client.spec.counters, self.client.spec.noise_offset, dtype=np.int64)
        return self.server.run(pack_job(rows, labels, noise), self._keys)

    def finish(self) -> None:
        self._keys = None
