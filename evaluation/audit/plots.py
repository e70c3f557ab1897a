"""Matplotlib figures of an audit report: ROC and PR curves, calibration or predicted-vs-true, subgroups."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_plots(report: dict, plot_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    rows, task = report["rows"], report["model"]["task"]
    figures = {}
    if task["kind"] in ("regression", "binary", "multiclass"):
        y = np.array([r["y"] for r in rows])
        pred = np.array([r["prediction"] for r in rows], dtype=np.float64)
        if task["kind"] == "regression":
            figures["scatter"] = _scatter(plt, y, pred, task, report)
        else:
            figures["roc_pr"] = _roc_pr(plt, y, pred, task["labels"], report)
            figures["calibration"] = _calibration(plt, report["calibration"])
    if report["subgroups"]:
        figures["subgroups"] = _subgroups(plt, report)

    paths = {}
    for key, fig in figures.items():
        paths[key] = plot_dir / f"{key}.png"
        fig.savefig(paths[key], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def _roc_pr(plt, y, p, labels, report):
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
    classes = [1] if len(labels) == 2 else range(len(labels))
    m = report["metrics"]
    for c in classes:
        yc, pc = (y == c).astype(int), p[:, c]
        if yc.min() == yc.max():
            continue
        fpr, tpr, _ = roc_curve(yc, pc)
        prec, rec, _ = precision_recall_curve(yc, pc)
        name = f"{labels[c]}" if len(classes) > 1 else f"positive class '{labels[c]}'"
        ax1.plot(fpr, tpr, drawstyle="steps-post", label=name)
        ax2.plot(rec, prec, drawstyle="steps-post", label=name)
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC, AUC {fmt(m['roc_auc']['value'])} {ci(m['roc_auc'])}",
    )
    ax2.set(
        xlabel="recall",
        ylabel="precision",
        title=f"precision-recall, AP {fmt(m['pr_auc']['value'])} {ci(m['pr_auc'])}",
    )
    for ax in (ax1, ax2):
        ax.legend(loc="lower right" if ax is ax1 else "lower left", fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    fig.suptitle(f"{report['model']['name']}: {len(y)} test molecules, decrypted FHE predictions")
    return fig


def _calibration(plt, cal):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    bins = cal["bins"]
    x = [b["mean_predicted"] for b in bins]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot(x, [b["observed"] for b in bins], "o-", label="audit")
    for b in bins:
        ax.annotate(
            str(b["n"]),
            (b["mean_predicted"], b["observed"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    ax.set(
        xlabel=f"mean predicted ({cal['kind']})",
        ylabel="observed frequency",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        title=f"calibration, ECE {cal['expected_calibration_error']:.3f} (n per bin)",
    )
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _scatter(plt, y, v, task, report):
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, v, s=10, alpha=0.6)
    lo, hi = float(min(y.min(), v.min())), float(max(y.max(), v.max()))
    ax.plot([lo, hi], [lo, hi], ":", color="grey")
    m = report["metrics"]
    units = f" ({task['units']})" if task.get("units") else ""
    ax.set(
        xlabel=f"true {task['target']}{units}",
        ylabel=f"predicted{units}",
        title=f"RMSE {fmt(m['rmse']['value'])} {ci(m['rmse'])}, R² {fmt(m['r2']['value'])}",
    )
    return fig


def _subgroups(plt, report):
    groupings = report["subgroups"]
    fig, axes = plt.subplots(
        len(groupings),
        1,
        figsize=(8, 1.2 + 0.45 * sum(len(r) for r in groupings.values())),
        squeeze=False,
        gridspec_kw={"height_ratios": [max(len(r), 1) for r in groupings.values()]},
    )
    whole_key = report["primary_metric"]
    whole = report["metrics"][whole_key]["value"]
    for ax, (grouping, rows) in zip(axes[:, 0], groupings.items()):
        names, values, errs, colors = [], [], [[], []], []
        for r in rows:
            m = r["metrics"][r["primary"]]
            value = m["value"] if m["value"] is not None else np.nan
            names.append(
                f"{r['group']} (n={r['n']}{', ' + r['primary'] if r['primary'] != whole_key else ''})"
            )
            values.append(value)
            errs[0].append(0 if m["low"] is None else max(value - m["low"], 0))
            errs[1].append(0 if m["high"] is None else max(m["high"] - value, 0))
            colors.append("tab:red" if r["significant"] else ("lightgrey" if r["too_small"] else "tab:blue"))
        ax.barh(names, values, xerr=errs, color=colors, capsize=3)
        if whole is not None:
            ax.axvline(whole, color="black", linestyle="--", linewidth=1)
        ax.invert_yaxis()
        ax.set_title(grouping, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(
        f"{whole_key} with 95% CI (dashed: whole test set; red: differs significantly; grey: n < 10)"
    )
    fig.tight_layout()
    return fig


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ci(m: dict) -> str:
    """'[low, high]' of a metric or difference dict, 'n/a' without an interval."""
    return "n/a" if m.get("low") is None else f"[{fmt(m['low'])}, {fmt(m['high'])}]"
