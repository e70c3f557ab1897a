"""Audit metrics with bootstrap 95% confidence intervals, subgroup analysis and the claims check.

Every metric is vectorized over a leading axis of bootstrap replicates: it takes arrays of shape
(B, n) (and (B, n, k) for class probabilities) and returns shape (B,). A point estimate is the
same function on one replicate, the original rows. Tests check the values against scikit-learn
and SciPy. Undefined values (ROC-AUC of a single-class sample, say) are NaN, reported as null.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy.stats import rankdata

CLASSIFICATION_METRICS = ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "f1", "mcc", "brier")
REGRESSION_METRICS = ("rmse", "mae", "r2", "spearman")
LOWER_IS_BETTER = {"brier", "rmse", "mae"}
CLAIM_SOURCES = ("fhe_simulate", "quantized", "float")  # manifest metrics, the served model's claim first
MIN_GROUP = 10  # smaller subgroups get numbers but are never flagged


REGRESSION_KINDS = ("regression", "multitarget")


def primary_metric(kind: str) -> str:
    return "rmse" if kind in REGRESSION_KINDS else "roc_auc"


# ---------------------------------------------------------------- vectorized metrics


def _safe_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), np.nan)


def roc_auc_binary(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Mann-Whitney form of the ROC-AUC (ties count one half), as sklearn's trapezoidal AUC."""
    pos = y == 1
    n1 = pos.sum(-1)
    n0 = y.shape[-1] - n1
    ranks = rankdata(s, axis=-1)
    u = (ranks * pos).sum(-1) - n1 * (n1 + 1) / 2
    return _safe_div(u, n1 * n0 * 1.0)


def average_precision(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """sum_n (R_n - R_{n-1}) P_n over distinct score thresholds, as sklearn's average_precision_score."""
    order = np.argsort(-s, axis=-1, kind="stable")
    ss = np.take_along_axis(s, order, -1)
    yy = np.take_along_axis(y, order, -1).astype(np.float64)
    tp = np.cumsum(yy, -1)
    precision = tp / np.arange(1, s.shape[-1] + 1)
    end = np.concatenate(
        [ss[..., :-1] != ss[..., 1:], np.ones(ss.shape[:-1] + (1,), bool)], -1
    )  # last of a tie
    tp_end = np.maximum.accumulate(np.where(end, tp, 0.0), -1)
    previous = np.concatenate([np.zeros(tp.shape[:-1] + (1,)), tp_end[..., :-1]], -1)
    return _safe_div(np.where(end, (tp - previous) * precision, 0.0).sum(-1), tp[..., -1])


def confusion(y: np.ndarray, yhat: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) counts, rows = true class, columns = predicted class."""
    b = np.arange(y.shape[0])[:, None]
    flat = (b * k * k + y * k + yhat).ravel()
    return np.bincount(flat, minlength=y.shape[0] * k * k).reshape(y.shape[0], k, k)


def _from_confusion(c: np.ndarray) -> dict[str, np.ndarray]:
    k = c.shape[-1]
    n = c.sum((1, 2)).astype(np.float64)
    diag = np.diagonal(c, axis1=1, axis2=2).astype(np.float64)
    true_k, pred_k = c.sum(2).astype(np.float64), c.sum(1).astype(np.float64)
    recall = _safe_div(diag, true_k)
    with np.errstate(invalid="ignore"):
        balanced = np.nanmean(np.where(true_k > 0, recall, np.nan), 1)
    f1_k = np.nan_to_num(_safe_div(2 * diag, true_k + pred_k), nan=0.0)  # sklearn: zero_division -> 0
    if k == 2:
        f1 = f1_k[:, 1]
    else:
        present = (true_k + pred_k) > 0
        f1 = (f1_k * present).sum(1) / np.maximum(present.sum(1), 1)
    cov = diag.sum(1) * n - (true_k * pred_k).sum(1)
    denom = np.sqrt((n**2 - (pred_k**2).sum(1)) * (n**2 - (true_k**2).sum(1)))
    mcc = np.nan_to_num(_safe_div(cov, denom), nan=0.0)  # sklearn returns 0 when undefined
    return {"accuracy": diag.sum(1) / n, "balanced_accuracy": balanced, "f1": f1, "mcc": mcc}


def classification_metrics(y: np.ndarray, p: np.ndarray, yhat: np.ndarray) -> dict[str, np.ndarray]:
    """y (B, n) class ids, p (B, n, k) probabilities, yhat (B, n) predicted class ids."""
    k = p.shape[-1]
    out = {}
    if k == 2:
        out["roc_auc"] = roc_auc_binary(y, p[..., 1])
        out["pr_auc"] = average_precision(y, p[..., 1])
    else:  # one-vs-rest, macro average
        out["roc_auc"] = np.mean([roc_auc_binary((y == c).astype(int), p[..., c]) for c in range(k)], 0)
        out["pr_auc"] = np.mean([average_precision((y == c).astype(int), p[..., c]) for c in range(k)], 0)
    out.update(_from_confusion(confusion(y, yhat, k)))
    onehot = np.eye(k)[y]
    brier = ((p - onehot) ** 2).sum(
        -1
    )  # multi-class Brier; binary: the usual (p1 - y)^2 counted for both classes
    out["brier"] = brier.mean(-1) / 2 if k == 2 else brier.mean(-1)
    return {name: out[name] for name in CLASSIFICATION_METRICS}


def regression_metrics(y: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    err = v - y
    ss_tot = ((y - y.mean(-1, keepdims=True)) ** 2).sum(-1)
    ry, rv = rankdata(y, axis=-1), rankdata(v, axis=-1)
    ry, rv = ry - ry.mean(-1, keepdims=True), rv - rv.mean(-1, keepdims=True)
    return {
        "rmse": np.sqrt((err**2).mean(-1)),
        "mae": np.abs(err).mean(-1),
        "r2": 1 - _safe_div((err**2).sum(-1), ss_tot),
        "spearman": _safe_div((ry * rv).sum(-1), np.sqrt((ry**2).sum(-1) * (rv**2).sum(-1))),
    }


def make_sample(task, y: np.ndarray, pred: np.ndarray):
    """The metrics' view of an audit: a `Sample`, or a `MultiTaskSample` for multi-task models."""
    if task.is_multitask:
        return MultiTaskSample(task.kind, list(task.tasks), y, pred)
    return Sample(task.kind, y, pred)


class Sample:
    """Targets and predictions of the scored rows; `metrics(idx)` evaluates replicates of row indices."""

    def __init__(self, kind: str, y: np.ndarray, pred: np.ndarray):
        self.kind = kind
        self.y = np.asarray(y)
        self.pred = np.asarray(pred, dtype=np.float64)
        if kind != "regression":
            self.y = self.y.astype(np.int64)
            self.yhat = self.pred.argmax(-1)

    def __len__(self) -> int:
        return len(self.y)

    def metrics(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        if self.kind == "regression":
            return regression_metrics(self.y[idx], self.pred[idx])
        return classification_metrics(self.y[idx], self.pred[idx], self.yhat[idx])

    def point(self, rows: np.ndarray | None = None) -> dict[str, float]:
        rows = np.arange(len(self)) if rows is None else rows
        return {k: _num(v[0]) for k, v in self.metrics(rows[None, :]).items()}


class MultiTaskSample:
    """Several tasks on the same rows, a label missing (NaN) where not measured: each task's metrics on its
    labelled rows (as training scores them) as "metric[task]", and their mean over the tasks where the
    metric is defined as "metric". A bootstrap replicate resamples rows (all tasks together); each task
    then uses the replicate's rows that carry its label."""

    def __init__(self, kind: str, tasks: list[str], y: np.ndarray, pred: np.ndarray):
        self.kind, self.tasks = kind, tasks
        self.y, self.pred = np.asarray(y, dtype=np.float64), np.asarray(pred, dtype=np.float64)
        self.have = ~np.isnan(self.y)
        self.names = REGRESSION_METRICS if kind == "multitarget" else CLASSIFICATION_METRICS

    def __len__(self) -> int:
        return len(self.y)

    def _task(self, j: int, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Task j's metrics on each replicate's labelled rows; replicates of equal length go together."""
        keep = self.have[idx, j]
        counts = keep.sum(1)
        out = {name: np.full(len(idx), np.nan) for name in self.names}
        for m in np.unique(counts):
            which = np.flatnonzero(counts == m)
            if m < 2:  # no metric is defined on fewer than two labels (training skips such tasks too)
                continue
            rows = idx[which][keep[which]].reshape(len(which), m)
            y, v = self.y[rows, j], self.pred[rows, j]
            if self.kind == "multitarget":
                got = regression_metrics(y, v)
            else:
                got = classification_metrics(
                    y.astype(np.int64), np.stack([1 - v, v], -1), (v > 0.5).astype(int)
                )
            for name in self.names:
                out[name][which] = got[name]
        return out

    def metrics(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        per_task = [self._task(j, idx) for j in range(len(self.tasks))]
        out = {}
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a replicate where no task defines a metric
            for name in self.names:
                out[name] = np.nanmean(np.stack([t[name] for t in per_task]), 0)
        for task, t in zip(self.tasks, per_task):
            out.update({f"{name}[{task}]": t[name] for name in self.names})
        return out

    def point(self, rows: np.ndarray | None = None) -> dict[str, float]:
        rows = np.arange(len(self)) if rows is None else rows
        return {k: _num(v[0]) for k, v in self.metrics(rows[None, :]).items()}


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _replicates(draw, n_boot: int, width: int):
    """Yield index blocks of at most ~2M entries (bounded memory for big test sets)."""
    chunk = max(1, 2_000_000 // max(width, 1))
    for start in range(0, n_boot, chunk):
        yield draw(min(chunk, n_boot - start))


def _stack(blocks) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for block in blocks:
        for k, v in block.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def _interval(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if len(finite) < max(10, len(values) // 2):
        return {"low": None, "high": None, "n_boot": len(finite)}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_boot": len(finite)}


def with_ci(sample: Sample, n_boot: int, seed: int) -> dict[str, dict]:
    """{metric: {"value", "low", "high", "n_boot"}}: percentile bootstrap over rows."""
    point = sample.point()
    if n_boot <= 0 or len(sample) < 2:
        return {k: {"value": v, "low": None, "high": None, "n_boot": 0} for k, v in point.items()}
    rng = np.random.default_rng(seed)
    n = len(sample)
    boot = _stack(sample.metrics(rng.integers(0, n, (b, n))) for b in _replicates(lambda b: b, n_boot, n))
    return {k: {"value": point[k], **_interval(boot[k])} for k in point}


# ---------------------------------------------------------------- subgroups


def subgroup_table(
    sample: Sample, labels: np.ndarray, n_boot: int, seed: int, order: list[str] | None = None
) -> list[dict]:
    """Metrics of every subgroup, each compared with the whole test set.

    Stratified bootstrap: each replicate resamples the subgroup and the rest separately, so the
    subgroup metric and the whole-set metric of one replicate are paired; a subgroup differs
    significantly when the 95% interval of (subgroup - whole) excludes 0 for the primary metric
    (ROC-AUC, or accuracy where a subgroup holds one class only; RMSE for regression).
    """
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    whole = sample.point()
    out = []
    present = set(labels)
    for value in [v for v in order if v in present] if order else sorted(present, key=str):
        inside, outside = np.flatnonzero(labels == value), np.flatnonzero(labels != value)
        point = sample.point(inside)
        primary = primary_metric(sample.kind)
        if point.get(primary) is None and sample.kind not in REGRESSION_KINDS:
            primary = "accuracy"
        row = {
            "group": str(value),
            "n": len(inside),
            "primary": primary,
            "too_small": len(inside) < MIN_GROUP,
            "metrics": {k: {"value": v, "low": None, "high": None, "n_boot": 0} for k, v in point.items()},
            "difference": {},
        }
        if n_boot > 0 and len(outside) and len(inside) > 1:
            _compare(sample, row, whole, inside, outside, n_boot, rng)
        d = row["difference"].get(primary, {})
        row["significant"] = bool(
            not row["too_small"] and d.get("low") is not None and (d["low"] > 0 or d["high"] < 0)
        )
        out.append(row)
    return out


def _compare(sample: Sample, row: dict, whole: dict, inside, outside, n_boot: int, rng) -> None:
    def draw(b):
        return rng.choice(inside, (b, len(inside))), rng.choice(outside, (b, len(outside)))

    sub, full = [], []
    for a, c in _replicates(draw, n_boot, len(inside) + len(outside)):
        sub.append(sample.metrics(a))
        full.append(sample.metrics(np.concatenate([a, c], 1)))
    sub, full = _stack(sub), _stack(full)
    for k, m in row["metrics"].items():
        m.update(_interval(sub[k]))
        diff = _interval(sub[k] - full[k])
        diff["value"] = None if m["value"] is None or whole[k] is None else m["value"] - whole[k]
        row["difference"][k] = diff


def property_bins(smiles: list[str]) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Built-in subgroups from the molecules themselves (computed on the auditor's machine): (labels, bin order)."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    from molcloak.pipeline.splits import murcko_scaffold

    mols = [Chem.MolFromSmiles(s) for s in smiles]
    mw = np.array([Descriptors.MolWt(m) for m in mols])
    logp = np.array([Descriptors.MolLogP(m) for m in mols])
    scaffolds = [murcko_scaffold(s) for s in smiles]
    counts = {s: scaffolds.count(s) for s in set(scaffolds)}

    def scaffold_bin(s: str) -> str:
        if not s:
            return "acyclic"
        c = counts[s]
        return (
            "unique scaffold" if c == 1 else ("scaffold shared by 2-4" if c < 5 else "scaffold shared by 5+")
        )

    return {
        "molecular weight": _bins(mw, [200, 300, 400], "MW", "{:g}"),
        "logP": _bins(logp, [1, 3, 5], "logP", "{:g}"),
        "scaffold frequency": (
            np.array([scaffold_bin(s) for s in scaffolds], dtype=object),
            ["acyclic", "unique scaffold", "scaffold shared by 2-4", "scaffold shared by 5+"],
        ),
    }


def _bins(values: np.ndarray, edges: list[float], name: str, fmt: str) -> tuple[np.ndarray, list[str]]:
    names = [f"{name} < {fmt.format(edges[0])}"]
    names += [f"{name} {fmt.format(a)}-{fmt.format(b)}" for a, b in itertools.pairwise(edges)]
    names += [f"{name} >= {fmt.format(edges[-1])}"]
    return np.array([names[i] for i in np.searchsorted(edges, values, side="right")], dtype=object), names


# ---------------------------------------------------------------- calibration and claims


def calibration_bins(sample: Sample, n_bins: int = 10) -> dict:
    """Reliability curve: binary uses p(positive class), multiclass the top-class confidence."""
    if sample.kind == "binary":
        conf, hit = sample.pred[:, 1], sample.y == 1
    else:
        conf, hit = sample.pred.max(1), sample.yhat == sample.y
    which = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = which == b
        if m.any():
            bins.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "n": int(m.sum()),
                    "mean_predicted": float(conf[m].mean()),
                    "observed": float(hit[m].mean()),
                }
            )
    ece = sum(abs(b["observed"] - b["mean_predicted"]) * b["n"] for b in bins) / max(len(conf), 1)
    return {
        "kind": "positive class" if sample.kind == "binary" else "top-class confidence",
        "bins": bins,
        "expected_calibration_error": float(ece),
    }


def claims_check(claimed: dict, audited: dict[str, dict]) -> list[dict]:
    """Compare every metric the owner's manifest states with the audit; flag a claim outside the audit's 95% CI.

    A stated metric the audit cannot check (not computed, undefined on this test set, not a number) is
    listed with `checked` False and the reason, never silently left out."""
    out = []
    for source in CLAIM_SOURCES:
        for metric, value in (claimed.get(source) or {}).items():
            got = audited.get(metric)
            reason = _unchecked(metric, value, got)
            if reason:
                out.append(
                    {
                        "source": source,
                        "metric": metric,
                        "claimed": value if _is_number(value) else None,
                        "audited": None,
                        "low": None,
                        "high": None,
                        "gap": None,
                        "flagged": False,
                        "checked": False,
                        "verdict": reason,
                    }
                )
                continue
            low, high = got["low"], got["high"]
            outside = low is not None and not (low <= value <= high)
            better_claim = value < got["value"] if _base(metric) in LOWER_IS_BETTER else value > got["value"]
            out.append(
                {
                    "source": source,
                    "metric": metric,
                    "claimed": float(value),
                    "audited": got["value"],
                    "low": low,
                    "high": high,
                    "gap": got["value"] - float(value),
                    "flagged": bool(outside),
                    "checked": True,
                    "verdict": ("claim better than audited" if better_claim else "audit better than claim")
                    if outside
                    else "consistent",
                }
            )
    return out


def _base(metric: str) -> str:
    """'rmse[logS]' -> 'rmse'."""
    return metric.split("[", 1)[0]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _unchecked(metric: str, value, got: dict | None) -> str:
    if not _is_number(value):
        return f"not checked: the manifest states {value!r}, not a number"
    if got is None:
        return "not checked: the audit does not compute this metric"
    if got["value"] is None:
        return "not checked: undefined on this test set (e.g. one class only)"
    return ""
