"""`molcloak serve --executor ray`: FHE jobs on a pool of Ray actors over the CPUs of a Ray cluster, or of
a local Ray that `ray.init()` starts when no address is given (so the path works with no cluster).

Each actor (one CPU) loads the served circuits once, from the bytes of each bundle's server part sent
through Ray's object store (Concrete's server objects cannot be pickled), and keeps an LRU cache of
deserialized evaluation keys by key id within a memory cap. The server reads a key set from its key store
once and puts its bytes in the object store once (`ray.put`); an actor fetches them only when it does not
hold that key id yet, so key bytes travel once per actor, never per job.

Routing by key id: a job goes to an idle actor that holds its keys; if none is idle, to any idle actor
(which loads them); if every actor is busy, to the least loaded holder. A key set is thus loaded on as
few actors as the load allows, and one client's batch still uses every free actor.

Failures: each actor runs one job at a time. An actor that dies during a job (killed, its node lost, or
Concrete crashed in it) is replaced and the job is retried on another actor; a job during which a second
actor dies is taken to be the cause (`WorkerCrashError`: the caller refuses or revokes its key id). A job
over the time limit gets its actor killed and replaced (`JobTimeoutError`). The actors belong to the
server's Ray driver: Ray ends them when the server exits, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import socket
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import ConfigError, JobTimeoutError, ServerBusyError, WorkerCrashError
from ..fhe_server import circuit_info
from .executor import START_TIMEOUT, FheExecutor, key_cost, reference_ciphertexts
from .keystore import KeyStore

INSTALL = 'pip install "molcloak[ray]"'
NAMESPACE = "molcloak"
ACTOR_PREFIX = "molcloak-fhe"
ATTEMPTS = 2  # an actor dies during a job: retry once elsewhere; a second death is the job's doing
SERVER_FILES = ("server.zip", "manifest.json", "aggregate.json")  # those present: a bundle or aggregate part


def import_ray():
    """The `ray` module, or `ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"--executor ray needs Ray, which is not installed; install it with: {INSTALL}"
        ) from None
    return ray


def start_ray(address: str | None = None, num_cpus: int = 0):
    """Connect to the Ray cluster at `address` ("auto": the one started on this machine with `ray start`),
    or start a local Ray with `num_cpus` CPUs (0: every core). Quiet: no dashboard, the actors' logs stay
    in Ray's log files, no usage statistics sent (unless RAY_USAGE_STATS_ENABLED says otherwise)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address != "auto":
        _check_reachable(address)
    quiet = dict(
        namespace=NAMESPACE, log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR
    )
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus or max(1, os.cpu_count() or 1), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise ConfigError(
            f"could not start or reach {where} ({str(exc).splitlines()[0][:200]}); start the head with "
            "`ray start --head` and pass its address with --ray-address, or omit --ray-address for a local Ray"
        ) from exc
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nothing listens on (Ray itself would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(
            f"no Ray head answers at --ray-address {address!r} ({reason}); start it with `ray start --head` "
            "on that machine and pass the address it prints (HOST:PORT), or 'auto' on the head itself"
        ) from None


def server_part(bundle: str | Path) -> dict[str, bytes]:
    """The files an actor needs to load a model's circuit, as bytes."""
    from ..bundle import part_dir

    directory = part_dir(bundle, "server")
    return {name: (directory / name).read_bytes() for name in SERVER_FILES if (directory / name).is_file()}


class LoadedKeys:
    """Deserialized key sets by key id, least recently used dropped first past `cap` bytes (one kept)."""

    def __init__(self, cap: int):
        self.cap = cap
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()

    def get(self, key_id: str):
        hit = self._items.get(key_id)
        if hit is None:
            return None
        self._items.move_to_end(key_id)
        return hit[0]

    def put(self, key_id: str, keys, cost: int) -> None:
        self._items[key_id] = (keys, cost)
        while len(self._items) > 1 and self.bytes > self.cap:
            self._items.popitem(last=False)

    @property
    def bytes(self) -> int:
        return sum(cost for _, cost in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class FheActor:
    """One Ray actor (one CPU): every served circuit, loaded once, and an LRU of deserialized key sets."""

    def __init__(self, parts: dict[str, dict[str, bytes]], cache_bytes: int):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from ..fhe_server import open_server

        self.servers = {}
        with tempfile.TemporaryDirectory(prefix="molcloak-actor-") as tmp:
            for name, files in parts.items():
                directory = Path(tmp) / name
                directory.mkdir()
                for filename, data in files.items():
                    (directory / filename).write_bytes(data)
                self.servers[name] = open_server(directory)  # loaded now: the files may go
        self.keys = LoadedKeys(cache_bytes)

    def ready(self) -> int:
        return os.getpid()

    def run(self, model: str, key_id: str, ciphertext: bytes, key_ref: list) -> tuple[bytes, float, bool]:
        """(output, seconds in the circuit, whether the keys were fetched and loaded for this job).
        `key_ref` is [ObjectRef of the key bytes], in a list so that Ray fetches them only on a miss."""
        keys, loaded = self.keys.get(key_id), False
        if keys is None:
            import ray

            server = self.servers[model]
            keys, loaded = server.load_keys(ray.get(key_ref[0])), True
            self.keys.put(key_id, keys, key_cost(server.manifest))
        start = time.perf_counter()
        out = self.servers[model].run(ciphertext, keys)
        return out, time.perf_counter() - start, loaded

    def stats(self) -> dict:
        """This actor's process: pid, resident memory, key sets loaded and their estimated bytes."""
        import psutil

        rss = psutil.Process().memory_info().rss
        return {
            "pid": os.getpid(),
            "rss_bytes": rss,
            "key_sets": len(self.keys),
            "key_bytes": self.keys.bytes,
        }


LOST = object()  # what `_on` returns when the actor died while it had the job (or before it started it)


class RayPool(FheExecutor):
    """`size` FHE actors of one CPU each on a Ray cluster, jobs routed by key id (see the module)."""

    kind = "ray"

    def __init__(
        self,
        bundles: dict[str, Path],
        key_root: Path,
        workers: int,
        queue_size: int,
        cache_bytes: int,
        job_timeout: float = 300.0,
        address: str | None = None,
        num_cpus: int = 0,
    ):
        super().__init__(queue_size)
        self.ray = start_ray(address, num_cpus)
        self.address, self.job_timeout, self.cache_bytes = address, job_timeout, cache_bytes
        self.bundles = {k: str(v) for k, v in bundles.items()}
        self.size = workers or max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.key_loads = 0  # times an actor fetched and deserialized a key set
        self._parts = self.ray.put({name: server_part(path) for name, path in self.bundles.items()})
        # key bytes in Ray's object store: read from disk and put once per key id (LRU of object refs)
        self._store = KeyStore(
            key_root, cache_bytes, load=lambda _model, data: self.ray.put(data), cost=self._size
        )
        self._circuits = {name: circuit_info(path) for name, path in self.bundles.items()}
        self._actor_class = self.ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(FheActor)
        self._created = 0
        self._actors = [self._new_actor() for _ in range(self.size)]
        self._busy = [0] * self.size  # jobs routed to each actor, waiting or running
        self._slots = [asyncio.Lock() for _ in range(self.size)]  # one job at a time per actor
        self._holders: dict[str, set[int]] = {}  # key id -> actors given its keys
        self._started: set[int] = set()  # slots whose actor has loaded the circuits

    def _size(self, model: str) -> int:
        return int(self._circuits[model].get("serialized_evaluation_key_bytes") or 0)

    def _new_actor(self):
        self._created += 1
        name = f"{ACTOR_PREFIX}-{os.getpid()}-{self._created}"
        return self._actor_class.options(name=name, namespace=NAMESPACE).remote(self._parts, self.cache_bytes)

    # -- jobs ---------------------------------------------------------------

    async def check_keys(self, model: str, key_id: str, sample: bytes) -> None:
        await self._submit(model, key_id, sample, max(self.job_timeout, 120.0))

    async def run(self, model: str, key_id: str, ciphertext: bytes, index: int = 0) -> tuple[bytes, float]:
        return await self._submit(model, key_id, ciphertext, self.job_timeout)

    async def _submit(
        self, model: str, key_id: str, ciphertext: bytes, timeout: float
    ) -> tuple[bytes, float]:
        with self.admitted():
            key_ref = await asyncio.to_thread(self._store.get, key_id, model)
            lost: set[int] = set()
            for _attempt in range(ATTEMPTS):
                slot = self._choose(key_id, lost)
                result = await self._on(slot, (model, key_id, ciphertext, [key_ref]), timeout)
                if result is not LOST:
                    return result
                lost.add(slot)
            raise WorkerCrashError(
                f"{ATTEMPTS} FHE actors died in turn while evaluating this job (each was replaced)"
            )

    def _choose(self, key_id: str, avoid: set[int]) -> int:
        """An idle holder of the key, else an idle actor, else the least busy holder, else the least busy;
        ties go to the key's home actor and those after it, so that key ids spread over the actors."""
        slots = [s for s in range(self.size) if s not in avoid] or list(range(self.size))
        holders = [s for s in slots if s in self._holders.get(key_id, ())]
        idle = [s for s in slots if self._busy[s] == 0]
        home = int(key_id[:8], 16) % self.size if _is_hex(key_id[:8]) else 0
        for group in ([s for s in holders if s in idle], idle, holders, slots):
            if group:
                return min(group, key=lambda s: (self._busy[s], (s - home) % self.size))
        raise AssertionError("unreachable")

    async def _on(self, slot: int, args: tuple, timeout: float) -> tuple[bytes, float]:
        """Run one job on the actor of `slot`: its result, `LOST` if the actor died, or the job's own error."""
        self._busy[slot] += 1
        self._holders.setdefault(args[1], set()).add(slot)
        try:
            async with self._slots[slot]:
                actor = await self._ready(slot)
                if actor is LOST:
                    return LOST
                ref = actor.run.remote(*args)
                try:
                    out, seconds, loaded = await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)
                except TimeoutError as exc:
                    self._replace(slot, actor)
                    raise JobTimeoutError(
                        f"the FHE job ran longer than the server's limit of {timeout:g} s and its actor was "
                        "replaced; the ciphertext may be malformed (or the server's --job-timeout is too "
                        "short for this model)"
                    ) from exc
                except self.ray.exceptions.RayActorError:
                    self._replace(slot, actor)
                    return LOST
                except self.ray.exceptions.RayTaskError as exc:  # the job's own error: CiphertextError, ...
                    raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
                self.key_loads += loaded
                return out, seconds
        finally:
            self._busy[slot] -= 1

    async def _ready(self, slot: int):
        """The slot's actor once it has loaded the circuits, `LOST` if it died; `ServerBusyError` if it does
        not start in time."""
        actor = self._actors[slot]
        if slot in self._started:
            return actor
        try:
            await asyncio.wait_for(asyncio.wrap_future(actor.ready.remote().future()), START_TIMEOUT)
        except self.ray.exceptions.RayActorError:
            self._replace(slot, actor)
            return LOST
        except TimeoutError as exc:
            self._replace(slot, actor)
            raise ServerBusyError(
                f"an FHE actor could not start within {START_TIMEOUT:g} s (the Ray cluster may have no free "
                "CPU); retry in a few seconds, and read the server's log if this persists"
            ) from exc
        self._started.add(slot)
        return actor

    def _replace(self, slot: int, dead) -> None:
        """A new actor in `slot` (if `dead` is still there): it starts loading the circuits at once."""
        if self._actors[slot] is not dead:
            return
        self.restarts += 1
        self.ray.kill(dead, no_restart=True)
        self._actors[slot] = self._new_actor()
        self._started.discard(slot)
        for holders in self._holders.values():
            holders.discard(slot)

    # -- lifecycle ----------------------------------------------------------

    def reference_ciphertexts(self, model: str) -> list[bytes]:
        """Made in a child process on this machine (it generates a throwaway key)."""
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(reference_ciphertexts, self.bundles[model]).result(timeout=START_TIMEOUT)

    def warm_up(self) -> None:
        refs = [actor.ready.remote() for actor in self._actors]
        try:
            self.ray.get(refs, timeout=START_TIMEOUT)
        except self.ray.exceptions.GetTimeoutError:
            cpus = self.ray.cluster_resources().get("CPU", 0)
            raise ConfigError(
                f"{self.size} FHE actors of 1 CPU each did not all start within {START_TIMEOUT:g} s on a Ray "
                f"cluster with {cpus:g} CPUs; pass --workers {max(1, int(cpus))} or fewer, or add nodes"
            ) from None
        self._started.update(range(self.size))

    def shutdown(self) -> None:
        for actor in self._actors:
            self.ray.kill(actor, no_restart=True)
        self.ray.shutdown()

    def figures(self) -> dict:
        return {**super().figures(), "actors": self.size, "key_loads": self.key_loads}


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)
