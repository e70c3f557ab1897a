"""The server half of the key split: runs the circuit on ciphertexts with evaluation keys.

It loads only `server/server.zip` and the public manifest; it never sees a
secret key, a SMILES string, a feature vector or a plaintext prediction. `AggregateServer` is the same
for a model's aggregate-only audit program (`aggregate.py`, `<bundle>/aggregate/`); `open_server` picks
the right one for a served directory.
"""

from __future__ import annotations

from pathlib import Path

from . import linear_fast_path
from .aggregate import SPEC_FILE, AggregateSpec, unpack_job
from .bundle import Manifest, load_manifest, part_dir
from .errors import CiphertextError


def open_server(directory: str | Path):
    """The server of a served directory: an aggregate program's (`aggregate.json`) or a bundle's."""
    return AggregateServer(directory) if (Path(directory) / SPEC_FILE).is_file() else PrivateServer(directory)


def circuit_info(directory: str | Path) -> dict:
    """The circuit statistics (key sizes among them) of a served directory, without loading the circuit."""
    if (Path(directory) / SPEC_FILE).is_file():
        return AggregateSpec.load(directory).circuit
    return load_manifest(part_dir(directory, "server"), "server").circuit


def load_evaluation_keys(evaluation_keys: bytes):
    """Deserialize uploaded evaluation keys; `CiphertextError` if they are empty or malformed."""
    from concrete import fhe

    if not isinstance(evaluation_keys, (bytes, bytearray)) or not evaluation_keys:
        raise CiphertextError("evaluation keys are empty; upload the bytes from the client's keygen")
    try:
        return fhe.EvaluationKeys.deserialize(bytes(evaluation_keys))
    except (RuntimeError, ValueError) as exc:
        raise CiphertextError(
            f"evaluation keys are malformed ({str(exc)[:200]}); regenerate them on the client"
        ) from exc


def _value(data: bytes, what: str):
    from concrete import fhe

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise CiphertextError(f"{what} is empty; send the bytes from the client's encrypt step")
    try:
        return fhe.Value.deserialize(bytes(data))
    except (RuntimeError, ValueError) as exc:
        raise CiphertextError(
            f"{what} is malformed ({str(exc)[:200]}); re-encrypt it with the client"
        ) from exc


class PrivateServer:
    """Server of one model: load with the bundle root or its server/ directory.

    A bootstrap-free linear circuit (the kernel and linear machines) runs on `linear_fast_path`, which gives
    Concrete's output ciphertexts bit for bit in about a quarter of the time and is self-checked against
    Concrete's runtime here; every other circuit, and any request not in the exact ciphertext layout, runs
    on Concrete's runtime. `engine` says which serves this model."""

    def __init__(self, bundle: str | Path):
        from concrete.ml.deployment import FHEModelServer

        self.directory = part_dir(bundle, "server")
        self.manifest: Manifest = load_manifest(self.directory, "server")
        self._fhe = FHEModelServer(str(self.directory))
        self._fast, self.engine = linear_fast_path.load(self.directory / "server.zip", self._fhe.server)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def fast_path(self) -> linear_fast_path.LinearFastPath | None:
        """The self-checked fast path serving this model, or None when Concrete's runtime serves it (`engine`)."""
        return self._fast

    def load_keys(self, evaluation_keys: bytes):
        """Deserialize evaluation keys once; pass the result to `run` for every request."""
        return load_evaluation_keys(evaluation_keys)

    def run(self, ciphertext: bytes, evaluation_keys, concrete_only: bool = False) -> bytes:
        """Evaluate the model on one serialized ciphertext; returns the serialized encrypted output.
        `concrete_only`: on Concrete's runtime even when the fast path serves this model (what a benchmark
        compares it with)."""
        if isinstance(evaluation_keys, (bytes, bytearray)):
            evaluation_keys = self.load_keys(evaluation_keys)
        if (
            not concrete_only
            and self._fast is not None
            and evaluation_keys is not None
            and isinstance(ciphertext, (bytes, bytearray))
        ):
            output = self._fast.run(ciphertext)  # None: not a well-formed ciphertext for this circuit
            if output is not None:
                return output
        value = _value(ciphertext, "ciphertext")
        try:
            return self._fhe.run(value, evaluation_keys).serialize()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CiphertextError(
                f"the circuit rejected the ciphertext or keys ({str(exc)[:200]}); "
                f"were they made for model {self.name!r}?"
            ) from exc


class AggregateServer:
    """Server of a model's aggregate-only audit program (`<bundle>/aggregate/`): one job is one chunk,
    `aggregate.pack_job(rows, labels, noise)`; the answer is the chunk's encrypted counts."""

    def __init__(self, directory: str | Path):
        from types import SimpleNamespace

        from concrete import fhe

        self.directory = Path(directory)
        self.spec = AggregateSpec.load(self.directory)
        self.manifest = SimpleNamespace(name=self.spec.program, circuit=self.spec.circuit)
        self._server = fhe.Server.load(self.directory / "server.zip")

    @property
    def name(self) -> str:
        return self.spec.program

    def load_keys(self, evaluation_keys: bytes):
        return load_evaluation_keys(evaluation_keys)

    def run(self, payload: bytes, evaluation_keys) -> bytes:
        """The encrypted counts of one chunk. An empty payload only checks the keys (deserialized by the
        caller): running a whole chunk to try uploaded keys would take a minute."""
        if not payload:
            return b""
        if isinstance(evaluation_keys, (bytes, bytearray)):
            evaluation_keys = self.load_keys(evaluation_keys)
        rows, labels, noise = unpack_job(payload)
        if noise.shape != (self.spec.counters,):
            raise CiphertextError(
                f"the aggregate job has {noise.size} noise values, expected {self.spec.counters}"
            )
        args = (_value(rows, "the rows ciphertext"), _value(labels, "the labels ciphertext"), noise)
        try:
            return self._server.run(*args, evaluation_keys=evaluation_keys).serialize()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CiphertextError(
                f"the aggregate program rejected the ciphertexts or keys ({str(exc)[:200]}); were they made "
                f"with the aggregate client part of {self.spec.model!r}, {self.spec.rows} rows per chunk?"
            ) from exc
