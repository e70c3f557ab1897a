"""Cases on tokens, quotas, budgets, the rate limit and expiry. The guarded server has four tokens,
--max-keys-per-model 1 (per token), room for two and a half key sets and --max-predictions-per-key 3; the
open server has no token, --key-ttl-hours of TTL_SECONDS and --rate 2."""

from __future__ import annotations

import time

import httpx

from .cases import Case, Outcome, outcome
from .context import EXPIRED, OCTET, TOKENS, TTL_SECONDS, Context, auth, error_of


def _delete(server, key_id: str, token: str | None = None) -> int:
    return httpx.delete(f"{server.url}/keys/{key_id}", headers=auth(token), timeout=30).status_code


def wrong_token(ctx: Context) -> Outcome:
    server = ctx.server("guarded")
    url = server.url
    rs = {
        "GET /models, no token": httpx.get(f"{url}/models", timeout=30),
        "GET /models, wrong token": httpx.get(f"{url}/models", headers=auth("wrong"), timeout=30),
        "GET /models, a token's prefix": httpx.get(f"{url}/models", headers=auth(TOKENS[0][:-1]), timeout=30),
        "POST /keys, wrong token": httpx.post(
            f"{url}/keys", params={"model": ctx.model}, content=b"x", headers={**OCTET, **auth("wrong")}
        ),
        "POST /predict, wrong token": ctx.predict(server, "f" * 32, ["AAAA"], token="wrong", timeout=30),
    }
    ok = httpx.get(f"{url}/models", headers=auth(TOKENS[0]), timeout=30).status_code
    return outcome(
        {"401": all(r.status_code == 401 for r in rs.values()), "right token 200": ok == 200},
        f"{len(rs)} requests: {sorted({r.status_code for r in rs.values()})}; the right token: {ok}",
        answers={k: r.status_code for k, r in rs.items()},
    )


def health_hidden(ctx: Context) -> Outcome:
    server = ctx.server("guarded")
    anonymous, wrong = ctx.health(server), ctx.health(server, "wrong")
    figures = ctx.health(server, TOKENS[1])
    return outcome(
        {
            "hidden": anonymous == {"status": "ok"} and wrong == {"status": "ok"},
            "shown with token": "keys" in figures and "worker_restarts" in figures,
        },
        f"no token: {anonymous}; wrong token: {wrong}; with a token: {len(figures)} fields "
        f"({', '.join(sorted(figures))})",
    )


def key_quota(ctx: Context) -> Outcome:
    server = ctx.server("guarded")
    keys = ctx.honest().client.evaluation_keys()
    a, b, c = TOKENS[:3]
    made: list[tuple[str, str]] = []
    try:
        first = ctx.upload(server, keys, token=a)
        if first.status_code == 201:
            made.append((first.json()["key_id"], a))
        again = ctx.upload(server, keys, token=a)
        other = ctx.upload(server, keys, token=b)
        if other.status_code == 201:
            made.append((other.json()["key_id"], b))
        third = ctx.upload(server, keys, token=c)
        if third.status_code == 201:
            made.append((third.json()["key_id"], c))
        stored = ctx.stored(server)
    finally:
        for key_id, token in made:
            _delete(server, key_id, token)
    quota_msg, storage_msg = error_of(again)[1], error_of(third)[1]
    return outcome(
        {
            "first 201": first.status_code == 201 and other.status_code == 201,
            "429 QuotaError": again.status_code == 429 and error_of(again)[0] == "QuotaError",
            "507 KeyStorageFullError": third.status_code == 507
            and error_of(third)[0] == "KeyStorageFullError",
            "refused not stored": stored == {k for k, _ in made},
        },
        f"token A: {first.status_code}, again {again.status_code} {error_of(again)[0]}; token B: "
        f"{other.status_code}; token C (storage full): {third.status_code} {error_of(third)[0]}",
        quota_message=quota_msg,
        storage_message=storage_msg,
    )


def other_tokens_key(ctx: Context) -> Outcome:
    server = ctx.server("guarded")
    a, b = TOKENS[:2]
    up = ctx.upload(server, ctx.honest().client.evaluation_keys(), token=a)
    if up.status_code != 201:
        return Outcome(False, f"upload: {up.status_code} {error_of(up)[0]}")
    key_id = up.json()["key_id"]
    try:
        r = ctx.predict(server, key_id, [ctx.ct64()], token=b)
        deleted = _delete(server, key_id, b)
        still = key_id in ctx.stored(server)
    finally:
        _delete(server, key_id, a)
    return outcome(
        {"404 predict": r.status_code == 404, "404 delete": deleted == 404, "not deleted": still},
        f"another token's key id: predict {r.status_code} {error_of(r)[0]}, DELETE {deleted}; keys kept",
    )


def budget(ctx: Context) -> Outcome:
    server, token = ctx.server("guarded"), TOKENS[3]
    up = ctx.upload(server, ctx.honest().client.evaluation_keys(), token=token)
    if up.status_code != 201:
        return Outcome(False, f"upload: {up.status_code} {error_of(up)[0]}")
    key_id = up.json()["key_id"]
    try:
        cts = [ctx.ct64(i) for i in range(2)]
        steps = [ctx.predict(server, key_id, batch, token=token) for batch in (cts, cts, cts[:1], cts[:1])]
    finally:
        _delete(server, key_id, token)
    left = [r.headers.get("X-Molcloak-Predictions-Remaining") for r in steps]
    over, spent = error_of(steps[1]), error_of(steps[3])
    return outcome(
        {
            "200 2, remaining 1": steps[0].status_code == 200 and left[0] == "1",
            "429 send at most 1": steps[1].status_code == 429
            and over[0] == "BudgetExhaustedError"
            and "made 2 of its 3 predictions" in over[1]
            and "send at most 1" in over[1],
            "200 last one": steps[2].status_code == 200 and left[2] == "0",
            "429 spent": steps[3].status_code == 429
            and "prediction budget spent" in spent[1]
            and "made 3 of its 3" in spent[1],
        },
        f"batches 2, 2, 1, 1 -> {[r.status_code for r in steps]}, remaining {left}; 'prediction budget "
        f"spent: key id ... has {spent[1].split(' has ', 1)[-1].split(';')[0]}'",
        messages=[error_of(r)[1] for r in steps if r.status_code != 200],
    )


def rate_limit(ctx: Context) -> Outcome:
    server = ctx.server("open")  # --rate 2: a bucket of 2 predictions, refilled at 2 a minute
    up = ctx.upload(server, ctx.honest().client.evaluation_keys())
    if up.status_code != 201:
        return Outcome(False, f"upload: {up.status_code} {error_of(up)[0]}")
    key_id = up.json()["key_id"]
    try:
        cts = [ctx.ct64(i) for i in range(2)]
        first = ctx.predict(server, key_id, cts)
        second = ctx.predict(server, key_id, cts)
    finally:
        _delete(server, key_id)
    retry = second.headers.get("Retry-After")
    return outcome(
        {
            "200 first": first.status_code == 200 and first.headers.get("X-Molcloak-Rate-Limit") == "2",
            "429 RateLimitedError": second.status_code == 429 and error_of(second)[0] == "RateLimitedError",
            "Retry-After": retry is not None and retry.isdigit() and 1 <= int(retry) <= 61,
        },
        f"2 then 2 at once: {first.status_code}, {second.status_code} {error_of(second)[0]}, "
        f"Retry-After {retry} s",
        retry_after=retry,
    )


def expiry(ctx: Context) -> Outcome:
    server = ctx.server("open")
    at_start = ctx.health(server)["keys"]["expired_since_start"]
    old_gone = (
        EXPIRED not in ctx.stored(server) and not (server.state_dir / "keys" / f"{EXPIRED}.json").exists()
    )
    up = ctx.upload(server, ctx.honest().client.evaluation_keys())
    if up.status_code != 201:
        return Outcome(False, f"upload: {up.status_code} {error_of(up)[0]}")
    key_id = up.json()["key_id"]
    used = ctx.predict(server, key_id, [ctx.ct64()]).status_code
    t0 = time.monotonic()
    while key_id in ctx.stored(server) and time.monotonic() - t0 < TTL_SECONDS + 90:
        time.sleep(1)
    seconds = time.monotonic() - t0
    after = ctx.predict(server, key_id, ["AAAA"])
    later = ctx.health(server)["keys"]["expired_since_start"]
    return outcome(
        {
            "collected at start": old_gone and at_start >= 1,
            "collected when unused": key_id not in ctx.stored(server) and later > at_start,
            "then 404": after.status_code == 404 and error_of(after)[0] == "KeysError",
        },
        f"key set from 1970 collected at start: {old_gone}; a used key set (predict {used}) collected "
        f"{seconds:.0f} s after its last use (TTL {TTL_SECONDS} s), then {after.status_code} "
        f"{error_of(after)[0]}",
        seconds_to_collection=seconds,
    )


CASES = [
    Case(
        "wrong_token_401",
        "401",
        "missing, wrong and truncated bearer tokens on a server with tokens",
        wrong_token,
    ),
    Case(
        "health_hidden_without_token",
        "{'status': 'ok'} only",
        "GET /health with no token, a wrong token and a valid one",
        health_hidden,
    ),
    Case(
        "key_quota_429_507",
        "429 QuotaError, 507 KeyStorageFullError",
        "a second key set for one token (--max-keys-per-model 1), then a third token when storage holds "
        "2.5 key sets",
        key_quota,
    ),
    Case(
        "other_tokens_key_id",
        "404, not deleted",
        "token B predicts with and deletes a key id uploaded with token A",
        other_tokens_key,
    ),
    Case(
        "per_key_budget",
        "429 BudgetExhaustedError with the budget message",
        "--max-predictions-per-key 3: batches of 2, 2, 1, 1",
        budget,
    ),
    Case(
        "rate_limit",
        "429 RateLimitedError + Retry-After",
        "--rate 2 (per minute per key id): two batches of 2 at once",
        rate_limit,
    ),
    Case(
        "expiry",
        "collected at start and after TTL, then 404",
        f"--key-ttl-hours of {TTL_SECONDS} s: a key set last used in 1970 lies in the state before start; a "
        "new key set is used once and watched until collected",
        expiry,
        limit=420.0,
    ),
]
