"""Model outputs -> user-facing predictions -> metrics. One code path for float, simulated and FHE outputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import TaskSpec


@dataclass(frozen=True)
class TargetScaler:
    """Regression targets are learned standardized; the client maps outputs back to units."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, y: np.ndarray) -> "TargetScaler":
        std = float(np.std(y))
        return cls(float(np.mean(y)), std if std > 1e-12 else 1.0)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.mean) / self.std

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype=np.float64) * self.std + self.mean


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_predictions(task: TaskSpec, raw: np.ndarray, scaler: TargetScaler | None = None) -> np.ndarray:
    """Class probabilities (n, n_classes) for classification, values in task units (n,) for regression."""
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float64))
    if task.is_classification:
        return softmax(raw)
    return (scaler or TargetScaler()).inverse(raw[:, 0])


def score(task: TaskSpec, y_true: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """ROC-AUC and accuracy (classification) or RMSE, MAE and R² (regression)."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true)
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
    elif len(present) == preds.shape[1]:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, preds, multi_class="ovr"))
    return out


def describe(task: TaskSpec, pred_row: np.ndarray | float) -> str:
    """One prediction as a person reads it: 'low (p=0.93)' or '-2.41 logS'."""
    if task.is_classification:
        k = int(np.argmax(pred_row))
        return f"{task.labels[k]} (p={float(pred_row[k]):.2f})"
    return f"{float(pred_row):.2f} {task.units}".strip()
