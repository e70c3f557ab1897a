"""A plaintext teacher the owner keeps, whose soft outputs the quantized student also learns from.

ChemXor made its encrypted models feasible by distillation: a strong plaintext model on rich
features labels the training molecules with probabilities (or values), and the small network that
will run in FHE is trained on those as well as on the true labels (`TrainConfig.distill` weighs the
two). The teacher never leaves the owner and is never compiled.

Its training-row outputs are out-of-bag predictions (each molecule scored by the trees that did not
see it), so they carry the teacher's generalization, not its memory of the labels. Per task kind:
class probabilities (binary, multi-class), per-task probabilities of label 1 (multi-label: one forest
per task on its labelled molecules), values in the task's units (regression, multi-target).
"""

from __future__ import annotations

import numpy as np

from .data import Dataset
from .errors import ConfigError

# kind -> the RandomForest's features: rich plaintext features, as the teacher is never encrypted.
# "rf-both" is the panel's strongest reference on descriptor-driven assays (ECFP4 + RDKit 2D)
TEACHERS = {"rf": "physchem+morgan:r=2,n=2048", "rf-both": "rdkit2d+morgan:r=2,n=2048"}
# `fit --teacher auto`'s teacher: the one whose descriptors match the student's (`matched_teacher`)
MATCHED = "matched"


def matched_teacher(features: str | None) -> str:
    """The teacher for a student on `features` under `--teacher auto`: `rf-both` (RDKit 2D + ECFP4) for a
    student on RDKit 2D descriptors, `rf` (physchem + ECFP4) for any other. tox21's kernel machine on RDKit 2D
    (scaffold seeds 0-2, session 35): 0.772 / 0.766 / 0.769 FHE-simulated distilled from `rf-both`, against
    0.768 / 0.765 / 0.765 on the labels and 0.768 from `rf` on seed 0; in float, `rf-both` beat `rf` on 6 of
    8 RDKit 2D students (session 14). Students on other features keep `rf`: nothing measured says otherwise."""
    if not features:  # tabular columns: no descriptors to match
        return "rf"
    from .featurize import FeaturizerSpec

    return "rf-both" if any(p.kind == "rdkit2d" for p in FeaturizerSpec.parse(features).parts) else "rf"


def teacher_outputs(
    ds: Dataset, train: np.ndarray, kind: str = "rf", seed: int = 0, trees: int = 300, raw=None
) -> np.ndarray:
    """Soft targets for the rows `train` of `ds`: out-of-bag outputs of a RandomForest fitted on them.
    `raw`: the `raw_features` of every row for `TEACHERS[kind]`, when the caller has them (a search
    teaching on several subsets of the same molecules computes them once)."""
    if kind not in TEACHERS:
        raise ConfigError(f"unknown teacher {kind!r}; expected one of {', '.join(TEACHERS)} (or none)")
    X = _teacher_features(ds, train, TEACHERS[kind], raw)
    y = ds.y[train]
    if ds.task.is_multitask:
        columns = [_oob(X, y[:, j], ds.task.kind == "multilabel", seed, trees) for j in range(y.shape[1])]
        return np.column_stack([c[:, 1] if c.ndim == 2 else c for c in columns])
    out = _oob(X, y, ds.task.is_classification, seed, trees, n_classes=ds.task.n_outputs)
    return out


def _teacher_features(ds: Dataset, train: np.ndarray, features: str, raw=None) -> np.ndarray:
    from .featurize import FeaturizerSpec, raw_features

    if ds.is_tabular:
        return ds.inputs(train)
    spec = FeaturizerSpec.parse(features)
    raw = raw[train] if raw is not None else raw_features(spec, ds.inputs(train))
    return spec.fit_raw(raw).transform_raw(raw)


def _oob(X, y, classify: bool, seed: int, trees: int, n_classes: int = 2) -> np.ndarray:
    """Out-of-bag outputs on the labelled rows; rows without a label (NaN) get the forest's prediction."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    have = ~np.isnan(np.asarray(y, dtype=np.float64))
    cls = RandomForestClassifier if classify else RandomForestRegressor
    forest = cls(n_estimators=trees, oob_score=True, n_jobs=2, random_state=seed, min_samples_leaf=1)
    forest.fit(X[have], y[have].astype(np.int64) if classify else y[have])
    if classify:
        columns = forest.classes_.astype(int)
        out = np.zeros((len(X), n_classes))
        # a row no tree left out (rare with hundreds of trees) gets uniform probabilities
        out[np.ix_(np.flatnonzero(have), columns)] = np.nan_to_num(
            forest.oob_decision_function_, nan=1 / len(columns)
        )
        if (~have).any():
            out[np.ix_(np.flatnonzero(~have), columns)] = forest.predict_proba(X[~have])
        return out
    out = np.empty(len(X))
    out[have] = forest.oob_prediction_
    if (~have).any():
        out[~have] = forest.predict(X[~have])
    return out
