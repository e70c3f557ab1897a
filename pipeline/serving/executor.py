"""FHE jobs in worker processes: a crash in Concrete (for instance on crafted key bytes) kills a
worker, never the HTTP server. Each worker loads the served circuits once and keeps its own LRU
cache of deserialized evaluation keys, read from the key store on disk by key id."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..errors import ServerBusyError

KEY_HEX = re.compile(r"^[0-9a-f]{8}")

_STATE: dict = {}


def _init_worker(bundles: dict[str, str], key_root: str, cache_bytes: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ..fhe_server import PrivateServer
    from .keystore import KeyStore

    servers = {name: PrivateServer(path) for name, path in bundles.items()}
    _STATE["servers"] = servers
    _STATE["store"] = KeyStore(
        key_root,
        cache_bytes,
        load=lambda model, data: servers[model].load_keys(data),
        # measured: a loaded key set takes ~1.2x the circuit's in-memory key-size estimate
        cost=lambda model: int(1.2 * servers[model].manifest.circuit.get("evaluation_key_bytes", 0)),
    )


def _check_keys(model: str, key_id: str) -> bool:
    """Deserialize (and cache) uploaded keys: malformed bytes fail here, in a worker."""
    _STATE["store"].get(key_id, model)
    return True


def _run(model: str, key_id: str, ciphertext: bytes) -> tuple[bytes, float]:
    keys = _STATE["store"].get(key_id, model)
    start = time.perf_counter()
    out = _STATE["servers"][model].run(ciphertext, keys)
    return out, time.perf_counter() - start


class WorkerPool:
    """A bounded queue in front of N worker processes; a crashed worker is replaced transparently.

    Jobs of one key id always go to the same worker (key affinity), so each key set is
    deserialized and cached in one worker only, not once per worker.
    """

    def __init__(
        self, bundles: dict[str, Path], key_root: Path, workers: int, queue_size: int, cache_bytes: int
    ):
        self._args = (
            {k: str(v) for k, v in bundles.items()},
            str(key_root),
            max(1, cache_bytes // max(1, workers)),
        )
        self.workers, self.queue_size = workers, queue_size
        self.pending = 0
        self.restarts = 0
        self._lock = threading.Lock()
        self._pools = [self._new_pool() for _ in range(workers)]

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=self._args)

    async def submit(self, key_id: str, fn, *args, spread: int = 0):
        """Run `fn(*args)` on the key's home worker, or `spread` workers further (batches use all workers)."""
        if self.pending >= self.queue_size:
            raise ServerBusyError(
                f"the FHE job queue is full ({self.queue_size} jobs); retry in a few seconds"
            )
        self.pending += 1
        home = int(key_id[:8], 16) % self.workers if KEY_HEX.match(key_id) else 0
        slot = (home + spread) % self.workers
        pool = self._pools[slot]
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool as exc:
            self._replace(slot, pool)
            raise ServerBusyError(
                "an FHE worker crashed while evaluating a request (keys or ciphertexts not made for this model?) "
                "and was restarted; retry"
            ) from exc
        finally:
            self.pending -= 1

    def _replace(self, slot: int, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pools[slot] is broken:
                self.restarts += 1
                self._pools[slot] = self._new_pool()
        broken.shutdown(wait=False, cancel_futures=True)

    async def check_keys(self, model: str, key_id: str) -> None:
        await self.submit(key_id, _check_keys, model, key_id)

    async def run(self, model: str, key_id: str, ciphertext: bytes, index: int = 0) -> tuple[bytes, float]:
        """Item `index` of a batch goes to worker home+index: one client's batch keeps every core busy
        (each worker then caches that key set once)."""
        return await self.submit(key_id, _run, model, key_id, ciphertext, spread=index)

    def warm_up(self) -> None:
        """Start every worker now (they load the circuits) instead of on the first request."""
        futures = [pool.submit(_noop, 0) for pool in self._pools]
        [f.result() for f in futures]

    def shutdown(self) -> None:
        """Cancel queued jobs and stop the worker processes (they must not outlive the server)."""
        for pool in self._pools:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                proc.terminate()
            for proc in processes:
                proc.join(timeout=10)


def _noop(_: int) -> None:
    time.sleep(0.05)
