"""What the server checks before any work reaches an FHE worker: the size of every request body as it
arrives (chunked or not), JSON bodies that are not strict JSON, and each ciphertext's size and header
against ciphertexts of the same model made at startup."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import BodyTooLargeError, CiphertextError

# ---------------------------------------------------------------- request bodies


def _json_error(status: int, kind: str, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"type": kind, "message": message}}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, body


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, on every route. A declared Content-Length is
    refused at once; otherwise (chunked transfer encoding) bytes are counted as they arrive and reading
    stops at the limit, so an endless body never sits in memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _message(self, size: str | None) -> str:
        what = f"body of {size} bytes" if size else "body (chunked)"
        return f"{what} is over the limit of {self.limit} bytes (the server's --max-body-mb); send less"

    async def _refuse(self, send, size: str) -> None:
        start, body = _json_error(413, "BodyTooLarge", self._message(size))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send, length.decode(errors="replace")[:40])
        state = {"bytes": 0, "over": False, "started": False}

        async def capped_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.limit:
                    state["over"] = True
                    raise BodyTooLargeError(self._message(None))
            return message

        async def checked_send(message):
            if state["over"]:  # whatever the app answers to the cut-off body, the answer is 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await self._refuse(send, None)
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, checked_send)
        except Exception:
            if not state["over"]:
                raise
            if not state["started"]:
                state["started"] = True
                await self._refuse(send, None)


def validation_message(errors) -> str:
    """A 422 message naming the fields that failed, without echoing their values (a NaN or Infinity in
    the body cannot be written back as JSON)."""
    parts = []
    for e in list(errors)[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts) + " (see GET /openapi.json for the request schema)"


# ---------------------------------------------------------------- ciphertexts


@dataclass(frozen=True)
class CiphertextShape:
    """What every serialized input ciphertext of one model has in common: its size, and the bytes before
    and after its random part. Measured on ciphertexts encrypted at startup under a throwaway key."""

    model: str
    size: int
    prefix: bytes
    suffix: bytes
    sample: bytes  # one ciphertext (throwaway key): runs the circuit once to try uploaded keys

    @classmethod
    def from_samples(cls, model: str, samples: list[bytes]) -> CiphertextShape:
        size = len(samples[0])
        if len(samples) < 2 or any(len(s) != size for s in samples):
            raise ValueError(f"model {model!r}: reference ciphertexts differ in size")
        head = next((i for i in range(size) if len({s[i] for s in samples}) > 1), size)
        tail = next((i for i in range(size - head) if len({s[-1 - i] for s in samples}) > 1), size - head)
        return cls(model, size, samples[0][:head], samples[0][size - tail :], samples[0])

    def check(self, ciphertext: bytes, index: int) -> None:
        """`CiphertextError` unless `ciphertext` has this model's size and header (before deserializing)."""
        if len(ciphertext) != self.size:
            raise CiphertextError(
                f"ciphertext {index} has {len(ciphertext)} bytes, model {self.model!r} takes ciphertexts of "
                f"{self.size} bytes; encrypt with this model's client part (GET /models/{self.model}/client)"
            )
        for part, expected, offset in (
            (ciphertext[: len(self.prefix)], self.prefix, 0),
            (ciphertext[self.size - len(self.suffix) :], self.suffix, self.size - len(self.suffix)),
        ):
            if part != expected:
                byte = offset + next(i for i, (a, b) in enumerate(zip(part, expected)) if a != b)
                raise CiphertextError(
                    f"ciphertext {index} is not a ciphertext of model {self.model!r} (byte {byte} differs "
                    "from the header every one of its ciphertexts has); re-encrypt it with this model's "
                    "client part"
                )

    def to_json(self, fingerprint: str) -> str:
        return json.dumps(
            {
                "fingerprint": fingerprint,
                "size": self.size,
                "prefix": self.prefix.hex(),
                "suffix": self.suffix.hex(),
                "sample": self.sample.hex(),
            }
        )

    @classmethod
    def load(cls, model: str, path: Path, fingerprint: str) -> CiphertextShape | None:
        """The shape cached at `path` for this client part, or None."""
        try:
            d = json.loads(path.read_text())
            if d["fingerprint"] != fingerprint:
                return None
            return cls(model, int(d["size"]), *(bytes.fromhex(d[k]) for k in ("prefix", "suffix", "sample")))
        except (OSError, ValueError, KeyError, TypeError):
            return None
