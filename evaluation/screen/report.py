"""The end of a screen: invalid.csv, the summary (counts, rate, top-k, histograms), Parquet, reports.

Everything is computed from DIR/predictions.csv read in chunks, so a library of any size is
summarized in constant memory. report.html embeds the histogram (PNG) and is rendered like the
audit's report (`evaluation.audit.report`), report.md links it, summary.json holds every number.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from molcloak.evaluation.audit.plots import fmt
from molcloak.evaluation.audit.render import render_html, render_markdown

CHUNK_ROWS = 50_000
BINS = 20


def columns(task) -> list[str]:
    """The header of predictions.csv for a model's task."""
    if task.is_multitask:
        return ["index", "smiles", *task.tasks, "error"]
    probs = [f"p_{label}" for label in task.labels] if task.is_classification else []
    return ["index", "smiles", "prediction", *probs, "error"]


def score_columns(task) -> list[str]:
    """What the top-k and the histograms rank: the positive class's probability (binary), each class's
    (multiclass), the value (regression), each task's probability of 1 or value (multi-task)."""
    if task.is_multitask:
        return list(task.tasks)
    if task.kind == "binary":
        return [f"p_{task.labels[1]}"]
    return [f"p_{label}" for label in task.labels] if task.is_classification else ["prediction"]


def read_predictions(path: Path, task):
    """predictions.csv in chunks (pandas DataFrames): text columns as text, scores as floats (NaN for
    an invalid row)."""
    import pandas as pd

    scores = [c for c in columns(task) if c not in ("index", "smiles", "prediction", "error")]
    if not task.is_classification:
        scores.append("prediction")
    dtypes = {c: (float if c in scores else str) for c in columns(task)} | {"index": int}
    return pd.read_csv(
        path, dtype=dtypes, keep_default_na=False, na_values={c: [""] for c in scores}, chunksize=CHUNK_ROWS
    )


def finish(state, backend, config, total: int) -> dict:
    """Write invalid.csv, Parquet (with pyarrow), the plots and reports; return the summary."""
    out, task = state.out, backend.client.task
    path = out / "predictions.csv"
    invalid = write_invalid(path, out / "invalid.csv", task)
    summary = summarize(path, task, config.top)
    sessions = state.meta["sessions"]
    scored_rows, seconds = sum(s["rows_scored"] for s in sessions), sum(s["seconds"] for s in sessions)
    summary.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        model={**state.meta["identity"]["model"], "where": backend.where, "task": task.to_dict()},
        library={"path": str(config.library), "sha256": state.meta["identity"]["library_sha256"]},
        rows=total,
        invalid_rows=invalid[:20],
        timing={
            "sessions": sessions,
            "rows_scored": scored_rows,
            "seconds": seconds,
            "molecules_per_second": scored_rows / seconds if seconds else None,
        },
    )
    files = {"predictions": path, "invalid": out / "invalid.csv"}
    if write_parquet(path, out / "predictions.parquet", task):
        files["parquet"] = out / "predictions.parquet"
    files["histogram"] = histogram_png(summary, out / "plots" / "histogram.png")
    blocks = _blocks(summary, files["histogram"].relative_to(out).as_posix())
    files.update(html=out / "report.html", markdown=out / "report.md", json=out / "summary.json")
    files["html"].write_text(render_html(blocks, out, title="molcloak screen"))
    files["markdown"].write_text(render_markdown(blocks))
    summary["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(summary, indent=1))
    return summary


def write_invalid(path: Path, target: Path, task) -> list[dict]:
    """invalid.csv (row, value, reason) from predictions.csv; returns the first 20 invalid rows."""
    first: list[dict] = []
    with target.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "value", "reason"])
        for chunk in read_predictions(path, task):
            bad = chunk[chunk["error"] != ""]
            writer.writerows(zip(bad["index"], bad["smiles"], bad["error"]))
            first += [
                {"row": int(r), "value": v, "reason": e}
                for r, v, e in zip(bad["index"], bad["smiles"], bad["error"])
            ][: 20 - len(first)]
    return first


def summarize(path: Path, task, top: int) -> dict:
    """Counts, the top `top` molecules per score column, and a histogram per score column; two passes
    over predictions.csv, each in chunks."""
    import pandas as pd

    scored = invalid = 0
    best = {c: pd.DataFrame() for c in score_columns(task)}
    lo = {c: np.inf for c in best}
    hi = {c: -np.inf for c in best}
    for chunk in read_predictions(path, task):
        ok = chunk[chunk["error"] == ""]
        scored, invalid = scored + len(ok), invalid + len(chunk) - len(ok)
        for c in best:
            if len(ok):
                lo[c], hi[c] = min(lo[c], ok[c].min()), max(hi[c], ok[c].max())
            best[c] = pd.concat([best[c], ok.nlargest(top, c, keep="first")]).nlargest(top, c, keep="first")
    edges = {c: _edges(task, lo[c], hi[c]) for c in best}
    counts = {c: np.zeros(len(e) - 1, dtype=np.int64) for c, e in edges.items()}
    for chunk in read_predictions(path, task):
        ok = chunk[chunk["error"] == ""]
        for c in counts:
            counts[c] += np.histogram(ok[c].to_numpy(), edges[c])[0]
    return {
        "scored": scored,
        "invalid": invalid,
        "top_k": top,
        "top": {c: _top_rows(best[c], c, task) for c in best},
        "histograms": {c: {"edges": edges[c].tolist(), "counts": counts[c].tolist()} for c in counts},
    }


def _edges(task, lo: float, hi: float) -> np.ndarray:
    if task.is_classification:
        return np.linspace(0.0, 1.0, BINS + 1)  # probabilities
    if not np.isfinite(lo):
        lo = hi = 0.0
    return np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)


def _top_rows(df, column: str, task) -> list[dict]:
    rows = []
    for rec in df.to_dict("records"):
        row = {"index": int(rec["index"]), "smiles": rec["smiles"], "score": float(rec[column])}
        if "prediction" in rec and column != "prediction":
            row["prediction"] = rec["prediction"]  # the predicted class
        rows.append(row)
    return rows


def write_parquet(path: Path, target: Path, task) -> bool:
    """predictions.parquet from predictions.csv, chunk by chunk, when pyarrow is importable."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    target.unlink(missing_ok=True)
    writer = None
    try:
        for chunk in read_predictions(path, task):
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            writer = writer or pq.ParquetWriter(str(target), table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    return writer is not None


def histogram_png(summary: dict, target: Path) -> Path:
    """One histogram of the predictions per score column (bars from the streamed counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = summary["histograms"]
    fig, axes = plt.subplots(len(hists), 1, figsize=(7, 2.6 * len(hists)), squeeze=False)
    for ax, (column, h) in zip(axes[:, 0], hists.items()):
        edges = np.asarray(h["edges"])
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", edgecolor="white")
        ax.set(xlabel=_axis_name(column), ylabel="molecules")
    fig.suptitle(f"{summary['scored']} molecules screened, decrypted FHE predictions")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


def _axis_name(column: str) -> str:
    return f"predicted probability of '{column[2:]}'" if column.startswith("p_") else f"predicted {column}"


def _blocks(s: dict, histogram: str) -> list[tuple]:
    m, t = s["model"], s["timing"]
    b: list[tuple] = [("h1", f"Private screen of {Path(s['library']['path']).name} with model {m['name']}")]
    b.append(
        (
            "p",
            f"Model {m['name']} ({m['task']['kind']}, client part {m['client_fingerprint']}) run on "
            f"ciphertexts at {m['where']} ({m['source']}). Library {s['library']['path']} (sha256 "
            f"{s['library']['sha256'][:16]}): {s['rows']} rows, {s['scored']} screened, "
            f"{s['invalid']} invalid; "
            f"{fmt(t['molecules_per_second'], 2)} molecules/s over {len(t['sessions'])} session(s).",
        )
    )
    for column, rows in s["top"].items():
        b += [
            ("h2", f"Top {len(rows)} by {_axis_name(column)}"),
            (
                "table",
                ["rank", "row", "SMILES", column]
                + (["prediction"] if rows and "prediction" in rows[0] else []),
                [
                    [str(i), str(r["index"]), r["smiles"], fmt(r["score"])]
                    + ([str(r["prediction"])] if "prediction" in r else [])
                    for i, r in enumerate(rows, start=1)
                ],
            ),
        ]
    b += [("h2", "Predictions"), ("img", histogram, "histogram")]
    b += [("h2", "Invalid rows"), ("p", f"{s['invalid']} rows (all of them in invalid.csv)")]
    if s["invalid_rows"]:
        rows = [[str(r["row"]), r["value"], r["reason"]] for r in s["invalid_rows"]]
        b.append(("table", ["row", "value", "reason"], rows))
    b.append(("p", "predictions.csv and this report hold decrypted predictions: keep them private."))
    return b


def print_summary(summary: dict, console) -> None:
    """The screen as a person reads it in a terminal (rich console)."""
    from rich.table import Table

    t = summary["timing"]
    console.print(
        f"{summary['scored']} molecules screened; invalid rows: {summary['invalid']} "
        f"(listed in {summary['files']['invalid']}); {fmt(t['molecules_per_second'], 2)} molecules/s "
        f"over {len(t['sessions'])} session(s)",
        highlight=False,
    )
    for column, rows in summary["top"].items():
        table = Table(title=f"top {len(rows)} by {_axis_name(column)}")
        for col in ("rank", "row", "SMILES", column):
            table.add_column(col)
        for i, r in enumerate(rows, start=1):
            table.add_row(str(i), str(r["index"]), r["smiles"], fmt(r["score"]))
        console.print(table)
    f = summary["files"]
    console.print(f"predictions: {f['predictions']}; report: {f['html']}", highlight=False)
