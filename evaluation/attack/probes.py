"""Cases on what a request carries: malformed or non-JSON bodies, wrong content types, bodies over the
limit (declared or chunked), crafted, random and truncated ciphertexts, path traversal in model names,
unknown key ids and key ids of another model. All against the main server (--max-batch 2,
--max-body-mb: one key upload and 8 MiB)."""

from __future__ import annotations

import base64
import os
import statistics
import threading
import time

import httpx

from .cases import Case, Outcome, outcome
from .context import JSON, OCTET, Context, answers, chunked_post, error_of, raw_request, rss


def _status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


def _status(answer: bytes) -> str:
    """'413 BodyTooLarge' from a raw HTTP answer."""
    parts = _status_line(answer).split()
    kind = " BodyTooLarge" if b"BodyTooLarge" in answer else ""
    return (parts[1] if len(parts) > 1 else "no answer") + kind


def malformed_json(ctx: Context) -> Outcome:
    server = ctx.server("main")
    bodies = [b"{not json", b'{"model": "x", "key_id": ', b"\xff\xfe"]
    rs = [httpx.post(f"{server.url}/predict", content=b, headers=JSON, timeout=30) for b in bodies]
    return outcome(
        {"422": all(r.status_code == 422 for r in rs), "alive": server.alive()},
        answers(rs),
    )


def wrong_content_type(ctx: Context) -> Outcome:
    server = ctx.server("main")
    a = httpx.post(f"{server.url}/predict", content=b"model=x", headers={"Content-Type": "text/plain"})
    b = httpx.post(f"{server.url}/keys", params={"model": ctx.model}, content=b"{}", headers=JSON)
    rs = [a, b]
    return outcome(
        {"415": all(r.status_code == 415 and error_of(r)[0] == "UnsupportedMediaType" for r in rs)},
        f"/predict text/plain: {a.status_code} {error_of(a)[0]}; /keys json: {b.status_code} {error_of(b)[0]}",
    )


def declared_oversize(ctx: Context) -> Outcome:
    """Content-Length one byte over the limit, and no body sent: the answer must come at once."""
    server = ctx.server("main")
    size = ctx.body_mb * 2**20 + 1
    seen, seconds = [], []
    for path, ctype in ((f"/keys?model={ctx.model}", OCTET), ("/predict", JSON)):
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype['Content-Type']}\r\n"
        start = time.monotonic()
        answer = raw_request(server.url, head + f"Content-Length: {size}\r\nConnection: close\r\n\r\n")
        seconds.append(time.monotonic() - start)
        seen.append(_status(answer))
    return outcome(
        {"413": all(s.startswith("413") for s in seen), "fast": max(seconds) < 10, "alive": server.alive()},
        f"{'; '.join(seen)} in {max(seconds):.2f} s without a body sent",
        seconds=seconds,
    )


def chunked_body(ctx: Context) -> Outcome:
    """Chunked bodies of 4x the limit on /predict and /keys; the main process's RSS sampled meanwhile."""
    server = ctx.server("main")
    limit = ctx.body_mb * 2**20
    before = rss(server.pid)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss(server.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    try:
        for path, ctype in (
            ("/predict", "application/json"),
            (f"/keys?model={ctx.model}", OCTET["Content-Type"]),
        ):
            results.append((path.split("?")[0], *chunked_post(server.url, path, 4 * limit, ctype)))
        t0 = time.monotonic()
        healthy = server.alive()
        health_seconds = time.monotonic() - t0
    finally:
        done.set()
        sampler.join()
    time.sleep(2)
    after = rss(server.pid)
    growth = peak[0] - before
    mib = lambda n: f"{n / 2**20:.0f} MiB"
    parts = [f"{p}: {_status(a)} after {mib(sent)} sent" for p, sent, a, _ in results]
    return outcome(
        {
            "413": all(a.startswith(b"HTTP/1.1 413") and b"BodyTooLarge" in a for _, _, a, _ in results),
            "stopped reading": all(sent < 2 * limit for _, sent, _, _ in results),
            "rss bounded": growth < 2 * limit,
            "health answers": healthy and health_seconds < 5,
        },
        "; ".join(parts) + f"; main RSS {mib(before)} -> peak {mib(peak[0])} -> {mib(after)} "
        f"(limit {mib(limit)}, body offered {mib(4 * limit)})",
        limit_bytes=limit,
        rss_before=before,
        rss_peak=peak[0],
        rss_after=after,
        sent=[sent for _, sent, _, _ in results],
        seconds=[s for *_, s in results],
    )


def nan_infinity(ctx: Context) -> Outcome:
    server = ctx.server("main")
    bodies = [
        b'{"model": NaN, "key_id": "x", "ciphertexts": ["AAAA"]}',
        b'{"model": "m", "key_id": Infinity, "ciphertexts": [-Infinity]}',
        b"NaN",
    ]
    rs = [httpx.post(f"{server.url}/predict", content=b, headers=JSON, timeout=30) for b in bodies]
    return outcome(
        {
            "422": all(r.status_code == 422 and error_of(r)[0] == "RequestValidationError" for r in rs),
            "alive": server.alive(),
        },
        answers(rs),
    )


def _bad_ciphertext(ctx: Context, make) -> Outcome:
    server = ctx.server("main")
    key_id = ctx.honest().key_id()
    good = ctx.ciphertext()
    r = ctx.predict(server, key_id, [base64.b64encode(make(good)).decode()])
    kind, message = error_of(r)
    return outcome(
        {"400": r.status_code == 400 and kind == "CiphertextError", "alive": server.alive()},
        f"{r.status_code} {kind}: {message.split(';')[0]}",
    )


def random_ciphertext(ctx: Context) -> Outcome:
    return _bad_ciphertext(ctx, lambda good: os.urandom(len(good)))


def truncated_ciphertext(ctx: Context) -> Outcome:
    return _bad_ciphertext(ctx, lambda good: good[:100])


def flipped_header(ctx: Context) -> Outcome:
    """Four ciphertexts with byte 10 flipped (two requests of two, --max-batch 2) sent together with an
    honest request; the honest request's latency alone first."""
    server, client = ctx.server("main"), ctx.honest()
    key_id = client.key_id()
    honest = [ctx.ct64(i) for i in range(3)]
    alone, alone_ok = [], True
    for ct in honest[:2]:
        t0 = time.monotonic()
        status = ctx.predict(server, key_id, [ct]).status_code
        alone_ok = alone_ok and status == 200
        alone.append(time.monotonic() - t0)
    bad = bytearray(ctx.ciphertext())
    bad[10] ^= 0xFF
    bad64 = base64.b64encode(bytes(bad)).decode()
    answers: dict[str, tuple[httpx.Response, float]] = {}

    def send(name: str, cts: list[str]):
        t0 = time.monotonic()
        answers[name] = (ctx.predict(server, key_id, cts), time.monotonic() - t0)

    threads = [threading.Thread(target=send, args=(f"crafted{i}", [bad64, bad64])) for i in range(2)]
    threads.append(threading.Thread(target=send, args=("honest", [honest[2]])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    crafted = [answers[f"crafted{i}"] for i in range(2)]
    honest_r, honest_s = answers["honest"]
    baseline = statistics.median(alone)
    refused = max(s for _, s in crafted)
    return outcome(
        {
            "400 byte 10": all(
                r.status_code == 400 and "byte 10 differs" in error_of(r)[1] for r, _ in crafted
            ),
            "refused fast": refused < 10,
            "honest ok": honest_r.status_code == 200 and alone_ok,
            "honest not delayed much": honest_s <= 3 * baseline + 5,
        },
        f"crafted: {crafted[0][0].status_code} {error_of(crafted[0][0])[0]} in {refused:.2f} s; honest "
        f"request {baseline:.2f} s alone, {honest_s:.2f} s alongside",
        crafted_seconds=[s for _, s in crafted],
        honest_alone_seconds=alone,
        honest_alongside_seconds=honest_s,
    )


def path_traversal(ctx: Context) -> Outcome:
    server = ctx.server("main")
    seen = []
    for raw in ("/models/../../../../etc/passwd/client", "/models/..%2F..%2F..%2Fetc%2Fpasswd/client"):
        head = f"GET {raw} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answer = raw_request(server.url, head)
        seen.append((raw, int(_status_line(answer).split()[1]) if answer else 0, answer))
    for name in ("..", "../model", "../../etc/passwd", "%2e%2e%2fmodel"):
        r = httpx.get(f"{server.url}/models/{name}/client", timeout=30)
        seen.append((f"GET /models/{name}/client", r.status_code, r.content))
        r = httpx.post(f"{server.url}/keys", params={"model": name}, content=b"x", headers=OCTET, timeout=30)
        seen.append((f"POST /keys?model={name}", r.status_code, r.content))
        r = ctx.predict(server, "f" * 32, ["AAAA"], model=name, timeout=30)
        seen.append((f"POST /predict model={name}", r.status_code, r.content))
    statuses = sorted({s for _, s, _ in seen})
    return outcome(
        {
            "404": all(s in (400, 404) for _, s, _ in seen),
            "no file served": not any(b"root:" in body or body.startswith(b"PK") for _, _, body in seen),
        },
        f"{len(seen)} requests, statuses {statuses}",
        answers={what: status for what, status, _ in seen},
    )


def unknown_key_id(ctx: Context) -> Outcome:
    server = ctx.server("main")
    rs = [ctx.predict(server, k, ["AAAA"]) for k in ("f" * 32, "../../etc/passwd", "")]
    rs.append(httpx.delete(f"{server.url}/keys/{'e' * 32}", timeout=30))
    return outcome(
        {"404": all(r.status_code == 404 for r in rs)},
        answers(rs),
    )


def key_of_other_model(ctx: Context) -> Outcome:
    """The honest keys uploaded for the second model on the server, used for the first: 409."""
    server = ctx.server("main")
    up = ctx.upload(server, ctx.honest().client.evaluation_keys(), model=ctx.twin)
    if up.status_code != 201:
        return Outcome(False, f"upload for {ctx.twin}: {up.status_code} {error_of(up)[0]}")
    twin_key = up.json()["key_id"]
    try:
        r = ctx.predict(server, twin_key, [ctx.ct64()])
    finally:
        httpx.delete(f"{server.url}/keys/{twin_key}", timeout=30)
    kind, message = error_of(r)
    return outcome({"409": r.status_code == 409 and kind == "KeyMismatchError"}, f"{r.status_code} {kind}")


CASES = [
    Case("malformed_json", "422", "POST /predict with 3 bodies that are not JSON", malformed_json),
    Case(
        "wrong_content_type",
        "415 UnsupportedMediaType",
        "text/plain to /predict, application/json to /keys",
        wrong_content_type,
    ),
    Case(
        "declared_oversize_body",
        "413 at once",
        "Content-Length one byte over --max-body-mb on /keys and /predict, no body sent (raw socket)",
        declared_oversize,
    ),
    Case(
        "chunked_body_over_limit",
        "413, stops reading, main RSS grows < 2x limit",
        "chunked bodies of 4x --max-body-mb to /predict and /keys on a raw socket, sending until the "
        "server answers; RSS of the main process from /proc/<pid>/status every 50 ms",
        chunked_body,
    ),
    Case(
        "nan_infinity", "422 RequestValidationError", "NaN, Infinity, -Infinity in JSON bodies", nan_infinity
    ),
    Case(
        "random_ciphertext", "400 CiphertextError", "random bytes of a ciphertext's size", random_ciphertext
    ),
    Case(
        "truncated_ciphertext",
        "400 CiphertextError",
        "the first 100 bytes of a ciphertext",
        truncated_ciphertext,
    ),
    Case(
        "flipped_header_byte",
        "400 in < 10 s; honest latency <= 3x + 5 s",
        "4 ciphertexts with byte 10 flipped (2 requests of 2) sent together with one honest request; "
        "the honest request's latency alone (median of 2) and alongside",
        flipped_header,
    ),
    Case(
        "path_traversal_model_names",
        "404, no file served",
        "../ and %2F in model names: GET /models/{name}/client (also raw, undecoded), POST /keys?model=, "
        "POST /predict model",
        path_traversal,
    ),
    Case(
        "unknown_key_id",
        "404 KeysError",
        "unknown, malformed and empty key ids in /predict, DELETE of an unknown key id",
        unknown_key_id,
    ),
    Case(
        "key_of_other_model",
        "409 KeyMismatchError",
        "keys uploaded for a second model on the server (a renamed copy of the bundle) used for the first",
        key_of_other_model,
    ),
]
