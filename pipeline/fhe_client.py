"""The client half of the key split: featurize, quantize, encrypt, decrypt; and the client's key sets.

The secret key is generated here from the OS's random source and stays in the client's key directory:
one key set per model and client part, `<key_dir>/<model>-<client fingerprint>/` (directory 0700; the
fingerprint is the content hash of client.zip) holding `keys.bin` (the secret and evaluation keys, mode
0600) and `keyset.json` (mode 0600: key id, creation time, predictions decrypted with it, rotation
policy, where the client part is; nothing secret). Only the serialized evaluation keys and ciphertexts
ever leave this object.

Key rotation: a key set is replaced by a new one (new secret key, new evaluation keys; the old files
are replaced) once it has decrypted `after_predictions` results or is `after_days` old; see
`RotationPolicy` for the defaults and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .bundle import Manifest, client_fingerprint, load_manifest, part_dir
from .errors import CiphertextError, ConfigError, KeysError
from .files import molcloak_home, write_private
from .metrics import to_predictions

DEFAULT_KEY_DIR = molcloak_home() / "keys"
KEYS_FILE, KEYSET_FILE = "keys.bin", "keyset.json"
_KEYSET_DIR = re.compile(r"^(?P<model>.+)-(?P<fingerprint>[0-9a-f]{16})$")


@dataclass(frozen=True)
class RotationPolicy:
    """When a key set is replaced by a new one (whichever comes first).

    Defaults: 10,000 decrypted predictions or 30 days. Every decrypted result tells whoever sees it
    whether the computation came out wrong, and with TFHE a wrong result (probability `p_error` per
    bootstrap: 1e-6 by default, and the default model runs 16 bootstraps per prediction) depends on the
    ciphertexts' noise, hence on the secret key. 10,000 predictions keep the expected number of such
    events per key set near 0.16, below one, for one key generation (about a second) and one
    evaluation-key upload (about 27 MB for the default model) per 10,000 predictions; 30 days bounds how
    long one key set stays in use, on disk and on servers.
    """

    after_predictions: int = 10_000
    after_days: float = 30.0

    def checked(self) -> RotationPolicy:
        n, days = self.after_predictions, self.after_days
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(
                f"--rotate-after-predictions {n!r} is not allowed: a key set must be replaced after a "
                "bounded number of decryptions; give an integer >= 1 (default 10000)"
            )
        if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days < float("inf"):
            raise ConfigError(
                f"--rotate-after-days {days!r} is not allowed: give a number of days > 0 (default 30)"
            )
        return self


def rotation_override(after_predictions: int | None = None, after_days: float | None = None) -> dict:
    """The rotation settings given (None = not given), checked: {field: value}."""
    given = {"after_predictions": after_predictions, "after_days": after_days}
    given = {k: v for k, v in given.items() if v is not None}
    RotationPolicy(**given).checked()
    return given


@dataclass
class KeySet:
    """What the client knows of one key set on disk (`keyset.json`); nothing in it is secret."""

    directory: Path
    model: str
    fingerprint: str
    key_id: str  # sha256 of the evaluation keys (16 hex characters): changes with every new key set
    created: float  # seconds since the epoch
    predictions: int | None  # results decrypted with it; None: made before molcloak counted them
    policy: RotationPolicy
    client_dir: str | None  # the client part it was generated from (to rotate it from `molcloak keys`)
    evaluation_key_bytes: int = 0

    @property
    def keys_path(self) -> Path:
        return self.directory / KEYS_FILE

    def due(self, now: float | None = None) -> str:
        """Why this key set must be replaced before its next use ("" when it need not be)."""
        if self.predictions is None:
            return "it was made before molcloak counted predictions"
        if self.predictions >= self.policy.after_predictions:
            return f"it has decrypted {self.predictions} predictions (limit {self.policy.after_predictions})"
        age = (time.time() if now is None else now) - self.created
        if age >= self.policy.after_days * 86400:
            return f"it is {age / 86400:.1f} days old (limit {self.policy.after_days:g})"
        return ""

    def predictions_left(self) -> int:
        return max(0, self.policy.after_predictions - (self.predictions or 0))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "client_fingerprint": self.fingerprint,
            "key_id": self.key_id,
            "created": self.created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "predictions": self.predictions,
            "rotate_after_predictions": self.policy.after_predictions,
            "rotate_after_days": self.policy.after_days,
            "client_dir": self.client_dir,
            "evaluation_key_bytes": self.evaluation_key_bytes,
        }

    def save(self) -> None:
        write_private(self.directory / KEYSET_FILE, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, directory: str | Path) -> KeySet | None:
        """The key set in `directory` (None when it holds no keys.bin). A key set without a readable
        keyset.json (made before key rotation existed) has an unknown history: `predictions` None."""
        directory = Path(directory)
        if not (directory / KEYS_FILE).is_file():
            return None
        m = _KEYSET_DIR.match(directory.name)
        model, fingerprint = (m["model"], m["fingerprint"]) if m else (directory.name, "")
        try:
            d = json.loads((directory / KEYSET_FILE).read_text())
            policy = RotationPolicy(int(d["rotate_after_predictions"]), float(d["rotate_after_days"]))
            return cls(
                directory,
                str(d.get("model", model)),
                str(d.get("client_fingerprint", fingerprint)),
                str(d["key_id"]),
                float(d["created"]),
                None if d.get("predictions") is None else int(d["predictions"]),
                policy,
                d.get("client_dir"),
                int(d.get("evaluation_key_bytes", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            created = (directory / KEYS_FILE).stat().st_mtime
            return cls(directory, model, fingerprint, "", created, None, RotationPolicy(), None)


def key_sets(key_dir: str | Path | None = None, model: str | None = None) -> list[KeySet]:
    """The key sets in a key directory (of one model, if given), by model then age."""
    root = Path(key_dir or DEFAULT_KEY_DIR)
    found = [KeySet.load(d) for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    return sorted(
        (k for k in found if k is not None and (model is None or k.model == model)),
        key=lambda k: (k.model, k.created),
    )


def delete_key_set(key_set: KeySet) -> None:
    """Remove a key set's directory: the secret key, the evaluation keys, its metadata and the key ids
    servers gave it. (The files are unlinked, not shredded.)"""
    shutil.rmtree(key_set.directory)


@dataclass(frozen=True)
class KeygenInfo:
    seconds: float  # 0 when keys were loaded from the key directory
    evaluation_key_bytes: int
    reused: bool
    path: Path
    key_id: str = ""  # the client's id of this key set (sha256 of its evaluation keys, 16 hex characters)
    rotated: str = ""  # why the previous key set was replaced ("" when none was)


class PrivateClient:
    """Client of one model: load with the bundle root or its client/ directory.

    `rotation`: rotation settings given by the user ({"after_predictions": N, "after_days": D}, either
    or both; see `rotation_override`); they are stored with the keys. Settings not given keep what is
    stored with the current key set, or the `RotationPolicy` defaults for the first one.
    """

    def __init__(self, bundle: str | Path, key_dir: str | Path | None = None, rotation: dict | None = None):
        from concrete.ml.deployment import FHEModelClient

        self.directory = part_dir(bundle, "client")
        self.manifest: Manifest = load_manifest(self.directory, "client")
        self.task = self.manifest.task
        self.featurizer = self.manifest.featurizer
        self.fingerprint = client_fingerprint(self.directory)
        self.key_path = (
            Path(key_dir or DEFAULT_KEY_DIR) / f"{self.manifest.name}-{self.fingerprint}" / KEYS_FILE
        )
        self.rotation: dict = dict(rotation or {})
        self._fhe = FHEModelClient(str(self.directory))
        self._eval_keys: bytes | None = None
        self._keyinfo: KeygenInfo | None = None  # keys loaded in memory
        self.key_set: KeySet | None = None  # what is known of the keys in memory
        self.key_ids: list[str] = []  # the key sets this object has used, in order
        self._deferred = 0  # > 0: decryptions are counted in memory and stored when the batch ends

    # -- keys -------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return self.key_path.is_file()

    def keygen(self, force: bool = False) -> KeygenInfo:
        """Load this model's keys from the key directory, or generate and store them.

        Stored keys that are due for rotation (`KeySet.due`, under the stored policy updated with
        `rotation`), or whose history is unknown, are replaced by new ones; `force` always makes new
        ones. A new key set replaces the previous one's files and forgets the key ids servers gave it."""
        from concrete import fhe
        from concrete.ml.deployment import FHEModelClient

        client = self._fhe.client
        if self._keyinfo is not None and not force:
            return self._keyinfo
        self._policy(RotationPolicy())  # settings given to the constructor: checked before any key is made
        previous = KeySet.load(self.key_path.parent)
        reason = "rotated on request" if force and previous else ""
        if previous is not None and not force:
            try:
                client.keys = fhe.Keys.deserialize(self.key_path.read_bytes())
            except (RuntimeError, ValueError) as exc:
                raise KeysError(
                    f"keys in {self.key_path} are unreadable ({exc}); delete them with "
                    f"`molcloak keys delete {self.manifest.name}` to generate new ones"
                ) from exc
            self._eval_keys = None
            key_id = _key_id(self.evaluation_keys())
            if previous.predictions is not None and self._policy(previous.policy) != previous.policy:
                previous = replace(previous, policy=self._policy(previous.policy))
                previous.save()
            reason = previous.due() or ("" if key_id == previous.key_id else "its keyset.json is not its own")
            if not reason:
                self._use(previous)
                self._keyinfo = KeygenInfo(0.0, len(self.evaluation_keys()), True, self.key_path, key_id)
                return self._keyinfo
        if client.keys is not None and client.keys.are_generated:
            # keys held now may be deserialized ones, which cannot make new keys (no client specs)
            self._fhe = FHEModelClient(str(self.directory))
            client = self._fhe.client
        start = time.perf_counter()
        client.keygen(force=True)  # seeds 0 = fresh randomness from the OS CSPRNG
        seconds = time.perf_counter() - start
        self._eval_keys = None
        write_private(self.key_path, client.keys.serialize())  # replaces the previous secret key
        evaluation = self.evaluation_keys()
        for stale in self.key_path.parent.glob("server-*.json"):  # the key ids servers gave the old keys
            stale.unlink(missing_ok=True)
        new = KeySet(
            self.key_path.parent,
            self.manifest.name,
            self.fingerprint,
            _key_id(evaluation),
            time.time(),
            0,
            self._policy(previous.policy if previous else RotationPolicy()),
            str(self.directory.resolve()),
            len(evaluation),
        )
        new.save()
        self._use(new)
        self._keyinfo = KeygenInfo(seconds, len(evaluation), False, self.key_path, new.key_id, reason)
        return self._keyinfo

    def rotate(self) -> KeygenInfo:
        """A new secret key and new evaluation keys for this model; the old ones are replaced."""
        return self.keygen(force=True)

    def set_rotation(self, after_predictions: int | None = None, after_days: float | None = None) -> None:
        """Rotation settings from now on (None: unchanged), stored with the current key set."""
        self.rotation.update(rotation_override(after_predictions, after_days))
        if self.key_set is not None and self._policy(self.key_set.policy) != self.key_set.policy:
            self.key_set.policy = self._policy(self.key_set.policy)
            self.key_set.save()

    def _policy(self, base: RotationPolicy) -> RotationPolicy:
        return replace(base, **self.rotation).checked()

    def _use(self, key_set: KeySet) -> None:
        self.key_set = key_set
        if not self.key_ids or self.key_ids[-1] != key_set.key_id:
            self.key_ids.append(key_set.key_id)

    def rotation_due(self) -> str:
        """Why the keys in memory must be replaced before the next prediction ("" when they need not be)."""
        return self.key_set.due() if self.key_set is not None and self._keyinfo is not None else ""

    def predictions_left(self) -> int:
        """How many more results the keys in memory may decrypt before they must be rotated."""
        self._require_keys()
        return self.key_set.predictions_left() if self.key_set is not None else 1

    @contextlib.contextmanager
    def counting_batch(self) -> Iterator[None]:
        """Count the decryptions of one batch in memory and store the count once, when it ends (so that
        timed decryptions do not include a file write)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self.key_set is not None:
                self.key_set.save()

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

    def quantize(self, X: np.ndarray) -> np.ndarray:
        """The model's integer inputs of feature rows (n, *featurizer.shape), as the circuit reads them; no
        keys needed (the aggregate-only audit encrypts them with its own program's keys)."""
        X = np.asarray(X, dtype=np.float32).reshape((-1,) + tuple(self.featurizer.shape))
        return np.asarray(self._fhe.model.quantize_input(X), dtype=np.int64)

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
        """Decrypt and dequantize one encrypted output into raw model outputs (1, n_outputs); counted
        as one prediction of the key set."""
        self._require_keys()
        try:
            raw = np.asarray(self._fhe.deserialize_decrypt_dequantize(ciphertext), dtype=np.float64)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CiphertextError(
                f"could not decrypt the server's answer ({str(exc)[:200]}); was it computed with this model's keys?"
            ) from exc
        if self.key_set is not None:
            self.key_set.predictions = (self.key_set.predictions or 0) + 1
            if not self._deferred:
                self.key_set.save()
        return raw

    def predictions(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs -> class probabilities or values in task units."""
        return to_predictions(self.task, raw, self.manifest.scaler, self.manifest.output)


def _key_id(evaluation_keys: bytes) -> str:
    return hashlib.sha256(evaluation_keys).hexdigest()[:16]
