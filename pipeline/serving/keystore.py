"""The server's registry of evaluation keys: persisted atomically, hot ones cached (LRU, memory cap).

A key id is 128 random bits (32 hex characters). On disk, in `<root>` (mode 0700): `<id>.keys` (the
serialized evaluation keys, exactly as uploaded) and `<id>.json` (model name, size, upload and last-use
times, predictions made, and the hash of the token that uploaded them, if any), both 0600.
A revoked key id (its keys crashed an FHE worker) keeps only its `.json`, marked `revoked`, so that its
user is told why it stopped working. The store never holds secret keys: a client only ever sends
evaluation keys.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..errors import KeyMismatchError, KeysError, KeysRevokedError, KeyStorageError
from ..files import write_private

KEY_ID = re.compile(r"^[0-9a-f]{32}$")


class KeyStore:
    def __init__(
        self,
        root: str | Path,
        cache_bytes: int,
        load: Callable[[str, bytes], Any],
        cost: Callable[[str], int],
    ):
        """`load(model, data)` deserializes keys; `cost(model)` is the memory one loaded key set takes."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)  # evaluation keys are readable by the server's user only
        self.cache_bytes = cache_bytes
        self._load, self._cost = load, cost
        self._cache: OrderedDict[str, tuple[str, Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    # -- disk ---------------------------------------------------------------

    def put(self, model: str, data: bytes, owner: str | None = None) -> str:
        """Store `data` under a new key id (uploaded with the token whose hash is `owner`, if any);
        `KeyStorageError` (nothing left on disk) if it cannot be written."""
        key_id = secrets.token_hex(16)
        try:
            write_private(self.root / f"{key_id}.keys", data, private_dir=False)
            now = time.time()
            meta = {"model": model, "bytes": len(data), "created": now, "last_used": now, "owner": owner}
            write_private(self.root / f"{key_id}.json", json.dumps(meta).encode(), private_dir=False)
        except OSError as exc:
            for ext in ("json", "keys"):
                self._path(key_id, ext).unlink(missing_ok=True)
            raise KeyStorageError(
                f"the server could not store {len(data)} bytes of evaluation keys "
                f"({exc.strerror or type(exc).__name__}); its disk is full or not writable: "
                "retry later or tell the server's operator"
            ) from exc
        return key_id

    def sweep(self) -> list[str]:
        """Remove what an interrupted or failed write left behind: temporary files, a `.keys` without its
        `.json` and a `.json` without its `.keys` (unless revoked); returns the names removed."""
        removed = []
        for path in sorted(self.root.iterdir()):
            stem, ext = path.name.rsplit(".", 1) if "." in path.name else (path.name, "")
            if ext == "tmp":
                stray = True
            elif ext == "keys":
                stray = not (self.root / f"{stem}.json").exists()
            elif ext == "json":
                stray = not (self.root / f"{stem}.keys").exists() and not self._revoked(path)
            else:
                stray = False
            if stray and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    @staticmethod
    def _revoked(path: Path) -> bool:
        try:
            return bool(json.loads(path.read_text()).get("revoked"))
        except (OSError, ValueError, AttributeError):
            return False

    def revoke(self, key_id: str, reason: str) -> None:
        """Mark `key_id` revoked (every later use answers `KeysRevokedError`) and delete its keys."""
        meta = self._read_meta(key_id)
        meta.update(revoked=reason, revoked_at=time.time())
        with self._lock:
            self._cache.pop(key_id, None)
        write_private(self._path(key_id, "json"), json.dumps(meta).encode(), private_dir=False)
        self._path(key_id, "keys").unlink(missing_ok=True)

    def write_meta(self, key_id: str, meta: dict) -> None:
        """Replace the metadata of `key_id` (atomically: a worker reading it sees the old or the new)."""
        write_private(self._path(key_id, "json"), json.dumps(meta).encode(), private_dir=False)

    def entries(self) -> list[tuple[str, dict]]:
        """(key id, metadata) of every key set on disk, revoked ones included; unreadable ones skipped."""
        found = []
        for path in self.root.glob("*.json"):
            if not KEY_ID.match(path.stem):
                continue
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict):
                found.append((path.stem, meta))
        return found

    def stored_bytes(self) -> int:
        """Bytes of evaluation keys on disk."""
        total = 0
        for path in self.root.glob("*.keys"):
            try:
                total += path.stat().st_size
            except OSError:
                pass  # deleted meanwhile
        return total

    def read_meta(self, key_id: str) -> dict:
        """The metadata of `key_id`, revoked or not; `KeysError` if it is unknown."""
        return self._read_meta(key_id)

    def _read_meta(self, key_id: str) -> dict:
        path = self._path(key_id, "json")
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KeysError(
                f"key id {key_id!r} is unknown to this server; upload the evaluation keys again (POST /keys)"
            ) from exc

    def meta(self, key_id: str) -> dict:
        meta = self._read_meta(key_id)
        if meta.get("revoked"):
            raise KeysRevokedError(
                f"key id {key_id} was revoked by the server: {meta['revoked']}; generate new keys "
                "(delete this model's keys in the client's key directory) and upload them"
            )
        return meta

    def check_owner(self, key_id: str, model: str) -> dict:
        """The metadata of `key_id`; `KeyMismatchError` (HTTP 409) if its keys were made for another model."""
        meta = self.meta(key_id)
        if meta["model"] != model:
            raise KeyMismatchError(
                f"key id {key_id} belongs to model {meta['model']!r}, not {model!r}; "
                f"upload keys generated for {model!r} (POST /keys?model={model})"
            )
        return meta

    def delete(self, key_id: str, missing_ok: bool = False) -> None:
        if not missing_ok:
            self._read_meta(key_id)
        with self._lock:
            self._cache.pop(key_id, None)
        for ext in ("json", "keys"):
            self._path(key_id, ext).unlink(missing_ok=True)

    def _path(self, key_id: str, ext: str) -> Path:
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            raise KeysError(
                f"key id {str(key_id)[:40]!r} is malformed; expected the 32 hex characters POST /keys returned"
            )
        return self.root / f"{key_id}.{ext}"

    # -- cache --------------------------------------------------------------

    def get(self, key_id: str, model: str) -> Any:
        """Loaded keys of `key_id`, which must belong to `model`."""
        self.check_owner(key_id, model)
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None:
                self._cache.move_to_end(key_id)
                return hit[1]
        try:
            data = self._path(key_id, "keys").read_bytes()
        except FileNotFoundError as exc:
            raise KeysError(
                f"the evaluation keys of key id {key_id} are gone from this server; upload them again (POST /keys)"
            ) from exc
        keys = self._load(model, data)
        with self._lock:
            self._cache[key_id] = (model, keys, self._cost(model))
            self._evict()
        return keys

    def _evict(self) -> None:
        while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
            self._cache.popitem(last=False)

    @property
    def cached_bytes(self) -> int:
        return sum(cost for _, _, cost in self._cache.values())

    def __len__(self) -> int:
        return len(list(self.root.glob("*.json")))
