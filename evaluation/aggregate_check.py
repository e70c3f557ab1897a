"""What an aggregate-only audit costs and how close its metrics are: the same test set audited normally and
aggregate-only, in the same run, on the same machine (both halves in this process).

    python -m molcloak.evaluation.aggregate_check --bundle demo/bundle --out aggregate_check.json

The bundle is copied (its owner part included) and the aggregate program is added to the copy. Reported:
the program's PBS count, bit width and key size; wall and CPU time of both audits (CPU time counts every
thread; compare the ratio, absolute times drift with load); ROC-AUC, accuracy and F1 of both, and the
decrypted counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _test_csv(bundle: Path, path: Path, n: int | None) -> int:
    import pandas as pd

    from molcloak.pipeline.bundle import load_checkpoint, load_manifest

    ckpt, task = load_checkpoint(bundle), load_manifest(bundle).task
    y = ckpt.y_test.reshape(-1).astype(int)[:n]
    pd.DataFrame({"smiles": ckpt.smiles_test[:n], task.target: y}).to_csv(path, index=False)
    return len(y)


def check(bundle: Path, rows: int, thresholds: int, n: int | None, work: Path) -> dict:
    from molcloak.evaluation.audit.aggregate import AggregateAuditConfig, aggregate_audit_command
    from molcloak.evaluation.audit.engine import AuditConfig, audit_command
    from molcloak.pipeline.aggregate import add_aggregate

    copy = work / "bundle"
    shutil.copytree(bundle, copy)
    spec, build = _timed(lambda: add_aggregate(copy, rows, thresholds, force=True))
    csv = work / "test.csv"
    n_rows = _test_csv(copy, csv, n)
    quiet = lambda *_: None  # noqa: E731
    normal, normal_t = _timed(
        lambda: audit_command(
            AuditConfig(csv, work / "normal", None, bootstrap=200), quiet, bundle=copy, key_dir=work / "keys"
        )
    )
    agg, agg_t = _timed(
        lambda: aggregate_audit_command(
            AggregateAuditConfig(csv, work / "aggregate", bootstrap=200),
            quiet,
            bundle=copy,
            key_dir=work / "keys",
        )
    )
    pick = ("roc_auc", "accuracy", "f1")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bundle": str(bundle),
        "molecules": n_rows,
        "load_average": os.getloadavg(),
        "program": {
            "rows_per_chunk": spec.rows,
            "buckets": spec.buckets,
            "chunks": agg["chunks"],
            **{
                k: spec.circuit.get(k)
                for k in ("pbs_count", "max_bit_width", "serialized_evaluation_key_bytes")
            },
            "build": build,
        },
        "normal_audit": {**normal_t, **{k: normal["metrics"][k]["value"] for k in pick}},
        "aggregate_audit": {
            **agg_t,
            "keygen_s": agg["seconds"]["keygen"],
            **{k: agg["metrics"][k]["value"] for k in pick},
            "counts": agg["counts"],
        },
        "ratio_cpu": agg_t["cpu_s"] / normal_t["cpu_s"],
        "ratio_wall": agg_t["wall_s"] / normal_t["wall_s"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("demo/bundle"))
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--thresholds", type=int, default=8)
    p.add_argument("--n", type=int, default=None, help="first N test molecules (default: all)")
    p.add_argument("--out", type=Path, default=Path("aggregate_check.json"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="molcloak-aggregate-check-") as tmp:
        result = check(a.bundle, a.rows, a.thresholds, a.n, Path(tmp))
    a.out.write_text(json.dumps(result, indent=2, default=lambda v: np.asarray(v).tolist()))
    print(json.dumps({k: v for k, v in result.items() if k != "aggregate_audit"}, indent=2, default=str))


if __name__ == "__main__":
    main()
