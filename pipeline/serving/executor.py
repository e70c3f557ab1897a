"""The FHE executor behind the server (`FheExecutor`; `http_api.make_executor` picks one) and its default kind,
`processes`: FHE jobs in worker processes on this machine. The other kind, `ray` (actors over a Ray
cluster), is in `executor_ray.py`; the HTTP app uses either through `FheExecutor` alone.

A crash in Concrete (for instance on crafted key bytes) kills a worker, never the HTTP server. Each worker loads the served circuits once and keeps its own LRU
cache of deserialized evaluation keys, read from the key store on disk by key id.

Each worker runs one job at a time, with a time limit: a job that crashes its worker is known (the
caller revokes its key id), a job over the limit gets its worker killed and replaced, and a worker
found dead between jobs is replaced before the next job instead of failing it. Workers exit when the
server process dies, even by SIGKILL (parent-death signal, and a watchdog thread as a fallback).
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

from ..errors import JobTimeoutError, ServerBusyError, WorkerCrashError

KEY_HEX = re.compile(r"^[0-9a-f]{8}")
START_TIMEOUT = 300.0  # seconds for a new worker to load its circuits
PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 1.0

_STATE: dict = {}


def _exit_with_parent(parent_pid: int) -> None:
    """Die with the server: SIGKILL from the kernel when the parent dies (Linux), and a thread that
    exits the process when it has been re-parented (other systems, or a missed signal)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)

    def watchdog() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watchdog, name="molcloak-parent-watchdog", daemon=True).start()


def _init_worker(bundles: dict[str, str], key_root: str, cache_bytes: int, parent_pid: int) -> None:
    _exit_with_parent(parent_pid)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ..fhe_server import open_server
    from .keystore import KeyStore

    servers = {name: open_server(path) for name, path in bundles.items()}
    _STATE["servers"] = servers
    _STATE["store"] = KeyStore(
        key_root,
        cache_bytes,
        load=lambda model, data: servers[model].load_keys(data),
        cost=lambda model: key_cost(servers[model].manifest),
    )


def key_cost(manifest) -> int:
    """Memory one loaded key set of a model takes: measured ~1.2x the circuit's in-memory key-size estimate."""
    return int(1.2 * manifest.circuit.get("evaluation_key_bytes", 0))


def _check_keys(model: str, key_id: str, sample: bytes) -> bool:
    """Deserialize (and cache) uploaded keys and run the circuit once with them on `sample`: malformed
    or poisoned keys fail (or crash this worker) here, before a key id is issued. (A linear circuit on the
    server's fast path has no evaluation keys to poison: its keys are only deserialized.)"""
    keys = _STATE["store"].get(key_id, model)
    _STATE["servers"][model].run(sample, keys)
    return True


def _run(model: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
    keys = _STATE["store"].get(key_id, model)
    start = time.perf_counter()
    out = _STATE["servers"][model].run(ciphertext, keys)
    return out, time.perf_counter() - start


def reference_ciphertexts(bundle: str, count: int = 8) -> list[bytes]:
    """`count` ciphertexts of the model in `bundle` under a throwaway key (zeros, then random rows in [0, 1]): what
    the server compares incoming ciphertexts with, and runs uploaded keys on. The secret key is deleted
    at once. Run it in a child process (it generates keys)."""
    import tempfile

    import numpy as np

    from ..fhe_client import PrivateClient

    with tempfile.TemporaryDirectory(prefix="molcloak-reference-") as tmp:
        client = PrivateClient(bundle, tmp)
        client.keygen()
        width = client.featurizer.width
        # values in [0, 1]: inside every featurizer's range (standardized descriptors, quantiles, bits,
        # counts); a fingerprint model's circuit takes non-negative inputs only
        rows = [np.zeros(width), *np.random.default_rng(0).uniform(0.0, 1.0, size=(count - 1, width))]
        return [client.encrypt(x) for x in rows]


class FheExecutor:
    """What the HTTP app needs from an FHE executor, whatever runs the jobs.

    `run` and `check_keys` raise `ServerBusyError` (503, retry) when the queue is full or a worker could
    not start, `WorkerCrashError` when the job itself crashed its worker (the caller revokes or refuses
    the key id), `JobTimeoutError` when it ran over the time limit. `pending` and `restarts` are figures
    for GET /health.
    """

    kind = "?"

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self.pending = 0
        self.restarts = 0

    @contextmanager
    def admitted(self):
        """Count a job as pending for its duration; `ServerBusyError` if the queue is full."""
        if self.pending >= self.queue_size:
            raise ServerBusyError(
                f"the FHE job queue is full ({self.queue_size} jobs); retry in a few seconds"
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def check_keys(self, model: str, key_id: str, sample: bytes) -> None:
        """Try uploaded keys: deserialize them and run the circuit once on `sample`."""
        raise NotImplementedError

    async def run(self, model: str, key_id: str, ciphertext: bytes, index: int = 0) -> tuple[bytes, float]:
        """(encrypted output, seconds in the circuit) of one ciphertext; `index`: its place in a batch."""
        raise NotImplementedError

    def reference_ciphertexts(self, model: str) -> list[bytes]:
        """Ciphertexts of `model` under a throwaway key (blocking; used at startup)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        """Start the workers now (they load the circuits) instead of on the first request."""

    def shutdown(self) -> None:
        """Stop the workers (they must not outlive the server)."""

    def figures(self) -> dict:
        """What GET /health shows of the executor."""
        return {
            "executor": self.kind,
            "pending_jobs": self.pending,
            "queue_size": self.queue_size,
            "worker_restarts": self.restarts,
        }


class WorkerPool(FheExecutor):
    """A bounded queue in front of N worker processes; a crashed worker is replaced transparently.

    The default executor (`--executor processes`).

    Jobs of one key id always go to the same worker (key affinity), so each key set is
    deserialized and cached in one worker only, not once per worker.
    """

    kind = "processes"

    def figures(self) -> dict:
        return {**super().figures(), "workers": self.workers}

    def __init__(
        self,
        bundles: dict[str, Path],
        key_root: Path,
        workers: int,
        queue_size: int,
        cache_bytes: int,
        job_timeout: float = 300.0,
    ):
        super().__init__(queue_size)
        self.bundles = {k: str(v) for k, v in bundles.items()}
        self._args = (self.bundles, str(key_root), max(1, cache_bytes // max(1, workers)), os.getpid())
        self.workers, self.job_timeout = workers, job_timeout
        self._lock = threading.Lock()
        self._pools = [self._new_pool() for _ in range(workers)]
        self._slots = [asyncio.Lock() for _ in range(workers)]  # one job at a time per worker
        self._started: set[int] = set()  # id() of pools whose worker has loaded the circuits

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=self._args)

    async def submit(self, key_id: str, fn, *args, spread: int = 0, timeout: float | None = None):
        """Run `fn(*args)` on the key's home worker, or `spread` workers further (batches use all workers).

        `WorkerCrashError` if the worker died during this job, `JobTimeoutError` if the job took longer
        than `timeout` (default `job_timeout`) seconds; either way the worker is replaced."""
        home = int(key_id[:8], 16) % self.workers if KEY_HEX.match(key_id) else 0
        slot = (home + spread) % self.workers
        limit = timeout or self.job_timeout
        with self.admitted():
            async with self._slots[slot]:
                pool = await self._ready(slot)
                try:
                    future = asyncio.wrap_future(pool.submit(fn, *args))
                except BrokenProcessPool:  # died just now, before this job reached it
                    self._replace(slot, pool)
                    pool = await self._ready(slot)
                    future = asyncio.wrap_future(pool.submit(fn, *args))
                try:
                    return await asyncio.wait_for(future, limit)
                except TimeoutError as exc:
                    self._replace(slot, pool, kill=True)
                    raise JobTimeoutError(
                        f"the FHE job ran longer than the server's limit of {limit:g} s and its worker was "
                        "restarted; the ciphertext may be malformed (or the server's --job-timeout is too "
                        "short for this model)"
                    ) from exc
                except BrokenProcessPool as exc:
                    self._replace(slot, pool)
                    raise WorkerCrashError(
                        "an FHE worker crashed while evaluating this job and was restarted"
                    ) from exc

    async def _ready(self, slot: int) -> ProcessPoolExecutor:
        """The slot's pool, replaced first if its worker died while idle, and started (circuits loaded)."""
        pool = self._pools[slot]
        if _dead(pool):
            self._replace(slot, pool)
            pool = self._pools[slot]
        if id(pool) not in self._started:
            try:
                await asyncio.wait_for(asyncio.wrap_future(pool.submit(_noop, 0)), START_TIMEOUT)
            except (BrokenProcessPool, TimeoutError) as exc:
                self._replace(slot, pool, kill=True)
                raise ServerBusyError(
                    f"an FHE worker could not start ({type(exc).__name__}); retry in a few seconds, "
                    "and read the server's log if this persists"
                ) from exc
            self._started.add(id(pool))
        return pool

    def _replace(self, slot: int, broken: ProcessPoolExecutor, kill: bool = False) -> None:
        with self._lock:
            if self._pools[slot] is broken:
                self.restarts += 1
                self._pools[slot] = self._new_pool()
                self._started.discard(id(broken))
                self._pools[slot].submit(_noop, 0)  # start the new worker now, not on the next job
        _stop(broken, kill)

    async def check_keys(self, model: str, key_id: str, sample: bytes) -> None:
        """Try uploaded keys: deserialize them and run the circuit once on `sample`, in the key's home
        worker (which then has them cached). Raises what `submit` raises."""
        await self.submit(key_id, _check_keys, model, key_id, sample, timeout=max(self.job_timeout, 120.0))

    async def run(self, model: str, key_id: str, ciphertext: bytes, index: int = 0) -> tuple[bytes, float]:
        """Item `index` of a batch goes to worker home+index: one client's batch keeps every core busy
        (each worker then caches that key set once)."""
        return await self.submit(key_id, _run, model, key_id, ciphertext, spread=index)

    def reference_ciphertexts(self, model: str) -> list[bytes]:
        """Ciphertexts of `model` under a throwaway key, made in a worker (blocking; used at startup)."""
        return self._pools[0].submit(reference_ciphertexts, self.bundles[model]).result(timeout=START_TIMEOUT)

    def warm_up(self) -> None:
        """Start every worker now (they load the circuits) instead of on the first request."""
        futures = [pool.submit(_noop, 0) for pool in self._pools]
        [f.result() for f in futures]
        self._started.update(id(pool) for pool in self._pools)

    def shutdown(self) -> None:
        """Cancel queued jobs and stop the worker processes (they must not outlive the server)."""
        for pool in self._pools:
            _stop(pool, kill=False)


def _dead(pool: ProcessPoolExecutor) -> bool:
    processes = (getattr(pool, "_processes", None) or {}).values()
    return bool(getattr(pool, "_broken", False)) or any(p.exitcode is not None for p in processes)


def _stop(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Stop the pool's worker process (SIGKILL with `kill`: it may be stuck in native code)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        proc.kill() if kill else proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=10)


def _noop(_: int) -> None:
    time.sleep(0.05)
