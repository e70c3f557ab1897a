"""Load check of the FHE server: N concurrent clients x M encrypted predictions on loopback.

Starts `molcloak serve` as a real process, gives every client its own keys, checks every
decrypted result against the owner's FHE simulation, samples the server's memory (all its
processes), and prints JSON: throughput, p50/p95 latency, 4xx/5xx counts, peak memory.

    python -m molcloak.evaluation.load_check --bundles demo --model sol-low --out load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from molcloak.pipeline.bundle import load_checkpoint
from molcloak.pipeline.errors import MolcloakError, UnknownModelError
from molcloak.pipeline.metrics import fhe_equals_simulation
from molcloak.pipeline.predict import predict_local
from molcloak.pipeline.serving.http_api import find_bundles
from molcloak.pipeline.serving.http_client import RemoteModel
from molcloak.pipeline.serving.process import START_TIMEOUT, ServerProcess


def _tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def simulation_spread(bundle_dir, molecules: list[str], expected: dict) -> float:
    """How far a result may be from the simulation and still be right. With exact rounding: 0 (bit for
    bit). With approximate rounding Concrete draws the off-by-one steps at random, in FHE as in the
    simulation, so the bound is twice the largest difference between two simulations of the same
    molecules (a result decrypted wrongly, e.g. with other keys, is off by far more)."""
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    if (manifest.get("compile") or {}).get("rounding_method") != "approximate":
        return 0.0
    again = predict_local(bundle_dir, molecules, fhe="simulate").predictions
    return 2.0 * max(float(np.max(np.abs(np.asarray(p.raw) - np.asarray(expected[p.smiles])))) for p in again)


def run(
    bundles: Path,
    model: str,
    clients: int,
    per_client: int,
    workers: int,
    key_cache_mb: int,
    start_timeout: float = START_TIMEOUT,
) -> dict:
    found = find_bundles(bundles)
    if model not in found:
        raise UnknownModelError(
            f"model {model!r} is not in {bundles}; available: {', '.join(found)}; pass one with --model"
        )
    bundle_dir = found[model][0]

    ckpt = load_checkpoint(bundle_dir)
    molecules = ckpt.smiles_test[: clients * per_client]
    expected = {p.smiles: p.raw for p in predict_local(bundle_dir, molecules, fhe="simulate").predictions}
    tolerance = simulation_spread(bundle_dir, molecules, expected)

    tmp = Path(tempfile.mkdtemp(prefix="molcloak-load-"))
    server = ServerProcess(
        bundles,
        tmp / "state",
        workers=workers,
        log=tmp / "server.log",
        extra_args=["--key-cache-mb", str(key_cache_mb)],
        timeout=start_timeout,
    )
    url = server.url
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(server.pid))
            time.sleep(0.2)

    try:
        idle_rss = _tree_rss(server.pid)
        threading.Thread(target=sample, daemon=True).start()
        remotes = [RemoteModel(url, model, key_dir=tmp / f"client{i}") for i in range(clients)]
        setup_start = time.perf_counter()
        threads = [threading.Thread(target=r.key_id) for r in remotes]  # keygen + upload, concurrently
        [t.start() for t in threads]
        [t.join() for t in threads]
        setup_s = time.perf_counter() - setup_start
        latencies, wrong, failures, equal = [], [], [], []

        def client(i: int):
            for j in range(per_client):
                smi = molecules[(i * per_client + j) % len(molecules)]
                t0 = time.perf_counter()
                try:
                    pred = remotes[i].predict([smi]).predictions[0]
                except Exception as exc:  # counted and reported, never hidden
                    failures.append(f"client {i}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if fhe_equals_simulation([pred.raw], [expected[smi]])[0]:
                    equal.append(smi)
                elif np.max(np.abs(np.asarray(pred.raw) - np.asarray(expected[smi]))) > tolerance:
                    wrong.append(smi)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - start
        stop.set()
        log = (tmp / "server.log").read_text()
        statuses = [
            int(w)
            for line in log.splitlines()
            if '" ' in line and "HTTP/1.1" in line
            for w in line.rsplit('" ', 1)[1].split()[:1]
            if w.isdigit()
        ]
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # ~0.8 GB of keys per run
    lat = sorted(latencies)
    return {
        "model": model,
        "clients": clients,
        "predictions_per_client": per_client,
        "workers": workers,
        "predictions": len(latencies),
        "wrong_results": len(wrong),
        "equal_to_simulation": len(equal),
        "tolerance": tolerance,
        "client_failures": failures[:10],
        "http_5xx": sum(s >= 500 for s in statuses),
        "http_4xx": sum(400 <= s < 500 for s in statuses),
        "throughput_per_s": len(latencies) / wall if wall else 0.0,
        "wall_s": wall,
        "key_setup_s": setup_s,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
        "server_rss_idle_mb": idle_rss / 2**20,
        "server_rss_peak_mb": peak[0] / 2**20,
        "key_cache_cap_mb": key_cache_mb,
        "worker_restarts": health.get("worker_restarts"),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bundles", type=Path, default=Path("demo"), help="folder of bundles to serve (default: demo)"
    )
    ap.add_argument("--model", default="sol-low")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--key-cache-mb", type=int, default=1024, help="server's key cache cap")
    ap.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT,
        help="seconds to wait for the server to answer /health",
    )
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        result = run(
            args.bundles,
            args.model,
            args.clients,
            args.per_client,
            args.workers,
            args.key_cache_mb,
            args.start_timeout,
        )
    except MolcloakError as exc:
        print(f"load_check: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = result["wrong_results"] == 0 and result["http_5xx"] == 0 and not result["client_failures"]
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not sys.exit: after an FHE simulation, Concrete's atexit hook (terminate_df_parallelization)
    # ends the interpreter with status 0 whatever the status asked for
    os._exit(status)
