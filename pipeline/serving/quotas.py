"""What one client may take from the server: key storage, and predictions.

Key storage: all evaluation keys together stay under `max_key_bytes` (HTTP 507 past it), and one model
holds at most `max_keys_per_model` key sets (HTTP 429), counted per token when the server has tokens.
A key set unused for `key_ttl_seconds` expires: garbage collection removes it at start and periodically
(a client then uploads its keys again, which `RemoteModel` does by itself).

Predictions: a key id may make `max_predictions_per_key` predictions in all, a token
`max_predictions_per_token` (both counted on disk, so a restart does not reset them), and a key id at
most `rate_per_minute` per minute (a token bucket holding one minute of predictions, in memory).
A request over a limit answers 429 with a JSON error naming the limit; the answers carry
X-Molcloak-Predictions-Remaining, and Retry-After when waiting helps.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BudgetExhaustedError, KeysError, KeyStorageFullError, QuotaError, RateLimitedError
from ..files import write_private
from .keystore import KeyStore

REMAINING = "X-Molcloak-Predictions-Remaining"
BUDGET = "X-Molcloak-Predictions-Budget"
RATE = "X-Molcloak-Rate-Limit"
RATE_REMAINING = "X-Molcloak-Rate-Remaining"


@dataclass(frozen=True)
class Limits:
    """The server's quotas; 0 means no limit (except `max_key_bytes` and `max_keys_per_model`)."""

    max_key_bytes: int = 4096 * 2**20  # --max-key-storage-mb
    max_keys_per_model: int = 32  # --max-keys-per-model (per token and model when tokens are used)
    key_ttl_seconds: float = 72 * 3600.0  # --key-ttl-hours: time since last use
    max_predictions_per_key: int = 0  # --max-predictions-per-key
    max_predictions_per_token: int = 0  # --max-predictions-per-token
    rate_per_minute: float = 0.0  # --rate: predictions per minute per key id

    @property
    def gc_interval(self) -> float:
        """Seconds between two garbage collections: half the expiry time, within 1 s..5 min."""
        return min(300.0, max(1.0, self.key_ttl_seconds / 2)) if self.key_ttl_seconds else 300.0


def token_owner(token: str) -> str:
    """What the server records of a token: the start of its sha256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class TokenBucket:
    """`rate_per_minute` tokens a minute, at most `capacity` saved up; one token per prediction."""

    def __init__(self, rate_per_minute: float, capacity: float, now: float):
        self.rate, self.capacity = rate_per_minute / 60.0, capacity
        self.tokens, self.stamp = capacity, now

    def wait(self, n: int, now: float) -> float:
        """Seconds until `n` tokens are there (0: now)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if n <= self.tokens else (n - self.tokens) / self.rate

    def take(self, n: int) -> None:
        self.tokens -= n

    def give(self, n: int) -> None:
        self.tokens = min(self.capacity, self.tokens + n)

    @property
    def full(self) -> bool:
        return self.tokens >= self.capacity


@dataclass
class Grant:
    """Predictions a request was allowed (to give back if it fails) and the headers of its answer."""

    key_id: str
    owner: str | None
    count: int
    headers: dict[str, str] = field(default_factory=dict)


class Quotas:
    """The quotas of one server, over its `KeyStore`; token usage kept in `usage_path` (JSON)."""

    def __init__(
        self, store: KeyStore, limits: Limits, usage_path: Path, clock: Callable[[], float] = time.time
    ):
        self.store, self.limits, self.usage_path, self.clock = store, limits, Path(usage_path), clock
        self.expired = 0  # key sets removed by expiry since start
        self._reserved_bytes = 0
        self._reserved: Counter = Counter()  # (model, owner) -> uploads being stored
        self._buckets: dict[str, TokenBucket] = {}
        try:
            usage = json.loads(self.usage_path.read_text())
            self._usage: dict[str, int] = {str(k): int(v) for k, v in usage.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            self._usage = {}

    # -- key storage ------------------------------------------------------------

    def reserve(self, model: str, size: int, owner: str | None) -> Callable[[], None]:
        """Room for one more key set of `size` bytes for `model` (and `owner`); returns the function
        that releases the reservation once the keys are stored (or refused). Expired key sets are
        collected first when a quota is reached. `QuotaError` (429), `KeyStorageFullError` (507)."""
        for attempt in range(2):
            try:
                self._check_room(model, size, owner)
                break
            except (QuotaError, KeyStorageFullError):
                if attempt or not self.collect():
                    raise
        slot = (model, owner)
        self._reserved_bytes += size
        self._reserved[slot] += 1

        def release() -> None:
            self._reserved_bytes -= size
            self._reserved[slot] -= 1

        return release

    def _check_room(self, model: str, size: int, owner: str | None) -> None:
        lim = self.limits
        held = sum(
            1
            for _, m in self.store.entries()
            if m.get("model") == model and not m.get("revoked") and (owner is None or m.get("owner") == owner)
        )
        held += self._reserved[(model, owner)]
        if held >= lim.max_keys_per_model:
            whose = "your token holds" if owner else "this server holds"
            raise QuotaError(
                f"{whose} {held} key sets for model {model!r}, the limit is {lim.max_keys_per_model} (the "
                "server's --max-keys-per-model); delete key sets you no longer use (DELETE /keys/{key_id})"
                f"{self._expiry_hint()}"
            )
        stored = self.store.stored_bytes() + self._reserved_bytes
        if stored + size > lim.max_key_bytes:
            raise KeyStorageFullError(
                f"storing {size} more bytes of evaluation keys would bring this server to {stored + size} "
                f"bytes, over its limit of {lim.max_key_bytes} (--max-key-storage-mb "
                f"{lim.max_key_bytes / 2**20:g}); delete key sets you no longer use (DELETE /keys/{{key_id}})"
                f"{self._expiry_hint()}, or ask the server's operator to raise the limit"
            )

    def _expiry_hint(self) -> str:
        ttl = self.limits.key_ttl_seconds
        return f" or retry when unused ones expire ({_hours(ttl)} after their last use)" if ttl else ""

    def collect(self) -> list[str]:
        """Delete every key set (and revoked key id) unused for longer than the expiry time; returns
        their key ids."""
        ttl = self.limits.key_ttl_seconds
        if not ttl:
            return []
        now, removed = self.clock(), []
        for key_id, meta in self.store.entries():
            last = _number(meta.get("revoked_at") if meta.get("revoked") else None) or _number(
                meta.get("last_used") or meta.get("created")
            )
            if last is None:  # written by hand or by an older version: its file's time
                try:
                    last = self.store.root.joinpath(f"{key_id}.json").stat().st_mtime
                except OSError:
                    continue
            if now - last > ttl:
                self.store.delete(key_id, missing_ok=True)
                self._buckets.pop(key_id, None)
                removed.append(key_id)
        self.expired += len(removed)
        idle = [k for k, b in self._buckets.items() if b.wait(0, now) == 0 and b.full]
        for key_id in idle:  # a full bucket is the same as no bucket
            del self._buckets[key_id]
        return removed

    # -- predictions ------------------------------------------------------------

    def charge(self, key_id: str, meta: dict, owner: str | None, count: int) -> Grant:
        """Allow `count` predictions with `key_id` (metadata `meta`) for `owner`, or raise
        `BudgetExhaustedError` / `RateLimitedError` (429). Counts them on disk at once; `refund` gives
        them back if the request fails."""
        lim, now = self.limits, self.clock()
        self.check_access(key_id, meta, owner)
        used = int(meta.get("predictions", 0))
        left = self._left(used, owner)
        headers = self._budget_headers(left)
        if left is not None and count > left:
            raise BudgetExhaustedError(self._spent_message(key_id, used, owner, count, left), headers)
        bucket = None
        if lim.rate_per_minute:
            capacity = max(1.0, lim.rate_per_minute)
            bucket = self._buckets.get(key_id) or TokenBucket(lim.rate_per_minute, capacity, now)
            self._buckets[key_id] = bucket
            headers[RATE] = f"{lim.rate_per_minute:g}"
            if count > capacity:
                raise RateLimitedError(
                    f"a batch of {count} predictions is over this server's rate limit of "
                    f"{lim.rate_per_minute:g} per minute per key id (--rate); send at most "
                    f"{int(capacity)} ciphertexts per request",
                    headers,
                )
            wait = bucket.wait(count, now)
            if wait:
                headers[RATE_REMAINING] = str(int(bucket.tokens))
                headers["Retry-After"] = str(math.ceil(wait))
                raise RateLimitedError(
                    f"key id {key_id} is over this server's rate limit of {lim.rate_per_minute:g} "
                    f"predictions per minute (--rate); retry in {math.ceil(wait)} s",
                    headers,
                )
            bucket.take(count)
            headers[RATE_REMAINING] = str(int(bucket.tokens))
        self._record(key_id, meta, owner, count, now)
        headers.update(self._budget_headers(None if left is None else left - count))
        return Grant(key_id, owner, count, headers)

    @staticmethod
    def check_access(key_id: str, meta: dict, owner: str | None) -> None:
        """A key id uploaded with one token is unknown to the holders of other tokens (`KeysError`)."""
        if owner is not None and meta.get("owner") not in (None, owner):
            raise KeysError(
                f"key id {key_id!r} is unknown to this server; upload the evaluation keys again (POST /keys)"
            )

    def refund(self, grant: Grant) -> None:
        """Give back the predictions of a request that failed (no outputs were sent)."""
        bucket = self._buckets.get(grant.key_id)
        if bucket is not None:
            bucket.give(grant.count)
        try:
            meta = self.store.meta(grant.key_id)
        except KeysError:  # revoked or deleted meanwhile: nothing to give back to
            meta = None
        if meta is not None:
            meta["predictions"] = max(0, int(meta.get("predictions", 0)) - grant.count)
            self.store.write_meta(grant.key_id, meta)
        if grant.owner is not None and grant.owner in self._usage:
            self._usage[grant.owner] = max(0, self._usage[grant.owner] - grant.count)
            self._save_usage()

    def _left(self, used: int, owner: str | None) -> int | None:
        """Predictions the key id (and token) may still make; None when unlimited."""
        lim, left = self.limits, []
        if lim.max_predictions_per_key:
            left.append(max(0, lim.max_predictions_per_key - used))
        if owner is not None and lim.max_predictions_per_token:
            left.append(max(0, lim.max_predictions_per_token - self._usage.get(owner, 0)))
        return min(left) if left else None

    def _budget_headers(self, left: int | None) -> dict[str, str]:
        if left is None:
            return {}
        headers = {REMAINING: str(left)}
        if self.limits.max_predictions_per_key:
            headers[BUDGET] = str(self.limits.max_predictions_per_key)
        return headers

    def _spent_message(self, key_id: str, used: int, owner: str | None, count: int, left: int) -> str:
        lim = self.limits
        if lim.max_predictions_per_key and used + count > lim.max_predictions_per_key:
            what = (
                f"key id {key_id} has made {used} of its {lim.max_predictions_per_key} predictions "
                "(the server's --max-predictions-per-key)"
            )
        else:
            what = (
                f"your token has made {self._usage.get(owner, 0)} of its {lim.max_predictions_per_token} "
                "predictions (the server's --max-predictions-per-token)"
            )
        fix = f"send at most {left} ciphertexts" if left else "this server makes no more predictions for it"
        return f"prediction budget spent: {what}; {fix}, or ask the server's operator for a larger budget"

    def _record(self, key_id: str, meta: dict, owner: str | None, count: int, now: float) -> None:
        meta["predictions"] = int(meta.get("predictions", 0)) + count
        meta["last_used"] = now
        self.store.write_meta(key_id, meta)
        if owner is not None:
            self._usage[owner] = self._usage.get(owner, 0) + count
            self._save_usage()

    def _save_usage(self) -> None:
        write_private(self.usage_path, json.dumps(self._usage).encode(), private_dir=False)

    # -- figures ------------------------------------------------------------------

    def figures(self) -> dict:
        """Storage and limits, for the operator's GET /health (behind the token)."""
        entries = self.store.entries()
        live = [m for _, m in entries if not m.get("revoked")]
        lim = self.limits
        return {
            "key_sets": len(live),
            "key_sets_per_model": dict(Counter(str(m.get("model")) for m in live)),
            "revoked_key_ids": len(entries) - len(live),
            "key_bytes": self.store.stored_bytes(),
            "expired_since_start": self.expired,
            "limits": {
                "max_key_bytes": lim.max_key_bytes,
                "max_keys_per_model": lim.max_keys_per_model,
                "key_ttl_seconds": lim.key_ttl_seconds,
                "max_predictions_per_key": lim.max_predictions_per_key,
                "max_predictions_per_token": lim.max_predictions_per_token,
                "rate_per_minute": lim.rate_per_minute,
            },
        }


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"
