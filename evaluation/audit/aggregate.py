"""`molcloak audit --aggregate-only`: score a binary model on a secret test set, decrypting only counts.

The test molecules and their labels are encrypted here, in chunks (`aggregate_client.chunks`); the owner's
server (or the bundle's aggregate part in this process) returns, per chunk, the encrypted number of molecules
of each label in each score bucket (`pipeline/aggregate.py`). Summed over the chunks, these counts give the
ROC-AUC (ties within a bucket count one half), the confusion matrix at the model's own decision and the
metrics computed from it, with bootstrap 95% CIs that resample molecules (the counts of a bucket are rows
with equal scores) and the claims check against the owner's manifest. The auditor never sees a score or a
per-molecule class; the owner never sees a molecule or a label.

Reports: aggregate.json and aggregate.md in --out. An aggregate audit is not resumable: its keys live only
for the audit (a rerun starts over; it costs a few minutes on the demo model).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.pipeline.aggregate import check_task
from molcloak.pipeline.aggregate_client import LocalAggregate, chunks
from molcloak.pipeline.errors import DataError
from molcloak.pipeline.fhe_client import PrivateClient

from . import metrics as am
from .testset import featurize_test_set, read_test_set

METRICS = ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "f1", "mcc")  # no Brier: no probabilities


@dataclass(frozen=True)
class AggregateAuditConfig:
    test_set: Path
    out: Path
    target_col: str | None = None
    smiles_col: str = "smiles"
    bootstrap: int = 1000
    seed: int = 0
    skip_invalid: bool = False


def rows_of(counts: np.ndarray, decision: int) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-rows with the counts' labels and bucket scores: (labels, (n, 2) class "probabilities" whose
    argmax is the model's decision, bucket >= `decision`, and whose order is the buckets')."""
    counts = np.clip(np.rint(counts), 0, None).astype(np.int64)  # noisy counts may be negative
    buckets = counts.shape[1]
    label = np.repeat(np.repeat([0, 1], buckets), counts.reshape(-1))
    bucket = np.repeat(np.tile(np.arange(buckets), 2), counts.reshape(-1))
    p1 = 0.5 + (bucket - decision + 0.5) / (2 * buckets)
    return label, np.stack([1 - p1, p1], axis=1)


def count_metrics(counts: np.ndarray, decision: int, n_boot: int, seed: int) -> dict[str, dict]:
    """{metric: {"value", "low", "high", "n_boot"}} from summed counts (2, buckets)."""
    y, pred = rows_of(counts, decision)
    if len(y) == 0:
        raise DataError("the decrypted counts hold no molecule; check the test set and the server's noise")
    full = am.with_ci(am.Sample("binary", y, pred), n_boot, seed)
    return {k: full[k] for k in METRICS}


def confusion(counts: np.ndarray, decision: int) -> dict:
    c = np.clip(np.rint(counts), 0, None).astype(int)
    return {
        "tn": int(c[0, :decision].sum()),
        "fp": int(c[0, decision:].sum()),
        "fn": int(c[1, :decision].sum()),
        "tp": int(c[1, decision:].sum()),
    }


def run_aggregate_audit(
    config: AggregateAuditConfig, runner, model_client: PrivateClient, on_progress
) -> dict:
    """Featurize, encrypt and send every chunk through `runner` (`LocalAggregate` or `RemoteAggregate`),
    sum the decrypted counts and compute the metrics."""
    task = model_client.task
    check_task(task)
    test = read_test_set(config, task, model_client.featurizer)
    X = featurize_test_set(model_client, test, config)
    y = np.asarray(test.y, dtype=np.int64)
    spec = runner.client.spec
    parts = chunks(len(X), spec.rows)
    on_progress(0, len(parts), "keys: generating and uploading the audit's key set")
    start = time.perf_counter()
    runner.start()
    keygen = runner.client.keygen_seconds
    total = np.zeros((2, spec.buckets), dtype=np.int64)
    done = 0

    def one(part: slice) -> np.ndarray:
        rows, labels = runner.client.encrypt(X[part], y[part])
        return runner.client.decrypt(runner.run(rows, labels))

    try:
        with ThreadPoolExecutor(max(1, getattr(runner, "concurrency", 2))) as pool:
            for counts in pool.map(one, parts):
                total += counts
                done += 1
                on_progress(done, len(parts), f"{done} of {len(parts)} chunks")
    finally:
        runner.finish()
    audited = count_metrics(total, spec.decision_bucket, config.bootstrap, config.seed)
    manifest = model_client.manifest
    return {
        "kind": "aggregate-only",
        "model": manifest.name,
        "test_set": str(config.test_set),
        "test_set_sha256": test.sha256,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "invalid_rows": [p.row for p in test.invalid],
        "chunks": len(parts),
        "rows_per_chunk": spec.rows,
        "buckets": spec.buckets,
        "decision_bucket": spec.decision_bucket,
        "epsilon": getattr(runner, "epsilon", 0.0) or 0.0,
        "counts": {"negative": total[0].tolist(), "positive": total[1].tolist()},
        "confusion": confusion(total, spec.decision_bucket),
        "metrics": audited,
        "claims": am.claims_check(manifest.metrics, audited),
        "seconds": {"keygen": keygen, "total": time.perf_counter() - start},
        "evaluation_key_bytes": spec.circuit.get("serialized_evaluation_key_bytes"),
    }


def aggregate_audit_command(
    config: AggregateAuditConfig, on_progress, bundle=None, server=None, model=None, key_dir=None, token=None
) -> dict:
    """Open the model (a bundle with its aggregate part, or a server), run the audit, write the reports."""
    if (bundle is None) == (server is None):
        raise DataError("pass either --bundle DIR (local audit) or --server URL --model NAME (remote audit)")
    if bundle is not None:
        client = PrivateClient(bundle, key_dir)
        report = run_aggregate_audit(config, LocalAggregate(bundle, client), client, on_progress)
    else:
        if not model:
            raise DataError("--server needs --model NAME; list the served models with GET /models")
        from molcloak.pipeline.serving.aggregate_remote import RemoteAggregate
        from molcloak.pipeline.serving.http_client import RemoteModel

        with RemoteModel(server, model, key_dir, token) as remote:
            runner = RemoteAggregate(remote)
            report = run_aggregate_audit(config, runner, remote.client, on_progress)
    report["files"] = write_reports(report, Path(config.out))
    return report


def summary_lines(report: dict) -> list[str]:
    m = report["metrics"]
    noise = f", server noise epsilon {report['epsilon']:g}" if report["epsilon"] else ", no server noise"
    lines = [
        f"aggregate-only audit of {report['model']}: {report['n']} molecules ({report['n_positive']} positive) "
        f"in {report['chunks']} chunk(s) of up to {report['rows_per_chunk']}{noise}; only counts were decrypted",
    ]
    for k in ("roc_auc", "accuracy", "f1", "mcc"):
        v = m[k]
        ci = f" (95% CI {v['low']:.3f}-{v['high']:.3f})" if v["low"] is not None else ""
        lines.append(f"  {k}: {v['value']:.3f}{ci}" if v["value"] is not None else f"  {k}: undefined")
    c = report["confusion"]
    lines.append(
        f"  confusion at the model's decision: TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, FN {c['fn']}"
    )
    flagged = [x for x in report["claims"] if x["flagged"]]
    checked = [x for x in report["claims"] if x["checked"]]
    lines.append(
        f"  claims check: {len(checked) - len(flagged)} of {len(checked)} manifest claims within the 95% CI"
    )
    return lines


def write_reports(report: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "aggregate.json", "markdown": out / "aggregate.md"}
    files["json"].write_text(json.dumps(report, indent=2))
    table = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k, v in report["metrics"].items():
        value = "undefined" if v["value"] is None else f"{v['value']:.3f}"
        ci = f"{v['low']:.3f}-{v['high']:.3f}" if v["low"] is not None else "-"
        table.append(f"| {k} | {value} | {ci} |")
    counts = report["counts"]
    hist = ["| bucket (low to high score) | negatives | positives |", "|---|---|---|"]
    hist += [f"| {i} | {n} | {p} |" for i, (n, p) in enumerate(zip(counts["negative"], counts["positive"]))]
    text = "\n".join(
        [
            f"# Aggregate-only audit of {report['model']}",
            "",
            *summary_lines(report),
            "",
            *table,
            "",
            "Score histogram (what was decrypted; buckets at or above "
            f"{report['decision_bucket']} are the model's positive class):",
            "",
            *hist,
            "",
        ]
    )
    files["markdown"].write_text(text)
    return {k: str(v) for k, v in files.items()}
