"""The server's fast path against Concrete's runtime on a bundle: same bytes? how much faster? (JSON)

For a deployed bundle whose circuit is linear (a kernel or linear machine), fresh keys encrypt `--runs` random
feature rows; each ciphertext is evaluated by Concrete ML's `FHEModelServer` (Concrete's runtime) and by
`PrivateServer` (the fast path, `pipeline/linear_fast_path.py`), interleaved so that load hits both alike. It
reports whether every output was byte-identical, both medians and their ratio, and the load-time self-check's
cost. Run it with nothing else on the machine:

    python -m molcloak.evaluation.bench.fast_path --bundle runs/bace-bundle --runs 10 --json fast_path.json

With `--product OUTPUTSxINPUTS` (repeatable) it times the fast path's matrix product alone on random masks of
`--lwe-dimension`, both ways it can run: numpy's uint64 product and float64 BLAS on the masks' 32-bit halves
(`LinearFastPath.product`), after checking they agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def compare(bundle: Path, runs: int, seed: int = 0) -> dict:
    from molcloak.pipeline.fhe_client import PrivateClient
    from molcloak.pipeline.fhe_server import PrivateServer

    start = time.perf_counter()
    server = PrivateServer(bundle)
    load_s = time.perf_counter() - start
    fast = server.fast_path
    if fast is None:
        return {"bundle": str(bundle), "engine": server.engine, "load_s": load_s}
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="molcloak-fastpath-") as keys_dir:
        client = PrivateClient(bundle, keys_dir)
        client.keygen()
        keys_bytes = client.evaluation_keys()
        keys = server.load_keys(keys_bytes)
        n = fast.inputs
        rows = [rng.random(n) for _ in range(runs + 1)]  # in [0, 1): in range for bits and descriptors alike
        concrete_runs, fast_runs, identical = [], [], 0
        for i, row in enumerate(rows):
            ciphertext = client.encrypt(np.asarray(row, dtype=np.float64))
            t0 = time.perf_counter()
            theirs = server.run(ciphertext, keys, concrete_only=True)
            t1 = time.perf_counter()
            ours = server.run(ciphertext, keys)
            t2 = time.perf_counter()
            if i:  # the first pair warms up
                concrete_runs.append(t1 - t0)
                fast_runs.append(t2 - t1)
                identical += ours == theirs
                np.testing.assert_array_equal(client.decrypt(ours), client.decrypt(theirs))
    concrete_s, fast_s = statistics.median(concrete_runs), statistics.median(fast_runs)
    return {
        "bundle": str(bundle),
        "engine": server.engine,
        "features": str(server.manifest.featurizer),
        "encrypted_inputs": n,
        "outputs": fast.outputs,
        "lwe_dimension": fast.lwe_dimension,
        "runs": runs,
        "byte_identical": f"{identical}/{runs}",
        "concrete_runtime_median_ms": concrete_s * 1e3,
        "fast_path_median_ms": fast_s * 1e3,
        "speedup": concrete_s / fast_s,
        "server_load_with_self_check_s": load_s,
        "load_avg_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def product(outputs: int, inputs: int, d: int, runs: int, seed: int = 0) -> dict:
    """Median and minimum ms of the uint64 product and of the float64 halves for one shape (equal outputs), and
    which of them the fast path takes for it."""
    from molcloak.pipeline.linear_fast_path import Layout, LinearFastPath

    rng = np.random.default_rng(seed)
    layout = Layout(b"", 0, b"")
    path = LinearFastPath(rng.integers(-8, 8, size=(inputs, outputs)), d, layout, layout)
    full = rng.integers(0, 2**64 - 1, size=(inputs, d + 1), dtype=np.uint64, endpoint=True)
    if not np.array_equal(path.product(full, halves=True), path.product(full, halves=False)):
        raise AssertionError(f"{outputs}x{inputs}: the float halves differ from the uint64 product")
    times: dict[str, list[float]] = {"uint64": [], "float_halves": []}
    for _ in range(runs):  # interleaved, so that load hits both alike
        for way, halves in (("uint64", False), ("float_halves", True)):
            start = time.perf_counter()
            path.product(full, halves=halves)
            times[way].append(time.perf_counter() - start)
    out = {"outputs": outputs, "inputs": inputs, "lwe_dimension": d, "runs": runs}
    out["fast_path_takes"] = "float_halves" if path.halves else "uint64"
    for way, ts in times.items():
        if ts:
            out[f"{way}_median_ms"], out[f"{way}_min_ms"] = statistics.median(ts) * 1e3, min(ts) * 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="a bundle (repeatable)")
    parser.add_argument(
        "--product",
        action="append",
        default=[],
        help="time the product alone for OUTPUTSxINPUTS, e.g. 12x2048",
    )
    parser.add_argument("--lwe-dimension", type=int, default=1014, help="for --product (default 1014)")
    parser.add_argument("--runs", type=int, default=10, help="timed encryptions per bundle (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not args.bundle and not args.product:
        parser.error("give --bundle DIR or --product OUTPUTSxINPUTS")
    try:
        shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.product]
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            raise ValueError
    except ValueError:
        parser.error(f"--product {args.product}: use OUTPUTSxINPUTS, e.g. 12x2048")
    results = [compare(b, args.runs) for b in args.bundle]
    results += [product(o, i, args.lwe_dimension, args.runs) for o, i in shapes]
    text = json.dumps(
        {
            "command": "python -m molcloak.evaluation.bench.fast_path " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_avg_1min": os.getloadavg()[0],
            "results": results,
        },
        indent=2,
    )
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
