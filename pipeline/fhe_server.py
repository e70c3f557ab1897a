"""The server half of the key split: runs the circuit on ciphertexts with evaluation keys.

It loads only `server/server.zip` and the public manifest; it never sees a
secret key, a SMILES string, a feature vector or a plaintext prediction.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Manifest, load_manifest, part_dir
from .errors import CiphertextError


class PrivateServer:
    """Server of one model: load with the bundle root or its server/ directory."""

    def __init__(self, bundle: str | Path):
        from concrete.ml.deployment import FHEModelServer

        self.directory = part_dir(bundle, "server")
        self.manifest: Manifest = load_manifest(self.directory, "server")
        self._fhe = FHEModelServer(str(self.directory))

    @property
    def name(self) -> str:
        return self.manifest.name

    def load_keys(self, evaluation_keys: bytes):
        """Deserialize evaluation keys once; pass the result to `run` for every request."""
        from concrete import fhe

        if not isinstance(evaluation_keys, (bytes, bytearray)) or not evaluation_keys:
            raise CiphertextError("evaluation keys are empty; upload the bytes from the client's keygen")
        try:
            return fhe.EvaluationKeys.deserialize(bytes(evaluation_keys))
        except (RuntimeError, ValueError) as exc:
            raise CiphertextError(
                f"evaluation keys are malformed ({str(exc)[:200]}); regenerate them on the client"
            ) from exc

    def run(self, ciphertext: bytes, evaluation_keys) -> bytes:
        """Evaluate the model on one serialized ciphertext; returns the serialized encrypted output."""
        from concrete import fhe

        if isinstance(evaluation_keys, (bytes, bytearray)):
            evaluation_keys = self.load_keys(evaluation_keys)
        if not isinstance(ciphertext, (bytes, bytearray)) or not ciphertext:
            raise CiphertextError("ciphertext is empty; send the bytes from the client's encrypt step")
        try:
            value = fhe.Value.deserialize(bytes(ciphertext))
        except (RuntimeError, ValueError) as exc:
            raise CiphertextError(
                f"ciphertext is malformed ({str(exc)[:200]}); re-encrypt it with the client"
            ) from exc
        try:
            return self._fhe.run(value, evaluation_keys).serialize()
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CiphertextError(
                f"the circuit rejected the ciphertext or keys ({str(exc)[:200]}); "
                f"were they made for model {self.name!r}?"
            ) from exc
