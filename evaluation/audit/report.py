"""The audit report: all numbers as a dict (report.json), then report.md and report.html with plots.

`build_report` turns the stored predictions into metrics; `write_reports` renders a report dict
(it needs nothing else, so a report can be re-rendered from report.json). Markdown and HTML are
rendered from one list of blocks; the HTML embeds the PNGs, the Markdown links them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import metrics as am
from .plots import ci, fmt, make_plots
from .render import json_default, render_html, render_markdown
from .testset import group_labels, target_columns

REPORT_FORMAT = 1


def build_report(config, state, backend, test) -> dict:
    client = backend.client
    task, manifest = client.task, client.manifest
    raws = np.array([state.done[r] for r in test.rows], dtype=np.float64)
    preds = client.predictions(raws)
    sample = am.make_sample(task, test.y, preds)
    groupings = {f"column {g}": group_labels(v) for g, v in (test.groups or {}).items()}
    if test.smiles:
        groupings.update(am.property_bins(test.smiles))
    metrics = am.with_ci(sample, config.bootstrap, config.seed)
    subgroups = {
        name: am.subgroup_table(sample, labels, config.bootstrap, config.seed + i + 1, order)
        for i, (name, (labels, order)) in enumerate(groupings.items())
    }
    sessions = state.meta["sessions"]
    scored_rows = sum(s["rows_scored"] for s in sessions)
    scoring_seconds = sum(s["seconds"] for s in sessions)
    report = {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            **state.meta["identity"]["model"],
            "where": backend.where,
            "task": task.to_dict(),
            "circuit": manifest.circuit,
        },
        "test_set": {
            "path": str(config.test_set),
            "sha256": test.sha256,
            "smiles_col": config.smiles_col if test.smiles else None,
            "feature_columns": None if test.smiles else list(client.featurizer.columns),
            "target_col": ",".join(target_columns(config, task)),
            "group_col": getattr(config, "group_col", None),
            "rows": test.n_rows,
            "scored": len(test.rows),
            "invalid": len(test.invalid),
            "duplicate_molecules": len(test.smiles) - len(set(test.smiles)),
        },
        "invalid_rows": [{"row": p.row, "value": p.value, "reason": p.skipped_reason} for p in test.invalid],
        "bootstrap": {"replicates": config.bootstrap, "seed": config.seed, "confidence": 0.95},
        "primary_metric": am.primary_metric(task.kind),
        "units": metric_units(task),
        "metrics": metrics,
        "subgroups": subgroups,
        "flagged_subgroups": [
            {
                "grouping": g,
                "group": r["group"],
                "metric": r["primary"],
                "difference": r["difference"][r["primary"]],
            }
            for g, rows in subgroups.items()
            for r in rows
            if r["significant"]
        ],
        "claims": am.claims_check(manifest.metrics, metrics),
        "timing": {
            "sessions": sessions,
            "rows_scored": scored_rows,
            "seconds": scoring_seconds,
            "seconds_per_molecule": scoring_seconds / scored_rows if scored_rows else None,
        },
    }
    if task.kind in ("binary", "multiclass"):
        cm = am.confusion(sample.y[None], sample.yhat[None], len(task.labels))[0]
        report["confusion_matrix"] = {
            "labels": list(task.labels),
            "counts": cm.tolist(),
            "rows": "true class",
            "columns": "predicted class",
        }
        report["calibration"] = am.calibration_bins(sample)
    columns = None if test.smiles else list(client.featurizer.columns)
    report["rows"] = [
        _row(task, r, t, yy, p, raw, {g: str(v[0][j]) for g, v in groupings.items()})
        | ({"smiles": test.smiles[j]} if test.smiles else {"features": dict(zip(columns, test.records[j]))})
        for j, (r, t, yy, p, raw) in enumerate(zip(test.rows, test.targets, test.y, preds, raws))
    ]
    return report


def metric_units(task) -> dict[str, str]:
    """Units of the metrics that have them (RMSE and MAE of regression tasks, in the target's units)."""
    if task.kind == "regression" and task.units:
        return {m: task.units for m in ("rmse", "mae")}
    if task.kind == "multitarget":
        return {
            f"{m}[{t}]": task.unit_of(j)
            for j, t in enumerate(task.tasks)
            for m in ("rmse", "mae")
            if task.unit_of(j)
        }
    return {}


def _row(task, row, target, y, pred, raw, groups) -> dict:
    out = {"row": row, "target": target, "raw": raw.tolist(), "groups": groups}
    if task.is_multitask:
        out["y"] = {t: (None if np.isnan(v) else float(v)) for t, v in zip(task.tasks, y)}
        out["prediction"] = {t: float(v) for t, v in zip(task.tasks, pred)}
    elif task.is_classification:
        out.update(y=y.item(), prediction=pred.tolist(), label=task.labels[int(np.argmax(pred))])
    else:
        out.update(y=y.item(), prediction=float(pred))
    return out


# ---------------------------------------------------------------- rendering


def write_reports(report: dict, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(report, out / "plots")
    if "explain" in report:
        from .explain_report import explain_files

        plots.update(explain_files(report["explain"], out))
    blocks = _blocks(report, {k: p.relative_to(out).as_posix() for k, p in plots.items()})
    files = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
    files["json"].write_text(json.dumps(report, indent=1, default=json_default))
    files["markdown"].write_text(render_markdown(blocks))
    files["html"].write_text(render_html(blocks, out))
    return {k: str(v) for k, v in {**files, **plots}.items()}


def metrics_rows(report: dict) -> list[list[str]]:
    units = report.get("units", {})
    return [
        [name + (f" ({units[name]})" if name in units else ""), fmt(m["value"]), ci(m)]
        for name, m in report["metrics"].items()
    ]


def _blocks(report: dict, plots: dict[str, str]) -> list[tuple]:
    m, t = report["model"], report["test_set"]
    b: list[tuple] = [("h1", f"Private audit of model {m['name']}")]
    b.append(
        (
            "p",
            (
                f"Model {m['name']} ({m['task']['kind']}, client part {m['client_fingerprint']}) run on ciphertexts at "
                f"{m['where']} ({m['source']}). Test set {t['path']} (sha256 {t['sha256'][:16]}): {t['rows']} rows, "
                f"{t['scored']} scored, {t['invalid']} invalid. 95% confidence intervals from "
                f"{report['bootstrap']['replicates']} bootstrap replicates (seed {report['bootstrap']['seed']})."
            ),
        )
    )
    b += [("h2", "Metrics"), ("table", ["metric", "value", "95% CI"], metrics_rows(report))]
    if "confusion_matrix" in report:
        cm = report["confusion_matrix"]
        b += [
            ("h3", "Confusion matrix (rows: true, columns: predicted)"),
            (
                "table",
                ["true \\ predicted"] + cm["labels"],
                [[lab] + list(map(str, row)) for lab, row in zip(cm["labels"], cm["counts"])],
            ),
            (
                "p",
                (
                    f"Calibration ({report['calibration']['kind']}): expected calibration error "
                    f"{fmt(report['calibration']['expected_calibration_error'])}."
                ),
            ),
        ]
    for key in ("roc_pr", "calibration", "scatter"):
        if key in plots:
            b.append(("img", plots[key], key))
    b += [
        ("h2", "Claims check"),
        (
            "p",
            (
                "Metrics the owner states in the bundle manifest (on the owner's own test split) "
                "against this audit; a claim outside the audit's 95% CI is flagged."
            ),
        ),
    ]
    b.append(
        (
            "table",
            ["claim", "metric", "claimed", "audited", "95% CI", "gap", "verdict"],
            [
                [
                    c["source"],
                    c["metric"],
                    fmt(c["claimed"]),
                    fmt(c["audited"]),
                    ci(c),
                    "n/a" if c["gap"] is None else f"{c['gap']:+.3f}",
                    ("**FLAG** " if c["flagged"] else "") + c["verdict"],
                ]
                for c in report["claims"]
            ],
        )
    )
    b += [
        ("h2", "Subgroups"),
        (
            "p",
            (
                f"Primary metric per subgroup, compared with the whole test set by a stratified bootstrap; "
                f"FLAG = the 95% CI of the difference excludes 0 (groups under {am.MIN_GROUP} molecules are never flagged)."
            ),
        ),
    ]
    if "subgroups" in plots:
        b.append(("img", plots["subgroups"], "subgroups"))
    for grouping, rows in report["subgroups"].items():
        b += [
            ("h3", grouping),
            (
                "table",
                ["group", "n", "metric", "value", "95% CI", "difference", "difference CI", "flag"],
                [_subgroup_row(r) for r in rows],
            ),
        ]
    b += [
        ("h2", "Invalid rows"),
        ("p", "none")
        if not report["invalid_rows"]
        else (
            "table",
            ["row", "value", "reason"],
            [[str(r["row"]), r["value"], r["reason"]] for r in report["invalid_rows"]],
        ),
    ]
    tm = report["timing"]
    b += [
        ("h2", "Timing"),
        (
            "p",
            (
                f"{tm['rows_scored']} molecules scored in {len(tm['sessions'])} session(s), "
                f"{fmt(tm['seconds'], 1)} s of scoring (key generation included), "
                f"{fmt(tm['seconds_per_molecule'], 2)} s per molecule."
            ),
        ),
    ]
    if "explain" in report:
        from .explain_report import explain_blocks

        b += explain_blocks(report["explain"], plots)
    b.append(
        ("p", "report.json holds every number and the decrypted prediction of every row: keep it private.")
    )
    return b


def _subgroup_row(r: dict) -> list[str]:
    k = r["primary"]
    v, d = r["metrics"][k], r["difference"].get(k, {})
    flag = "FLAG" if r["significant"] else ("too small" if r["too_small"] else "")
    diff = "n/a" if d.get("value") is None else f"{d['value']:+.3f}"
    return [r["group"], str(r["n"]), k, fmt(v["value"]), ci(v), diff, ci(d), flag]


def print_summary(report: dict, console) -> None:
    """The audit as a person reads it in a terminal (rich console)."""
    from rich.table import Table

    m, t = report["model"], report["test_set"]
    table = Table(title=f"private audit of {m['name']} on {t['scored']} test molecules")
    for col in ("metric", "value", "95% CI"):
        table.add_column(col)
    for row in metrics_rows(report):
        table.add_row(*row)
    console.print(table)
    if "confusion_matrix" in report:
        cm = report["confusion_matrix"]
        console.print(
            "confusion matrix (rows true, columns predicted): "
            + "; ".join(f"{lab}: {row}" for lab, row in zip(cm["labels"], cm["counts"])),
            highlight=False,
        )
    flagged = [c for c in report["claims"] if c["flagged"]]
    checked = [c for c in report["claims"] if c.get("checked", True)]
    console.print(
        f"claims check: {len(checked) - len(flagged)} of {len(checked)} checked manifest claims within the "
        f"audit's 95% CI ({len(report['claims']) - len(checked)} stated metrics not checkable, see the report)",
        highlight=False,
    )
    for c in flagged:
        console.print(
            f"  [red]FLAG[/red] {c['source']} {c['metric']}: claimed {fmt(c['claimed'])}, audited "
            f"{fmt(c['audited'])} {ci(c)} ({c['verdict']})",
            highlight=False,
        )
    groups = report["flagged_subgroups"]
    console.print(
        f"subgroups differing significantly from the whole set: {len(groups) or 'none'}", highlight=False
    )
    for g in groups:
        d = g["difference"]
        console.print(
            f"  [red]FLAG[/red] {g['grouping']} / {g['group']}: {g['metric']} {d['value']:+.3f} {ci(d)}",
            highlight=False,
        )
    if report["invalid_rows"]:
        console.print(
            f"[yellow]{len(report['invalid_rows'])} invalid rows[/yellow] (listed in the report):",
            highlight=False,
        )
        for r in report["invalid_rows"][:10]:
            console.print(f"  row {r['row']}: {r['reason']}", highlight=False)
    tm = report["timing"]
    console.print(
        f"{tm['rows_scored']} molecules scored in {len(tm['sessions'])} session(s), {fmt(tm['seconds'], 1)} s; "
        f"reports: {report['files']['markdown']}, {report['files']['html']}, {report['files']['json']}",
        highlight=False,
    )
