"""Plaintext references for the panel: what a user gets from a few lines of scikit-learn.

- `rf_ecfp4`: RandomForest (500 trees) on ECFP4 (Morgan radius 2, 2048 bits);
- `rf_rdkit2d`: RandomForest on the RDKit 2D descriptors (`rdkit.Chem.Descriptors`, the full list);
- `rf_both`: RandomForest on both, side by side;
- `linear`: logistic regression (classification) or ridge (regression) on the standardized RDKit 2D
  descriptors.

The features are computed with RDKit directly, not with molcloak's featurizers, once per molecule and
file in a run (`FeatureCache`). A descriptor that fails for a molecule, or is not finite, is imputed by
the median of its training values (0 when no training molecule has one); finite values beyond
float32's range are clipped to +-1e30 (scikit-learn's trees work in float32). A multi-label task gets
one model per task, trained on that task's labelled training molecules. Scores go through
`molcloak.pipeline.metrics.score`, like every other number of the project.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from molcloak.pipeline.metrics import score
from molcloak.pipeline.tasks import TaskSpec

REFERENCES = ("rf_ecfp4", "rf_rdkit2d", "rf_both", "linear")
LABELS = {
    "rf_ecfp4": "RF ECFP4",
    "rf_rdkit2d": "RF RDKit2D",
    "rf_both": "RF both",
    "linear": "linear",
}
RANDOM_FORESTS = ("rf_ecfp4", "rf_rdkit2d", "rf_both")
ECFP_RADIUS, ECFP_BITS = 2, 2048
CLIP = 1e30


@dataclass
class MolFeatures:
    """Per-molecule features of one file, rows in the dataset's order."""

    ecfp4: np.ndarray  # (n, 2048) uint8
    rdkit2d: np.ndarray  # (n, n_descriptors) float64, NaN where a descriptor failed or is not finite
    descriptor_names: tuple[str, ...]
    seconds: float


def ecfp4(mols: list) -> np.ndarray:
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=ECFP_RADIUS, fpSize=ECFP_BITS)
    return np.asarray([gen.GetFingerprintAsNumPy(m) for m in mols], dtype=np.uint8).reshape(
        len(mols), ECFP_BITS
    )


def descriptor_names() -> tuple[str, ...]:
    from rdkit.Chem import Descriptors

    return tuple(name for name, _ in Descriptors.descList)


def rdkit2d(mols: list) -> np.ndarray:
    """Every descriptor of `rdkit.Chem.Descriptors.descList`; NaN where one fails or is not finite."""
    from rdkit.Chem import Descriptors

    names = descriptor_names()
    out = np.full((len(mols), len(names)), np.nan)
    for i, mol in enumerate(mols):
        values = Descriptors.CalcMolDescriptors(mol, missingVal=np.nan, silent=True)
        out[i] = [_finite(values.get(name)) for name in names]
    return out


def _finite(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return np.nan
    return v if np.isfinite(v) else np.nan


def molecule_features(smiles: list[str]) -> MolFeatures:
    from rdkit import Chem, RDLogger

    start = time.perf_counter()
    # the descriptors warn about odd molecules ([H+]; NaN is the answer), RemoveHs about lone hydrogens: off
    # for the whole process, as in molcloak's featurizers (re-enabling here let later parsing flood the screen)
    RDLogger.DisableLog("rdApp.*")
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    bad = [s for s, m in zip(smiles, mols) if m is None]
    if bad:  # the data loader canonicalized every SMILES with RDKit: this does not happen
        raise ValueError(f"RDKit could not parse {len(bad)} loaded SMILES, e.g. {bad[0]!r}")
    return MolFeatures(ecfp4(mols), rdkit2d(mols), descriptor_names(), time.perf_counter() - start)


class FeatureCache:
    """Features per file and molecule, computed once in a run and shared by the seeds."""

    def __init__(self):
        self._files: dict[str, tuple[list[str], MolFeatures]] = {}

    def get(self, key: str, smiles: list[str]) -> MolFeatures:
        hit = self._files.get(key)
        if hit is None or hit[0] != smiles:
            hit = (list(smiles), molecule_features(list(smiles)))
            self._files[key] = hit
        return hit[1]


def impute(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Training medians for the NaNs of both parts; clip to +-1e30. Returns (train, test, report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: median NaN -> 0 below
        median = np.nanmedian(train, axis=0)
    median = np.where(np.isfinite(median), median, 0.0)
    report = {
        "imputed_train_values": int(np.isnan(train).sum()),
        "imputed_test_values": int(np.isnan(test).sum()),
        "columns_with_missing": int(np.isnan(np.vstack([train, test])).any(axis=0).sum()),
    }
    fill = lambda X: np.clip(np.where(np.isnan(X), median, X), -CLIP, CLIP)  # noqa: E731
    return fill(train), fill(test), report


# ---------------------------------------------------------------- models


def _estimator(name: str, classification: bool, trees: int, seed: int):
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "linear":
        model = LogisticRegression(max_iter=5000) if classification else Ridge(alpha=1.0)
        return make_pipeline(StandardScaler(), model)
    cls = RandomForestClassifier if classification else RandomForestRegressor
    return cls(n_estimators=trees, n_jobs=2, random_state=seed)


def _proba(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities (n, n_classes), zero for a class the training labels did not have."""
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(model.classes_, dtype=int)] = model.predict_proba(X)
    return out


def fit_predict(
    name: str,
    task: TaskSpec,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    trees: int,
    seed: int,
) -> np.ndarray:
    """Predictions in `metrics.score`'s format: probabilities (n, classes), values (n,), or for a
    multi-label task the probability of 1 per task (n, tasks)."""
    if task.kind == "multilabel":
        out = np.empty((len(X_test), len(task.tasks)))
        for j in range(len(task.tasks)):
            have = ~np.isnan(y_train[:, j])
            y = y_train[have, j].astype(np.int64)
            if len(np.unique(y)) < 2:  # one class only among the labelled: predict its rate
                out[:, j] = float(np.mean(y)) if len(y) else 0.5
                continue
            model = _estimator(name, True, trees, seed).fit(X_train[have], y)
            out[:, j] = _proba(model, X_test, 2)[:, 1]
        return out
    if task.kind == "multitarget":
        raise ValueError("multi-target regression has no panel reference; describe one target per entry")
    if task.is_classification:
        model = _estimator(name, True, trees, seed).fit(X_train, y_train)
        return _proba(model, X_test, task.n_outputs)
    return np.asarray(_estimator(name, False, trees, seed).fit(X_train, y_train).predict(X_test), dtype=float)


def reference_inputs(feats: MolFeatures, train: np.ndarray, test: np.ndarray) -> tuple[dict, dict]:
    """{name: (X_train, X_test)} of the four references, and the imputation report."""
    d_train, d_test, report = impute(feats.rdkit2d[train], feats.rdkit2d[test])
    e_train, e_test = feats.ecfp4[train].astype(np.float32), feats.ecfp4[test].astype(np.float32)
    inputs = {
        "rf_ecfp4": (e_train, e_test),
        "rf_rdkit2d": (d_train, d_test),
        "rf_both": (np.hstack([e_train, d_train]), np.hstack([e_test, d_test])),
        "linear": (d_train, d_test),
    }
    return inputs, report


def run_references(
    task: TaskSpec,
    feats: MolFeatures,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
    trees: int = 500,
    names: tuple[str, ...] = REFERENCES,
    on_done: Callable[[str, float], None] | None = None,
) -> dict:
    """Each reference trained on the `train` rows and scored on the `test` rows:
    {name: {"label", "metrics", "seconds", "config"}, "_imputation": report}."""
    inputs, report = reference_inputs(feats, train, test)
    out: dict = {}
    for name in names:
        start = time.perf_counter()
        X_train, X_test = inputs[name]
        preds = fit_predict(name, task, X_train, y[train], X_test, trees, seed)
        seconds = time.perf_counter() - start
        out[name] = {
            "label": LABELS[name],
            "metrics": score(task, y[test], preds),
            "seconds": seconds,
            "config": _describe(name, task, trees, seed, X_train.shape[1]),
        }
        if on_done:
            on_done(name, seconds)
    out["_imputation"] = report
    return out


def _describe(name: str, task: TaskSpec, trees: int, seed: int, n_features: int) -> dict:
    if name == "linear":
        model = "LogisticRegression(max_iter=5000)" if task.is_classification else "Ridge(alpha=1.0)"
        return {"model": f"StandardScaler + {model}", "features": "rdkit2d", "n_features": n_features}
    features = {"rf_ecfp4": "ecfp4", "rf_rdkit2d": "rdkit2d", "rf_both": "ecfp4+rdkit2d"}[name]
    return {
        "model": f"RandomForest(n_estimators={trees}, n_jobs=2, random_state={seed})",
        "features": features,
        "n_features": n_features,
    }
