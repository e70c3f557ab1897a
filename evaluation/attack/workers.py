"""Cases on the FHE workers and the key store: poisoned keys, a key id whose jobs crash a worker, a job
over the time limit, kill -9 of the server, a full disk, leftovers of interrupted writes, a batch size
over the server's limit (the CLI as a subprocess), and workers that died while idle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from .cases import Case, Outcome, outcome
from .context import ORPHAN, Context, answers, error_of, workers_of


def _poisoned(ctx: Context) -> bytes:
    keys = bytearray(ctx.honest().client.evaluation_keys())
    keys[100:200] = bytes(100)
    return bytes(keys)


def poisoned_keys(ctx: Context) -> Outcome:
    server = ctx.server("main")
    key_id = ctx.honest().key_id()
    before = ctx.stored(server)
    t0 = time.monotonic()
    r = ctx.upload(server, _poisoned(ctx))
    seconds = time.monotonic() - t0
    kind, message = error_of(r)
    honest = ctx.predict(server, key_id, [ctx.ct64()])
    return outcome(
        {
            "400 at upload": r.status_code == 400 and "crashed the FHE worker" in message,
            "nothing stored": ctx.stored(server) == before,
            "honest ok": honest.status_code == 200,
        },
        f"{r.status_code} {kind} after {seconds:.1f} s ('{message.split(' when ')[0]}'); nothing stored; "
        f"honest request {honest.status_code}",
        upload_seconds=seconds,
    )


def revoked_key(ctx: Context) -> Outcome:
    """Uploaded keys are tried, so a poisoned key set can only be stored by writing it into the key store
    directly (as a key store damaged after the upload would be): done here."""
    server = ctx.server("main")
    key_id, keys_dir = "ab" * 16, server.state_dir / "keys"
    poisoned = _poisoned(ctx)
    (keys_dir / f"{key_id}.keys").write_bytes(poisoned)
    now = time.time()
    meta = {"model": ctx.model, "bytes": len(poisoned), "created": now, "last_used": now}
    (keys_dir / f"{key_id}.json").write_text(json.dumps(meta))
    ct = ctx.ct64()
    restarts = ctx.health(server)["worker_restarts"]
    rs = [ctx.predict(server, key_id, [ct]) for _ in range(2)]
    crashes = ctx.health(server)["worker_restarts"] - restarts
    honest = ctx.predict(server, ctx.honest().key_id(), [ct])
    return outcome(
        {
            "400 revoked twice": all(
                r.status_code == 400 and error_of(r)[0] == "KeysRevokedError" and key_id in error_of(r)[1]
                for r in rs
            ),
            "one crash only": crashes == 1,
            "keys removed": not (keys_dir / f"{key_id}.keys").exists(),
            "honest ok": honest.status_code == 200,
        },
        f"{answers(rs)}; worker crashes {crashes}; .keys removed; honest request {honest.status_code}",
        worker_crashes=crashes,
    )


def job_timeout(ctx: Context) -> Outcome:
    server = ctx.server("timeout")  # --workers 1 --job-timeout 0.001
    keys = ctx.honest().client.evaluation_keys()
    up = ctx.upload(server, keys)  # trying keys gets at least 120 s whatever --job-timeout says
    if up.status_code != 201:
        return Outcome(False, f"upload: {up.status_code} {error_of(up)[0]}")
    old = workers_of(server)
    t0 = time.monotonic()
    r = ctx.predict(server, up.json()["key_id"], [ctx.ct64()])
    seconds = time.monotonic() - t0
    _, alive = psutil.wait_procs(old, timeout=10)
    restarts = ctx.health(server)["worker_restarts"]
    kind, message = error_of(r)
    return outcome(
        {
            "503 JobTimeoutError": r.status_code == 503 and kind == "JobTimeoutError",
            "worker replaced": restarts >= 1 and not alive and len(workers_of(server)) == 1,
            "alive": server.alive(),
        },
        f"{r.status_code} {kind} in {seconds:.2f} s; old worker gone: {not alive}; worker_restarts {restarts}",
        seconds=seconds,
    )


def kill9(ctx: Context) -> Outcome:
    server = ctx.start("kill", ctx.solo, 2)
    workers = workers_of(server)
    pids = [p.pid for p in workers]
    try:
        os.kill(server.pid, signal.SIGKILL)  # the server alone, not its process group
        server.process.wait(30)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=15)
        seconds = time.monotonic() - t0
    finally:
        for p in workers:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        server.kill()
    return outcome(
        {"workers started": len(pids) == 2, "no worker alive": not alive},
        f"{len(pids)} workers; {len(alive)} still alive after {seconds:.1f} s of watching (at most 15 s)",
        seconds=seconds,
        survivors=[p.pid for p in alive],
    )


def full_disk(ctx: Context) -> Outcome:
    server = ctx.server("fsize")  # RLIMIT_FSIZE 8 MiB: storing the keys fails as on a full disk
    keys_dir = server.state_dir / "keys"
    r = ctx.upload(server, ctx.honest().client.evaluation_keys())
    kind, message = error_of(r)
    left = sorted(os.listdir(keys_dir))
    return outcome(
        {
            "507 KeyStorageError": r.status_code == 507 and kind == "KeyStorageError",
            "nothing left": not left,
            "alive": server.alive(),
        },
        f"{r.status_code} {kind}; files left in the key store: {left or 'none'}",
    )


def leftovers(ctx: Context) -> Outcome:
    """Before the start: a .tmp, a .keys without .json, a .json without .keys (key id ORPHAN)."""
    server = ctx.server("fsize")
    left = sorted(os.listdir(server.state_dir / "keys"))
    r = ctx.predict(server, ORPHAN, ["AAAA"])
    swept = server.log.read_text(errors="replace").count("leftover key files")
    return outcome(
        {"swept": not left, "orphan id 404": r.status_code == 404 and error_of(r)[0] == "KeysError"},
        f"3 leftovers -> {len(left)} files after start; log reports the sweep: {bool(swept)}; "
        f"the orphan key id: {r.status_code} {error_of(r)[0]}",
    )


def cli_batch(ctx: Context) -> Outcome:
    server = ctx.server("main")  # --max-batch 2
    out = ctx.work / "cli" / "out.csv"
    cmd = [sys.executable, "-m", "molcloak.pipeline.cli", "predict", "--server", server.url]
    cmd += ["--model", ctx.model, "--key-dir", str(ctx.work / "cli" / "keys"), "--batch-size", "3"]
    cmd += ["--output", str(out), "CCO", "c1ccccc1", "CCN"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    return outcome(
        {
            "exit 2": p.returncode == 2,
            "one line": len(lines) == 1 and lines[0].startswith("error:") and "takes 1..2" in lines[0],
            "no traceback": "Traceback" not in p.stderr + p.stdout,
            "no output": not out.exists(),
        },
        f"exit {p.returncode}, {len(lines)} line(s) on stderr: "
        f"{lines[0].replace(server.url, 'URL') if lines else ''!r}",
        command=" ".join(["molcloak", *cmd[3:]]),
        stderr=p.stderr[-2000:],
        seconds=seconds,
    )


def idle_worker(ctx: Context) -> Outcome:
    server = ctx.server("main")
    key_id = ctx.honest().key_id()
    first = ctx.predict(server, key_id, [ctx.ct64()])
    if first.status_code != 200:
        return Outcome(False, f"first request: {first.status_code} {error_of(first)[0]}")
    restarts = ctx.health(server)["worker_restarts"]
    workers = workers_of(server)
    for p in workers:
        p.kill()
    psutil.wait_procs(workers, timeout=10)
    t0 = time.monotonic()
    r = ctx.predict(server, key_id, [ctx.ct64(), ctx.ct64()])
    seconds = time.monotonic() - t0
    replaced = ctx.health(server)["worker_restarts"] - restarts
    before = ctx.decrypt(first.json()["outputs"][0])
    same = r.status_code == 200 and all(ctx.agree(ctx.decrypt(o), before) for o in r.json()["outputs"])
    return outcome(
        {"next request ok": r.status_code == 200, "same results": same, "replaced": replaced == len(workers)},
        f"killed {len(workers)} idle workers; next request {r.status_code} in {seconds:.1f} s, "
        f"results agree with the earlier ones{' (same class: approximate rounding)' if ctx.approximate else ''}: "
        f"{same}; worker_restarts +{replaced}",
        seconds=seconds,
    )


CASES = [
    Case(
        "poisoned_keys",
        "400 at upload, nothing stored",
        "a valid key upload with bytes 100-200 zeroed; then an honest request",
        poisoned_keys,
    ),
    Case(
        "crashing_key_revoked",
        "400 KeysRevokedError, 1 crash, keys removed",
        "uploads are tried first, so the poisoned keys are WRITTEN INTO THE KEY STORE DIRECTLY (as the "
        "tests do: a store damaged after upload); two requests with that key id; then an honest one",
        revoked_key,
    ),
    Case(
        "job_timeout",
        "503 JobTimeoutError, worker replaced",
        "a server with --workers 1 --job-timeout 0.001; one honest request",
        job_timeout,
    ),
    Case(
        "kill9_no_orphans",
        "no worker alive within 15 s",
        "kill -9 of a 2-worker server's main process (not its group); its workers watched for 15 s",
        kill9,
    ),
    Case(
        "full_disk_507",
        "507 KeyStorageError, no .tmp",
        "a server under RLIMIT_FSIZE 8 MiB (preexec) gets a key upload",
        full_disk,
    ),
    Case(
        "leftovers_swept",
        "key store empty after start, orphan id 404",
        "a .tmp, a .keys without .json and a .json without .keys in the state directory before start",
        leftovers,
    ),
    Case(
        "cli_batch_over_max",
        "exit 2, one line, no CSV",
        "`molcloak predict --server ... --batch-size 3` against --max-batch 2, as a subprocess",
        cli_batch,
    ),
    Case(
        "idle_worker_killed",
        "next request 200, same results",
        "kill -9 of every idle FHE worker, then an honest request of 2 ciphertexts",
        idle_worker,
    ),
]
