"""HTTP client of the FHE server: the remote `PredictionBackend` (`molcloak predict --server`, the
app, audits).

It downloads and caches the client part of a model, generates keys once per model (kept in the
local key directory, secret key mode 0600), uploads the evaluation keys once (and again if the
server forgot them), encrypts locally, sends batches of ciphertexts, decrypts locally. The
prediction loop itself is `PredictionBackend.predict`, shared with the local backend; it keeps
several batches in flight (`concurrency`, default `RemoteModel.default_concurrency`: from the FHE
workers the server advertises in GET /health, else `DEFAULT_CONCURRENCY`), from threads sharing this
client; results come back in input order.

Server errors are JSON (`{"error": {"type": ..., "message": ...}}`); they are raised as the
matching `MolcloakError` (`KeysError`, `KeyMismatchError`, `CiphertextError`, `UnknownModelError`,
`ServerBusyError`, `QuotaError`, `BudgetExhaustedError`, `RateLimitedError`, `KeyStorageError`) or else
as `RemoteError`, with the HTTP status, the type and the message.

Backpressure: a busy server (503) is retried up to `BUSY_RETRIES` attempts, after its Retry-After; a
429 over the rate limit is waited out (its Retry-After, each up to `MAX_WAIT` s, `MAX_RATE_WAIT` s in
all); while one request waits, this client starts no other. A spent prediction budget raises
`BudgetExhaustedError` at once. The budget left after the last request
(X-Molcloak-Predictions-Remaining) is `RemoteModel.predictions_remaining`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import httpx

from ..bundle import client_fingerprint
from ..errors import (
    BudgetExhaustedError,
    CiphertextError,
    ConfigError,
    ForbiddenError,
    JobTimeoutError,
    KeyMismatchError,
    KeysError,
    KeysRevokedError,
    KeyStorageError,
    KeyStorageFullError,
    MolcloakError,
    QuotaError,
    RateLimitedError,
    RemoteError,
    ServerBusyError,
    UnknownModelError,
)
from ..fhe_client import DEFAULT_KEY_DIR, KeygenInfo, PrivateClient
from ..predict import PredictionBackend

RETRIES = 5  # attempts of a request that cannot reach the server
BUSY_RETRIES = 20  # attempts of a request that the server answers 503 (busy: its FHE job queue is full)
MAX_WAIT = 120.0  # longest Retry-After of a rate-limited answer that the client waits out
MAX_RATE_WAIT = 1800.0  # most seconds one request waits out rate limits in all before it gives up
DEFAULT_CONCURRENCY = 2  # batches in flight when the server does not advertise its FHE workers
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
        ForbiddenError,
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

    mode, source, concurrent = "server", "server", True

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
        self._pause = Pause()
        self.info = self._model_info()
        self.client = PrivateClient(self._client_part(), self.key_dir)
        self._key_file = self.client.key_path.parent / f"server-{_slug(self.url)}.json"
        self._key_id: str | None = None
        self._keyinfo: KeygenInfo | None = None  # the keys whose evaluation keys the server has
        self.predictions_remaining: int | None = None  # the server's budget for our key id, if it has one
        self._key_lock = threading.Lock()  # `run` is called from several threads: one upload per key set

    # -- HTTP with retries ----------------------------------------------------

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One HTTP request, retried: a connection error up to `RETRIES` attempts in all, a 503 (server
        busy) up to `BUSY_RETRIES`, a 429 over the rate limit as long as its waits add up to at most
        `MAX_RATE_WAIT` s. The wait is the answer's Retry-After when it has one, else 0.5 s doubling
        (at most `MAX_WAIT`); it holds back every request of this client (its other threads too), so a
        busy server is not hammered. The last answer is returned when the retries are spent."""
        delay, failures, busy, rate_waited = 0.5, 0, 0, 0.0
        while True:
            self._pause.wait()
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= RETRIES:
                    raise RemoteError(
                        f"cannot reach the FHE server at {self.url} ({exc}); is `molcloak serve` running?"
                    ) from exc
                wait = delay
            else:
                wait = _rate_wait(r)
                if wait is not None:  # over the server's rate limit: wait as it says, then again
                    rate_waited += wait
                    if rate_waited > MAX_RATE_WAIT:
                        return r
                elif r.status_code == 503 and server_error(r)[0] != "JobTimeoutError":
                    busy += 1  # busy; not a job over the time limit, which would time out again
                    if busy >= BUSY_RETRIES:
                        return r
                    wait = min(MAX_WAIT, delay if _retry_after(r) is None else _retry_after(r))
                else:
                    return r
            self._pause.hold(wait)
            delay = min(delay * 2, MAX_WAIT)

    def checked(self, r: httpx.Response) -> httpx.Response:
        """`r` when it succeeded; otherwise the server's error as the matching molcloak error."""
        if r.is_success:
            return r
        kind, message = server_error(r)
        error = ERROR_TYPES.get(kind, RemoteError)
        raise error(f"the FHE server at {self.url} answered {r.status_code} {kind}: {message}")

    # -- client part and keys -----------------------------------------------

    def _model_info(self) -> dict:
        models = self.checked(self.request("GET", "/models")).json()
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
                data = self.checked(self.request("GET", f"/models/{self.model}/client")).content
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
        """Load or generate this model's keys; make sure the server holds their evaluation keys.

        `force` (rotation) also asks the server to delete the old key set's evaluation keys, so a rotated
        key set cannot be used again and does not count against the server's key quota."""
        old = (self._key_id or self._stored_key_id()) if force else None
        info = self.client.keygen(force)
        if info is not self._keyinfo:
            self.key_id(refresh=force)
            self._keyinfo = info
        if old and old != self._key_id:
            self._forget(old)
        return info

    def _forget(self, key_id: str) -> None:
        """DELETE an old key id on the server; best effort (it may be gone already: expiry, a restart)."""
        try:
            self.request("DELETE", f"/keys/{key_id}")
        except MolcloakError:
            pass

    def key_id(self, refresh: bool = False) -> str:
        """The server's id for our evaluation keys; generates and uploads them when needed.

        The id is remembered next to the keys (`server-<url hash>.json`) with a hash of the evaluation
        keys it stands for, so keys regenerated since (another process, `keygen(force=True)`) are
        uploaded again instead of running with the old ones. Thread-safe: one upload per key set.
        """
        with self._key_lock:
            if refresh or self._key_id is None:
                self._key_id = None if refresh else self._stored_key_id()
                if self._key_id is None:
                    self._key_id = self._upload_keys()
            return self._key_id

    def _replace_key_id(self, stale: str) -> str:
        """The server lost or revoked the key id `stale`: upload the keys again, once for all the threads
        that were told so, and return the new id."""
        with self._key_lock:
            if self._key_id == stale:
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
        r = self.checked(
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

    def predict(
        self, inputs, batch_size: int = 8, skip_invalid: bool = False, on_item=None, concurrency=None
    ):
        """`PredictionBackend.predict`, with `batch_size` checked against the server's advertised limit
        first (nothing is encrypted or sent when it is out of range)."""
        self.check_batch_size(batch_size)
        return super().predict(inputs, batch_size, skip_invalid, on_item, concurrency)

    def check_batch_size(self, batch_size: int) -> None:
        limit = self.info.get("max_batch")
        if batch_size < 1 or (limit and batch_size > limit):
            raise ConfigError(
                f"batch size {batch_size} is out of range for the server at {self.url}, which takes 1.."
                f"{limit or '?'} ciphertexts per request; pass --batch-size between 1 and {limit or 1}"
            )

    def default_concurrency(self, batch_size: int) -> int:
        """Batches in flight that keep the server's FHE workers busy: one per `batch_size` workers it
        advertises in GET /health (`workers`, or a Ray executor's `actors`), plus one on its way back;
        at most what its job queue takes (`queue_size`), so that no request is refused as busy;
        `DEFAULT_CONCURRENCY` when the server does not say."""
        health = self._health()
        workers = _count(health.get("workers")) or _count(health.get("actors"))  # processes, Ray actors
        queue = _count(health.get("queue_size"))
        n = -(-workers // batch_size) + 1 if workers else DEFAULT_CONCURRENCY
        return max(1, min(n, queue // batch_size)) if queue else n

    def _health(self) -> dict:
        """GET /health (its figures need the token on a server with tokens); {} when unavailable."""
        try:
            body = self.request("GET", "/health").json()
        except (RemoteError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def run(self, ciphertexts: list[bytes]) -> tuple[list[bytes], list[float]]:
        """Send one batch; re-upload the keys once if the server no longer knows our key id. Thread-safe."""
        body = {
            "model": self.model,
            "ciphertexts": [base64.b64encode(c).decode() for c in ciphertexts],
            "client_fingerprint": self.info["client_fingerprint"],
        }
        key_id = self.key_id()
        for attempt in range(2):
            r = self.request("POST", "/predict", json={**body, "key_id": key_id})
            if not attempt and (r.status_code, server_error(r)[0]) in RELOAD:
                key_id = self._replace_key_id(key_id)  # lost, deleted or revoked: upload again, once
                continue
            if REMAINING in r.headers:
                self.predictions_remaining = int(r.headers[REMAINING])
            data = self.checked(r).json()
            return [base64.b64decode(o) for o in data["outputs"]], data["server_seconds"]
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()


def _rate_wait(r: httpx.Response) -> float | None:
    """Seconds to wait before sending again, for a 429 over the rate limit with a Retry-After of at most
    `MAX_WAIT`; None for any other answer."""
    if r.status_code != 429 or server_error(r)[0] != "RateLimitedError":
        return None
    wait = _retry_after(r)
    return wait if wait is not None and wait <= MAX_WAIT else None


def _retry_after(r: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds, None without a usable one."""
    try:
        wait = float(r.headers.get("retry-after", ""))
    except ValueError:
        return None
    return wait if wait >= 0 else None


class Pause:
    """A moment before which no request of one client starts (shared by its threads): `hold(s)` moves it
    to at least `s` seconds from now, `wait()` sleeps until it has passed."""

    def __init__(self):
        self._lock, self._until = threading.Lock(), 0.0

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self) -> None:
        while (left := self._until - time.monotonic()) > 0:
            time.sleep(left)


def _count(value) -> int:
    """A positive count advertised by the server, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _slug(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]
