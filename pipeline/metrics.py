"""Model outputs -> user-facing predictions -> metrics. One code path for float, simulated and FHE outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tasks import TaskSpec


@dataclass(frozen=True)
class TargetScaler:
    """Regression targets are learned standardized; the client maps outputs back to units.

    Multi-target regression keeps one mean and std per task (tuples), fitted on the labels present.
    """

    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        for name in ("mean", "std"):  # lists from a manifest become tuples (hashable, immutable)
            if isinstance(getattr(self, name), (list, np.ndarray)):
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @classmethod
    def fit(cls, y: np.ndarray) -> TargetScaler:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim == 2:
            std = np.nanstd(y, axis=0)
            return cls(
                tuple(map(float, np.nanmean(y, axis=0))), tuple(float(s) if s > 1e-12 else 1.0 for s in std)
            )
        std = float(np.std(y))
        return cls(float(np.mean(y)), std if std > 1e-12 else 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.std)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float64) * np.asarray(self.std) + np.asarray(self.mean)


def fhe_equals_simulation(executed: np.ndarray, simulated: np.ndarray) -> np.ndarray:
    """Per molecule: are the decrypted FHE outputs equal to Concrete's simulation, bit for bit?

    Both are dequantized from integers the same way, so equality is exact (no tolerance). Expect all
    True only with exact rounding at a pinned p_error (the tests use 2^-40); with approximate rounding
    Concrete draws the off-by-one steps at random in the simulation and in FHE, so some rows differ.
    """
    e, s = np.asarray(executed, dtype=np.float64), np.asarray(simulated, dtype=np.float64)
    return np.all(e.reshape(len(e), -1) == s.reshape(len(s), -1), axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def to_predictions(
    task: TaskSpec, raw: np.ndarray, scaler: TargetScaler | None = None, output: str = "logits"
) -> np.ndarray:
    """Class probabilities (n, n_classes) for classification, values in task units (n,) for regression.

    Multi-task: (n, n_tasks) probabilities of label 1 (multilabel) or values in each task's units.
    `output` "class": `raw` holds the 0/1 outputs of a class-only circuit (`output_head`); the
    "probabilities" are then 0 or 1.
    """
    if output == "class":
        from .output_head import class_predictions

        return class_predictions(task, raw)
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float64))
    if task.kind == "multilabel":
        return sigmoid(raw)
    if task.kind == "multitarget":
        return (scaler or TargetScaler()).inverse(raw)
    if task.is_classification:
        return softmax(raw)
    return (scaler or TargetScaler()).inverse(raw[:, 0])


def score(task: TaskSpec, y_true: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """ROC-AUC, accuracy and (binary) F1 of class 1 for classification; RMSE, MAE and R² for regression.

    Multi-task: the same metrics per task as "metric[task]" on the labelled molecules of that
    task (missing labels are left out), and their mean over tasks as "metric".
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true)
    if task.is_multitask:
        return _score_multitask(task, y_true, np.asarray(preds))
    if task.kind == "regression":
        err = preds - y_true
        return {
            "rmse": float(np.sqrt(np.mean(err**2))),
            "mae": float(np.mean(np.abs(err))),
            "r2": float(skm.r2_score(y_true, preds)),
        }
    out = {"accuracy": float(np.mean(preds.argmax(axis=1) == y_true))}
    present = np.unique(y_true)
    if len(present) < 2:
        return out
    if task.kind == "binary":
        out["roc_auc"] = float(skm.roc_auc_score(y_true, preds[:, 1]))
        out["f1"] = float(skm.f1_score(y_true, preds.argmax(axis=1)))
    elif len(present) == preds.shape[1]:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, preds, multi_class="ovr"))
    return out


def _score_multitask(task: TaskSpec, y_true: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    per_task: dict[str, dict[str, float]] = {}
    for j, name in enumerate(task.tasks):
        have = ~np.isnan(y_true[:, j])
        if have.sum() < 2:  # no metric is defined on fewer than two labels
            continue
        if task.kind == "multilabel":
            p = preds[have, j]
            single = TaskSpec(name, "binary", name, labels=task.labels)
            per_task[name] = score(single, y_true[have, j].astype(np.int64), np.column_stack([1 - p, p]))
        else:
            per_task[name] = score(TaskSpec(name, "regression", name), y_true[have, j], preds[have, j])
    metrics = list(dict.fromkeys(k for s in per_task.values() for k in s))
    out = {k: float(np.mean([s[k] for s in per_task.values() if k in s])) for k in metrics}
    out.update({f"{k}[{name}]": v for name, s in per_task.items() for k, v in s.items()})
    return out


def describe(task: TaskSpec, pred_row: np.ndarray | float) -> str:
    """One prediction as a person reads it: 'low (p=0.93)', '-2.41 logS' or 'SOL -2.41 logS, expt -3.10 kcal/mol'."""
    if task.kind == "multilabel":
        return ", ".join(f"{name} p={float(v):.2f}" for name, v in zip(task.tasks, np.ravel(pred_row)))
    if task.kind == "multitarget":
        return ", ".join(
            f"{name} {float(v):.2f} {task.unit_of(j)}".strip()
            for j, (name, v) in enumerate(zip(task.tasks, np.ravel(pred_row)))
        )
    if task.is_classification:
        k = int(np.argmax(pred_row))
        return f"{task.labels[k]} (p={float(pred_row[k]):.2f})"
    return f"{float(pred_row):.2f} {task.units}".strip()
