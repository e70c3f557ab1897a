"""Feature selection fitted on the training molecules only: the ``select:k=K`` end of a feature spec.

``rdkit2d:scale=quantile+morgan_count:r=2,n=2048+select:k=128`` keeps 128 of the spec's columns, so the
number of encrypted inputs and the first layer's accumulators stay bounded however rich the features.
`fit_selection` sees the training features as the model sees them (imputed and scaled) and:

1. drops constant and near-constant columns: those where fewer than `NEAR_CONSTANT` (1%) of the training
   molecules differ from the column's most frequent value (a Morgan bit set in 0.5% of molecules);
2. drops near-duplicates: scanning the columns in spec order, a column whose |Pearson r| with an earlier
   column still kept exceeds `MAX_CORRELATION` (0.95) on the training molecules is dropped;
3. ranks what remains and keeps the top K, in spec order:
   - with training labels: by the impurity importance of a small seeded ExtraTrees teacher
     (`TEACHER_TREES` trees, sqrt(columns) per split, seed `SEED`) fitted on the training features and
     labels: a classifier for class labels (integer labels, or 0/1 values), a regressor otherwise; with
     several tasks (a 2-D label array, NaN = missing) one teacher per task on its labelled rows, and the
     mean of the per-task importances;
   - without labels (or when no task has two distinct labelled values): by variance, each column
     rescaled to [0, 1] by its training range (a bit set in a fraction p of molecules scores p(1-p)).
   Ties keep the earlier column.

The fitted `Selection` stores the kept column indices (into the spec's columns before selection), their
names, the method and the column counts after each filter; the bundle carries it so a client applies
exactly the same selection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import FeaturizerError

NEAR_CONSTANT = 0.01
MAX_CORRELATION = 0.95
TEACHER_TREES = 100
SEED = 0
SELECT = "select"  # the pseudo-part's name in a spec string
_BLOCK = 512  # columns per block of the correlation and mode scans (bounded memory on wide specs)


@dataclass(frozen=True)
class Selection:
    k: int
    kept: tuple[int, ...] | None = None  # fitted: indices into the columns before selection, ascending
    names: tuple[str, ...] = ()  # fitted: the kept columns' names (checked when a bundle is read)
    method: str = ""  # fitted: how the columns were ranked
    counts: tuple[
        int, ...
    ] = ()  # fitted: columns before selection, after near-constant, after near-duplicate

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise FeaturizerError(f"select: k={self.k!r} must be a positive integer; write e.g. select:k=128")

    def __str__(self) -> str:
        return f"{SELECT}:k={self.k}"

    @property
    def is_fitted(self) -> bool:
        return self.kept is not None

    @classmethod
    def parse(cls, chunk: str, text: str) -> Selection:
        """The ``select:k=K`` chunk of the spec string `text`."""
        _, _, opts = chunk.partition(":")
        k = None
        for opt in filter(None, (o.strip() for o in opts.split(","))):
            key, _, val = (s.strip() for s in opt.partition("="))
            if key != "k" or not val.isdigit() or k is not None:
                raise FeaturizerError(
                    f"select option {opt!r} in {text!r} not understood; select takes k only, e.g. 'select:k=128'"
                )
            k = int(val)
        if k is None:
            raise FeaturizerError(
                f"select in {text!r} needs k, the number of columns to keep; write select:k=128"
            )
        return cls(k)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"k": self.k}
        if self.kept is not None:
            out.update(
                kept=list(self.kept), names=list(self.names), method=self.method, counts=list(self.counts)
            )
        return out

    @classmethod
    def from_dict(cls, d: dict, names: Sequence[str]) -> Selection:
        """Read back `to_dict`; `names` are the spec's columns before selection (checked against the stored ones)."""
        try:
            kept = None if d.get("kept") is None else tuple(int(i) for i in d["kept"])
            sel = cls(
                int(d["k"]),
                kept,
                tuple(str(n) for n in d.get("names", ())),
                str(d.get("method", "")),
                tuple(int(c) for c in d.get("counts", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(
                f"feature selection {d!r} is malformed ({exc}); rebuild the bundle"
            ) from exc
        if kept is not None:
            ok = len(kept) == sel.k and all(0 <= i < len(names) for i in kept)
            if not ok or tuple(names[i] for i in kept) != sel.names:
                raise FeaturizerError(
                    f"feature selection {sel} does not match this featurizer's {len(names)} columns (stored "
                    f"{len(kept)} kept columns named {', '.join(sel.names[:3])}...); the bundle was made "
                    "with another molcloak or RDKit version; rebuild it"
                )
        return sel

    def apply(self, X: np.ndarray) -> np.ndarray:
        return X[:, list(self.kept)]


def fit_selection(sel: Selection, X: np.ndarray, names: Sequence[str], targets: Any = None) -> Selection:
    """`sel` fitted on the training features `X` (n, columns), named `names`, and optional labels `targets`."""
    n, p = X.shape
    if targets is not None and len(targets) != n:
        raise FeaturizerError(
            f"{sel}: {len(targets)} training labels for {n} training molecules; pass the labels of the "
            "training molecules, in the same order"
        )
    varied = np.flatnonzero(_varied(X))
    distinct = varied[_decorrelated(X[:, varied])]
    if sel.k > len(distinct):
        raise FeaturizerError(
            f"{sel}: only {len(distinct)} of the {p} columns remain after dropping {p - len(varied)} "
            f"near-constant and {len(varied) - len(distinct)} near-duplicate (|r| > {MAX_CORRELATION}) columns "
            f"on the {n} training molecules; use k <= {len(distinct)} or richer features"
        )
    Xd = X[:, distinct]
    ranked = _teacher_importance(Xd, targets) if targets is not None else None
    if ranked is None:
        lo, span = Xd.min(axis=0), np.ptp(Xd, axis=0)
        score, method = ((Xd - lo) / span).var(axis=0), "variance"
        if targets is not None:
            method += " (no task has two distinct labelled values)"
    else:
        score, method = ranked
    order = np.lexsort((np.arange(len(distinct)), -score))  # highest score first, ties: earlier column
    kept = tuple(int(i) for i in np.sort(distinct[order[: sel.k]]))
    counts = (p, len(varied), len(distinct))
    return dataclasses.replace(
        sel, kept=kept, names=tuple(names[i] for i in kept), method=method, counts=counts
    )


def _varied(X: np.ndarray) -> np.ndarray:
    """Mask of the columns where at least `NEAR_CONSTANT` of the rows (and at least one) differ from the mode."""
    n = len(X)
    keep = np.zeros(X.shape[1], dtype=bool)
    for start in range(0, X.shape[1], _BLOCK):
        S = np.sort(X[:, start : start + _BLOCK], axis=0)
        for j in range(S.shape[1]):
            edges = np.flatnonzero(np.diff(S[:, j])) + 1
            mode = np.diff(np.concatenate(([0], edges, [n]))).max()
            keep[start + j] = mode < n and (n - mode) >= NEAR_CONSTANT * n
    return keep


def _decorrelated(X: np.ndarray) -> np.ndarray:
    """Indices of the columns kept by the greedy near-duplicate scan (the earlier column of a pair is kept)."""
    p = X.shape[1]
    Z = (X - X.mean(axis=0)).astype(np.float32)
    Z /= np.linalg.norm(Z, axis=0)  # columns are not constant (filtered before)
    dropped = np.zeros(p, dtype=bool)
    for start in range(0, p, _BLOCK):
        C = np.abs(Z[:, start : start + _BLOCK].T @ Z)
        for r in range(C.shape[0]):
            j = start + r
            if not dropped[j]:
                dropped[j + 1 :] |= C[r, j + 1 :] > MAX_CORRELATION
    return np.flatnonzero(~dropped)


def _is_classification(y: np.ndarray) -> bool:
    if y.dtype.kind in "biuOUS":
        return True
    finite = y[np.isfinite(y)]
    return bool(len(finite)) and bool(np.all((finite == 0) | (finite == 1)))


def _teacher_importance(X: np.ndarray, targets: Any) -> tuple[np.ndarray, str] | None:
    """(mean importance over the tasks, method) of seeded ExtraTrees teachers; None when no task is usable."""
    from sklearn.ensemble import ExtraTreesClassifier, ExtraTreesRegressor

    y = np.asarray(targets)
    y = y.reshape(len(y), -1)
    classification = _is_classification(y)
    model_cls = ExtraTreesClassifier if classification else ExtraTreesRegressor
    importances = []
    for t in range(y.shape[1]):
        col = y[:, t]
        rows = np.isfinite(col) if col.dtype.kind in "fc" else np.ones(len(col), dtype=bool)
        if len(np.unique(col[rows])) < 2:
            continue
        teacher = model_cls(n_estimators=TEACHER_TREES, max_features="sqrt", random_state=SEED, n_jobs=-1)
        teacher.fit(X[rows], col[rows])
        importances.append(teacher.feature_importances_)
    if not importances:
        return None
    kind = "classifier" if classification else "regressor"
    tasks = f", mean over {len(importances)} tasks" if y.shape[1] > 1 else ""
    return np.mean(
        importances, axis=0
    ), f"ExtraTrees {kind} importance ({TEACHER_TREES} trees, seed {SEED}{tasks})"
