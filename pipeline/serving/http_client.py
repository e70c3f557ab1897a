"""HTTP client of the FHE server: the remote `PredictionBackend` (`molcloak predict --server`, the
app, audits).

It downloads and caches the client part of a model, generates keys once per model (kept in the
local key directory, secret key mode 0600), uploads the evaluation keys once (and again if the
server forgot them), encrypts locally, sends batches of ciphertexts, decrypts locally. The
prediction loop itself is `PredictionBackend.predict`, shared with the local backend.

Server errors are JSON (`{"error": {"type": ..., "message": ...}}`); they are raised as the
matching `MolcloakError` (`KeysError`, `KeyMismatchError`, `CiphertextError`, `UnknownModelError`,
`ServerBusyError`, `QuotaError`, `BudgetExhaustedError`, `RateLimitedError`, `KeyStorageError`) or else
as `RemoteError`, with the HTTP status, the type and the message.

Server quotas: a 429 over the rate limit is waited out (its Retry-After, up to `MAX_WAIT` seconds, a few
times); a spent prediction budget raises `BudgetExhaustedError` at once. The budget left after the last
request (X-Molcloak-Predictions-Remaining) is `RemoteModel.predictions_remaining`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import httpx

from ..bundle import client_fingerprint
from ..errors import (
    BudgetExhaustedError,
    CiphertextError,
    ConfigError,
    JobTimeoutError,
    KeyMismatchError,
    KeysError,
    KeysRevokedError,
    KeyStorageError,
    KeyStorageFullError,
    QuotaError,
    RateLimitedError,
    RemoteError,
    ServerBusyError,
    UnknownModelError,
)
from ..fhe_client import DEFAULT_KEY_DIR, KeygenInfo, PrivateClient
from ..predict import PredictionBackend

RETRIES = 5
MAX_WAIT = 120.0  # longest Retry-After of a rate-limited answer that the client waits out
REMAINING = "X-Molcloak-Predictions-Remaining"
# answers to POST /predict after which the client uploads its evaluation keys again (once): the server
# lost them, or revoked them after a worker crash (it tries uploaded keys before accepting them)
RELOAD = {(404, "KeysError"), (400, "KeysRevokedError")}
# the server's error types that have a matching client-side exception; any other type -> RemoteError
ERROR_TYPES = {
    cls.__name__: cls
    for cls in (
        KeysError,
        KeyMismatchError,
        KeysRevokedError,
        CiphertextError,
        UnknownModelError,
        ServerBusyError,
        JobTimeoutError,
        QuotaError,
        BudgetExhaustedError,
        RateLimitedError,
        KeyStorageError,
        KeyStorageFullError,
    )
}


def server_error(r: httpx.Response) -> tuple[str, str]:
    """(type, message) of an error answer; ("HTTPError", the start of the body) when it is not our JSON."""
    try:
        body = r.json()["error"]
        return str(body["type"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        return "HTTPError", r.text[:300]


class RemoteModel(PredictionBackend):
    """One model on a `molcloak serve` server: ciphertexts go over HTTP, keys and decryption stay here."""

    mode, source = "server", "server"

    def __init__(
        self,
        url: str,
        model: str,
        key_dir: str | Path | None = None,
        token: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url, self.model = url.rstrip("/"), model
        self.where = self.url
        self.key_dir = Path(key_dir or DEFAULT_KEY_DIR)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.info = self._model_info()
        self.client = PrivateClient(self._client_part(), self.key_dir)
        self._key_file = self.client.key_path.parent / f"server-{_slug(self.url)}.json"
        self._key_id: str | None = None
        self._keyinfo: KeygenInfo | None = None  # the keys whose evaluation keys the server has
        self.predictions_remaining: int | None = None  # the server's budget for our key id, if it has one

    # -- HTTP with retries ----------------------------------------------------

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        delay = 0.5
        for attempt in range(RETRIES):
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == RETRIES - 1:
                    raise RemoteError(
                        f"cannot reach the FHE server at {self.url} ({exc}); is `molcloak serve` running?"
                    ) from exc
            else:  # a 503 is retried, except a job over the server's time limit: it would time out again
                wait = _rate_wait(r)
                if attempt < RETRIES - 1 and wait is not None:
                    time.sleep(wait)  # over the server's rate limit: wait as it says, then again
                    continue
                if r.status_code != 503 or attempt == RETRIES - 1 or server_error(r)[0] == "JobTimeoutError":
                    return r
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _ok(self, r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        kind, message = server_error(r)
        error = ERROR_TYPES.get(kind, RemoteError)
        raise error(f"the FHE server at {self.url} answered {r.status_code} {kind}: {message}")

    # -- client part and keys -----------------------------------------------

    def _model_info(self) -> dict:
        models = self._ok(self.request("GET", "/models")).json()
        for m in models:
            if m["name"] == self.model:
                return m
        raise RemoteError(
            f"model {self.model!r} is not served at {self.url}; available: {', '.join(m['name'] for m in models)}"
        )

    def _client_part(self) -> Path:
        """The model's client part, cached by fingerprint; its client.zip must hash to what the server
        advertises (so `client.fingerprint`, the resume identity, is the server's value)."""
        expected = self.info["client_fingerprint"]
        target = self.key_dir.parent / "clients" / f"{self.model}-{expected}"
        for attempt in range(2):
            if attempt or not (target / "client.zip").is_file():
                data = self._ok(self.request("GET", f"/models/{self.model}/client")).content
                target.mkdir(parents=True, exist_ok=True)
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for name in ("client.zip", "manifest.json"):
                        (target / name).write_bytes(z.read(name))
            got = client_fingerprint(target)
            if got == expected:
                return target
        raise RemoteError(
            f"the client part of model {self.model!r} from {self.url} has fingerprint {got}, the server "
            f"advertises {expected}; the model was probably redeployed meanwhile: retry"
        )

    def keygen(self, force: bool = False) -> KeygenInfo:
        """Load or generate this model's keys; make sure the server holds their evaluation keys."""
        info = self.client.keygen(force)
        if info is not self._keyinfo:
            self.key_id(refresh=force)
            self._keyinfo = info
        return info

    def key_id(self, refresh: bool = False) -> str:
        """The server's id for our evaluation keys; generates and uploads them when needed.

        The id is remembered next to the keys (`server-<url hash>.json`) with a hash of the evaluation
        keys it stands for, so keys regenerated since (another process, `keygen(force=True)`) are
        uploaded again instead of running with the old ones.
        """
        if refresh or self._key_id is None:
            self._key_id = None if refresh else self._stored_key_id()
            if self._key_id is None:
                self._key_id = self._upload_keys()
        return self._key_id

    def _stored_key_id(self) -> str | None:
        try:
            stored = json.loads(self._key_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("keys_sha256") != self._keys_sha256():
            return None
        return stored.get("key_id")

    def _upload_keys(self) -> str:
        r = self._ok(
            self.request(
                "POST",
                "/keys",
                params={"model": self.model},
                content=self.client.evaluation_keys(),
                headers={"Content-Type": "application/octet-stream"},
            )
        )
        key_id = r.json()["key_id"]
        self._key_file.write_text(
            json.dumps(
                {"key_id": key_id, "model": self.model, "url": self.url, "keys_sha256": self._keys_sha256()}
            )
        )
        return key_id

    def _keys_sha256(self) -> str:
        return hashlib.sha256(self.client.evaluation_keys()).hexdigest()  # loads or generates the keys

    # -- the server half --------------------------------------------------------

    def predict(self, inputs, batch_size: int = 8, skip_invalid: bool = False, on_item=None):
        """`PredictionBackend.predict`, with `batch_size` checked against the server's advertised limit
        first (nothing is encrypted or sent when it is out of range)."""
        limit = self.info.get("max_batch")
        if batch_size < 1 or (limit and batch_size > limit):
            raise ConfigError(
                f"batch size {batch_size} is out of range for the server at {self.url}, which takes 1.."
                f"{limit or '?'} ciphertexts per request; pass --batch-size between 1 and {limit or 1}"
            )
        return super().predict(inputs, batch_size, skip_invalid, on_item)

    def run(self, ciphertexts: list[bytes]) -> tuple[list[bytes], list[float]]:
        """Send one batch; re-upload the keys once if the server no longer knows our key id."""
        body = {
            "model": self.model,
            "ciphertexts": [base64.b64encode(c).decode() for c in ciphertexts],
            "client_fingerprint": self.info["client_fingerprint"],
        }
        for refresh in (False, True):
            r = self.request("POST", "/predict", json={**body, "key_id": self.key_id(refresh)})
            if not refresh and (r.status_code, server_error(r)[0]) in RELOAD:
                continue  # the server lost, deleted or revoked our evaluation keys: upload them again, once
            if REMAINING in r.headers:
                self.predictions_remaining = int(r.headers[REMAINING])
            data = self._ok(r).json()
            return [base64.b64decode(o) for o in data["outputs"]], data["server_seconds"]
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def _rate_wait(r: httpx.Response) -> float | None:
    """Seconds to wait before sending again, for a 429 over the rate limit with a Retry-After of at most
    `MAX_WAIT`; None for any other answer."""
    if r.status_code != 429 or server_error(r)[0] != "RateLimitedError":
        return None
    try:
        wait = float(r.headers.get("retry-after", ""))
    except ValueError:
        return None
    return wait if 0 <= wait <= MAX_WAIT else None


def _slug(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]
