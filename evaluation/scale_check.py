"""Scale check of the FHE server (issue 15): the process pool against Ray actors, and Ray over nodes.

On the first `--limit` molecules of the panel's HIV set (read in place, never copied), encrypted once
with one key set, a client keeps `--concurrency` batches in flight (threads over `RemoteModel.run`)
against a real `molcloak serve` process on loopback, and measures throughput (molecules/s) and the p50/p95
latency of a batch and of one molecule's circuit run:

1. `--executor processes` and `--executor ray` (a local Ray) on this machine: the overhead of Ray;
2. `--executor ray` on a multi-node Ray cluster simulated here (`ray.cluster_utils.Cluster`): 1 node x 1
   CPU, then 2 nodes x 1 CPU: throughput ratio and scaling efficiency;
3. memory of one FHE actor (resident set) with 0..N key sets loaded.

Every decrypted output of every run is compared with the first run's: the executors must agree bit for
bit. Writes JSON, never asserts on time; the machine's load average goes with the figures.

    python -m molcloak.evaluation.scale_check --json scale.json [--limit 2000] [--bundle demo/bundle]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from molcloak.pipeline.errors import MolcloakError
from molcloak.pipeline.serving.executor_ray import NAMESPACE, FheActor, server_part, start_ray
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "panel" / "hiv.csv"
BUNDLE = REPO / "demo" / "bundle"


def read_smiles(path: Path, limit: int) -> list[str]:
    """The first `limit` SMILES of `path` (column `smiles`), read in place."""
    with path.open(newline="") as fh:
        rows = csv.DictReader(fh)
        return [row["smiles"] for _, row in zip(range(limit), rows)]


def encrypt_rows(model: RemoteModel, smiles: list[str]) -> tuple[list[bytes], int]:
    """Ciphertexts of the molecules the featurizer accepts, and how many it refused."""
    cts, invalid = [], 0
    for s in smiles:
        try:
            cts.append(model.client.encrypt(model.client.featurize([s])[0]))
        except (MolcloakError, ValueError):
            invalid += 1
    return cts, invalid


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def stream(model: RemoteModel, cts: list[bytes], batch: int, concurrency: int, label: str) -> dict:
    """Send `cts` in batches of `batch`, `concurrency` in flight; figures and the decrypted outputs."""
    batches = [cts[i : i + batch] for i in range(0, len(cts), batch)]

    def one(b: list[bytes]):
        t0 = time.perf_counter()
        outs, seconds = model.run(b)
        return time.perf_counter() - t0, seconds, outs

    latencies, runs, outputs = [], [], []
    columns = (TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} molecules"))
    with Progress(*columns, TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=len(cts))
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for latency, seconds, outs in pool.map(one, batches):
                latencies.append(latency)
                runs.extend(seconds)
                outputs.extend(model.client.decrypt(o).reshape(-1).tolist() for o in outs)
                bar.advance(task, len(outs))
        wall = time.perf_counter() - start
    figures = {
        "molecules": len(cts),
        "seconds": round(wall, 3),
        "molecules_per_s": round(len(cts) / wall, 3),
        "batch_latency_p50_s": round(pct(latencies, 0.5), 3),
        "batch_latency_p95_s": round(pct(latencies, 0.95), 3),
        "molecule_run_p50_s": round(pct(runs, 0.5), 4),
        "molecule_run_p95_s": round(pct(runs, 0.95), 4),
    }
    return {"figures": figures, "outputs": outputs}


class Runner:
    """Starts servers on one bundle and state directory, and measures them with one key set."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.cts: list[bytes] | None = None
        self.reference: list | None = None  # the first run's decrypted outputs
        self.invalid = 0

    def measure(self, label: str, executor: str, extra: list[str]) -> dict:
        args = self.args
        log = self.work / f"server-{label}.log"
        with ServerProcess(
            args.bundle,
            self.work / "state",
            log=log,
            extra_args=["--executor", executor, "--queue-size", 1024, *extra],
        ) as server:
            model = RemoteModel(server.url, args.model, key_dir=self.work / "client-keys")
            if self.cts is None:
                self.cts, self.invalid = encrypt_rows(model, read_smiles(args.data, args.limit))
            model.key_id()  # upload and trial run of the keys, outside the timing
            workers = _health(server).get("actors") or os.cpu_count() or 1
            model.run(self.cts[: 2 * workers])  # every worker has loaded the keys before the timing
            result = stream(model, self.cts, args.batch_size, args.concurrency, label)
            health = _health(server)
        if self.reference is None:
            self.reference = result["outputs"]
        agree = sum(a == b for a, b in zip(result["outputs"], self.reference))
        figures = result["figures"]
        figures.update(
            executor=executor,
            workers=workers,
            worker_restarts=health["worker_restarts"],
            outputs_equal_first_run=f"{agree}/{len(self.reference)}",
            load_average_after=[round(x, 2) for x in os.getloadavg()],
        )
        print(f"{label}: {json.dumps(figures)}", file=sys.stderr)
        return figures


def _health(server) -> dict:
    import httpx

    return httpx.get(f"{server.url}/health", timeout=30).json()


def cluster_scaling(runner: Runner) -> dict:
    """1 node x 1 CPU, then a second node of 1 CPU: `--executor ray --ray-address` the simulated cluster."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        one = runner.measure("ray, 1 node x 1 CPU", "ray", ["--ray-address", cluster.address])
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        two = runner.measure("ray, 2 nodes x 1 CPU", "ray", ["--ray-address", cluster.address])
    finally:
        cluster.shutdown()
    ratio = two["molecules_per_s"] / one["molecules_per_s"]
    return {
        "one_node": one,
        "two_nodes": two,
        "throughput_ratio": round(ratio, 3),
        "scaling_efficiency": round(ratio / 2, 3),
    }


def actor_memory(bundle: Path, model: str, key_sets: int) -> dict:
    """Resident memory of one FHE actor (a local Ray of 1 CPU) with 0..`key_sets` key sets loaded."""
    import ray

    from molcloak.pipeline.fhe_client import PrivateClient

    start_ray(None, 1)
    try:
        actor = (
            ray.remote(num_cpus=1)(FheActor)
            .options(namespace=NAMESPACE)
            .remote(ray.put({model: server_part(bundle)}), 2**40)
        )
        points = [ray.get(actor.stats.remote())]
        with tempfile.TemporaryDirectory(prefix="molcloak-scale-keys-") as tmp:
            for i in range(key_sets):
                client = PrivateClient(bundle, Path(tmp) / str(i))
                client.keygen()
                ct = client.encrypt(client.featurize(["CCO"])[0])
                keys = ray.put(client.evaluation_keys())
                ray.get(actor.run.remote(model, f"{i:032x}", ct, [keys]))
                points.append(ray.get(actor.stats.remote()))
        base = points[0]["rss_bytes"]
        per_set = (points[-1]["rss_bytes"] - base) / max(1, key_sets)
        return {
            "points": [
                {"key_sets": p["key_sets"], "rss_mb": round(p["rss_bytes"] / 2**20, 1)} for p in points
            ],
            "circuits_loaded_rss_mb": round(base / 2**20, 1),
            "mb_per_key_set": round(per_set / 2**20, 1),
        }
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="Where to write the results.")
    p.add_argument("--data", type=Path, default=DATA, help="CSV with a smiles column (read in place).")
    p.add_argument("--limit", type=int, default=2000, help="First N molecules of --data.")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="The served bundle (molcloak demo makes it).")
    p.add_argument("--model", default=None, help="Model name (default: the bundle's).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4, help="Batches in flight.")
    p.add_argument("--key-sets", type=int, default=4, help="Key sets loaded in the memory check.")
    p.add_argument("--skip-cluster", action="store_true", help="Skip the simulated multi-node cluster.")
    args = p.parse_args(argv)
    from molcloak.pipeline.bundle import load_manifest, part_dir

    args.model = args.model or load_manifest(part_dir(args.bundle, "server"), "server").name
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray").setLevel(logging.ERROR)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="molcloak-scale-") as tmp:
        runner = Runner(args, Path(tmp))
        machine = {"executors": {}}
        machine["executors"]["processes"] = runner.measure("processes", "processes", [])
        machine["executors"]["ray"] = runner.measure("ray (local)", "ray", [])
        ray_mps, proc_mps = (machine["executors"][k]["molecules_per_s"] for k in ("ray", "processes"))
        machine["ray_overhead"] = round(1 - ray_mps / proc_mps, 3)
        cluster = None if args.skip_cluster else cluster_scaling(runner)
    memory = actor_memory(args.bundle, args.model, args.key_sets)
    result = {
        "command": "python -m molcloak.evaluation.scale_check "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "data": {"file": str(args.data), "molecules": args.limit, "invalid": runner.invalid},
        "model": args.model,
        "client": {"batch_size": args.batch_size, "concurrency": args.concurrency},
        "this_machine": machine,
        "simulated_cluster": cluster,
        "actor_memory": memory,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
