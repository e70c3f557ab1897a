"""The client half of the key split: featurize, quantize, encrypt, decrypt.

The secret key is generated here from the OS's random source and stays in the
client's key directory (`<key_dir>/<model>-<client fingerprint>/keys.bin`, mode 0600; the fingerprint is the content hash of client.zip).
Only the serialized evaluation keys and ciphertexts ever leave this object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Manifest, client_fingerprint, load_manifest, part_dir
from .errors import CiphertextError, KeysError
from .files import molcloak_home, write_private
from .metrics import to_predictions

DEFAULT_KEY_DIR = molcloak_home() / "keys"


@dataclass(frozen=True)
class KeygenInfo:
    seconds: float  # 0 when keys were loaded from the key directory
    evaluation_key_bytes: int
    reused: bool
    path: Path


class PrivateClient:
    """Client of one model: load with the bundle root or its client/ directory."""

    def __init__(self, bundle: str | Path, key_dir: str | Path | None = None):
        from concrete.ml.deployment import FHEModelClient

        self.directory = part_dir(bundle, "client")
        self.manifest: Manifest = load_manifest(self.directory, "client")
        self.task = self.manifest.task
        self.featurizer = self.manifest.featurizer
        self.fingerprint = client_fingerprint(self.directory)
        self.key_path = (
            Path(key_dir or DEFAULT_KEY_DIR) / f"{self.manifest.name}-{self.fingerprint}" / "keys.bin"
        )
        self._fhe = FHEModelClient(str(self.directory))
        self._eval_keys: bytes | None = None
        self._keyinfo: KeygenInfo | None = None  # keys loaded in memory

    # -- keys -------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return self.key_path.is_file()

    def keygen(self, force: bool = False) -> KeygenInfo:
        """Load this model's keys from the key directory, or generate and store them."""
        from concrete import fhe

        client = self._fhe.client
        if self._keyinfo is not None and not force:
            return self._keyinfo
        if self.has_keys and not force:
            try:
                client.keys = fhe.Keys.deserialize(self.key_path.read_bytes())
            except (RuntimeError, ValueError) as exc:
                raise KeysError(
                    f"keys in {self.key_path} are unreadable ({exc}); delete the file to generate new ones"
                ) from exc
            self._keyinfo = KeygenInfo(0.0, len(self.evaluation_keys()), True, self.key_path)
            return self._keyinfo
        start = time.perf_counter()
        client.keygen(force=True)  # seeds 0 = fresh randomness from the OS CSPRNG
        seconds = time.perf_counter() - start
        self._eval_keys = None
        write_private(self.key_path, client.keys.serialize())
        self._keyinfo = KeygenInfo(seconds, len(self.evaluation_keys()), False, self.key_path)
        return self._keyinfo

    def evaluation_keys(self) -> bytes:
        """Serialized evaluation keys: what the server needs, no secret key inside."""
        if self._eval_keys is None:
            self._require_keys()
            self._eval_keys = self._fhe.client.evaluation_keys.serialize()
        return self._eval_keys

    def _require_keys(self) -> None:
        keys = self._fhe.client.keys
        if keys is None or not keys.are_generated:
            self.keygen()

    # -- data path --------------------------------------------------------

    def featurize(self, inputs: Sequence) -> np.ndarray:
        """Features from SMILES, or from rows (mappings column -> value) for a tabular model."""
        return self.featurizer.transform(inputs)

    def encrypt(self, x: np.ndarray) -> bytes:
        """Quantize and encrypt one molecule's features (shape `featurizer.shape`, with or without a batch axis of 1)."""
        self._require_keys()
        x = np.asarray(x, dtype=np.float32)
        if x.size != self.featurizer.width:
            raise CiphertextError(
                f"feature row has {x.size} values, the model expects {self.featurizer.width}"
            )
        return self._fhe.quantize_encrypt_serialize(x.reshape((1,) + self.featurizer.shape))

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        """Decrypt and dequantize one encrypted output into raw model outputs (1, n_outputs)."""
        self._require_keys()
        try:
            return np.asarray(self._fhe.deserialize_decrypt_dequantize(ciphertext), dtype=np.float64)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CiphertextError(
                f"could not decrypt the server's answer ({str(exc)[:200]}); was it computed with this model's keys?"
            ) from exc

    def predictions(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs -> class probabilities or values in task units."""
        return to_predictions(self.task, raw, self.manifest.scaler)
