"""Tabular inputs: numeric feature columns instead of SMILES.

A `TabularSpec` names the feature columns in the order the model reads them and
holds the standardization (mean, std per column) and the per-column medians fitted
on the training split (the medians are the explanations' neutral values, `neutral_raw`).
It travels in the bundle manifest like the molecular featurizer spec, so a
client standardizes its rows exactly as in training. Inputs are either a
numeric matrix in column order or records (mappings column -> value, e.g. rows
of a CSV file read as text); every bad cell is reported with its row, column,
value and the fix. It implements the `featurize.Featurizer` protocol; its dict's
"kind" is "tabular" (`featurize.featurizer_from_dict` reads it back).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError, FeaturizerError

TABULAR = "tabular"
MISSING = {"", "nan", "na", "n/a", "none", "null"}


@dataclass(frozen=True)
class TabularSpec:
    columns: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    medians: tuple[float, ...] | None = None  # training median per column; None in specs saved before them

    input_kind = "rows"  # what `check_input`, `fit` and `transform` take: rows (mappings column -> value, or sequences)

    def __post_init__(self):
        if not self.columns:
            raise FeaturizerError("a tabular featurizer needs at least one feature column")
        dup = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if dup:
            raise FeaturizerError(f"feature columns {dup} are listed twice; name each column once")

    def __str__(self) -> str:
        return f"{TABULAR}:{len(self.columns)} columns"

    @property
    def width(self) -> int:
        return len(self.columns)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.width,)

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def is_fitted(self) -> bool:
        return self.mean is not None

    def to_dict(self) -> dict:
        return {
            "kind": TABULAR,
            "spec": str(self),
            "columns": list(self.columns),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            **({"medians": list(self.medians)} if self.medians is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TabularSpec:
        try:
            spec = cls(
                tuple(str(c) for c in d["columns"]),
                None if d.get("mean") is None else tuple(float(v) for v in d["mean"]),
                None if d.get("std") is None else tuple(float(v) for v in d["std"]),
                None if d.get("medians") is None else tuple(float(v) for v in d["medians"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FeaturizerError(
                f"tabular featurizer spec {d!r} is malformed ({exc}); rebuild the bundle"
            ) from exc
        if spec.is_fitted and (
            len(spec.mean) != spec.width or spec.std is None or len(spec.std) != spec.width
        ):
            raise FeaturizerError(
                f"tabular featurizer has scaler values for {len(spec.mean)} of {spec.width} columns; rebuild the bundle"
            )
        if spec.medians is not None and len(spec.medians) != spec.width:
            raise FeaturizerError(
                f"tabular featurizer has medians for {len(spec.medians)} of {spec.width} columns; rebuild the bundle"
            )
        return spec

    def neutral_raw(self) -> np.ndarray:
        """The neutral raw value of every column (float64, column order): its training median, or its
        training mean for a spec saved before the medians were stored. The private explanations put it
        in place of a column to measure that column's contribution."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; fit it on the training rows first")
        return np.asarray(self.mean if self.medians is None else self.medians, dtype=np.float64)

    # -- data -------------------------------------------------------------

    def matrix(self, inputs: Any) -> np.ndarray:
        """Raw (unscaled) float64 matrix in column order from a numeric matrix or records."""
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "iuf":
            X = np.atleast_2d(inputs).astype(np.float64)
            if X.shape[1] != self.width:
                raise DataError(
                    f"feature matrix has {X.shape[1]} columns, the model expects {self.width} ({', '.join(self.columns)})"
                )
            bad = np.argwhere(~np.isfinite(X))
            if len(bad):
                i, j = bad[0]
                raise DataError(
                    f"row {i + 1}: column {self.columns[j]!r} value {X[i, j]!r} is not finite; fix it"
                )
            return X
        rows = []
        for i, record in enumerate(inputs, start=1):
            values, reason = self.check_input(record)
            if reason:
                raise DataError(f"row {i}: {reason}")
            rows.append(values)
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), self.width)

    def check_input(self, record: Mapping[str, Any] | Sequence[Any]) -> tuple[list[float] | None, str]:
        """(values in column order, "") or (None, message naming the column, the value and the fix).

        A record is a mapping column -> value (extra keys are ignored) or a sequence in column order.
        """
        if isinstance(record, str):
            return None, (
                f"{record!r} is text, but this model reads numeric rows with the columns "
                f"{list(self.columns)}; pass the rows as a CSV file with these columns (--input rows.csv)"
            )
        if isinstance(record, Mapping):
            missing = [c for c in self.columns if c not in record]
            if missing:
                return (
                    None,
                    f"column {missing[0]!r} is missing; the model needs the columns {list(self.columns)}",
                )
            cells = [(c, record[c]) for c in self.columns]
        else:
            record = list(record)
            if len(record) != self.width:
                return (
                    None,
                    f"{len(record)} values, the model expects {self.width} ({', '.join(self.columns)})",
                )
            cells = list(zip(self.columns, record))
        values = []
        for col, raw in cells:
            value, reason = parse_number(raw)
            if reason:
                return None, f"column {col!r} value {raw!r} {reason}; fix it or pass --skip-invalid"
            values.append(value)
        return values, ""

    def fit(self, train_inputs: Any, targets: Any = None) -> TabularSpec:
        """Return this spec with mean, std and medians fitted on the training rows (`targets` unused: no
        selection)."""
        X = self.matrix(train_inputs)
        if not len(X):
            raise FeaturizerError(f"featurizer {self} cannot be fitted on 0 rows; pass the training rows")
        std = X.std(axis=0)
        std = np.where(std < 1e-12, 1.0, std)
        return dataclasses.replace(
            self,
            mean=tuple(map(float, X.mean(axis=0))),
            std=tuple(map(float, std)),
            medians=tuple(map(float, np.median(X, axis=0))),
        )

    def transform(self, inputs: Any) -> np.ndarray:
        """Standardized float32 features as the model sees them; the spec must be fitted."""
        if not self.is_fitted:
            raise FeaturizerError(f"featurizer {self} is not fitted; fit it on the training rows first")
        X = self.matrix(inputs)
        return ((X - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


def parse_number(raw: Any) -> tuple[float, str]:
    """(value, "") or (nan, why it is not a usable number)."""
    if isinstance(raw, bool):
        return math.nan, "is not a number"
    if isinstance(raw, (int, float, np.integer, np.floating)):
        value = float(raw)
        if math.isnan(value):
            return math.nan, "is empty"
    else:
        text = str(raw).strip()
        if text.lower() in MISSING:
            return math.nan, "is empty"
        try:
            value = float(text)
        except ValueError:
            return math.nan, "is not a number"
    if not math.isfinite(value):
        return math.nan, "is not finite"
    return value, ""


def resolve_feature_cols(
    columns: Sequence[str],
    values: Mapping[str, Sequence[str]],
    feature_cols: str | Sequence[str],
    exclude: Sequence[str],
    source: str,
) -> tuple[list[str], list[str]]:
    """Feature columns from ``a,b,c`` (or a list), or ``all``: every column but `exclude` holding numbers.

    With ``all``, a column none of whose cells is a number (an id or name column, say) is left out
    and returned as ignored; a column with some numbers is kept, so its bad cells are reported
    row by row instead of the column silently disappearing.
    """
    if isinstance(feature_cols, str) and feature_cols.strip().lower() == "all":
        candidates = [c for c in columns if c not in set(exclude)]
        chosen = [c for c in candidates if any(not parse_number(v)[1] for v in values[c])]
        ignored = [c for c in candidates if c not in chosen]
        if not chosen:
            raise DataError(
                f"{source}: no numeric column besides {list(exclude)}; name the feature columns with --feature-cols a,b,c"
            )
        return chosen, ignored
    names = (
        [c.strip() for c in feature_cols.split(",")]
        if isinstance(feature_cols, str)
        else [str(c) for c in feature_cols]
    )
    names = [c for c in names if c]
    missing = [c for c in names if c not in columns]
    if missing:
        raise DataError(
            f"{source}: feature column {missing[0]!r} not found; available columns: {', '.join(map(repr, columns))}"
        )
    clash = [c for c in names if c in set(exclude)]
    if clash:
        raise DataError(
            f"{source}: column {clash[0]!r} is a target and a feature; remove it from --feature-cols"
        )
    if not names:
        raise DataError(
            f"{source}: --feature-cols is empty; write e.g. --feature-cols a,b,c or --feature-cols all"
        )
    return names, []


def load_breast_cancer_frame():
    """scikit-learn's bundled Wisconsin breast-cancer data (569 rows, 30 features; no download).

    Returns (frame with the 30 feature columns and 'diagnosis', feature names, labels, split) where
    split is "train"/"test" from ``train_test_split(test_size=0.2, random_state=42)``: the 80/20
    split of the TenSEAL encrypted-inference notebook.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.rename(columns={"target": "diagnosis"})
    labels = tuple(str(n) for n in bunch.target_names)  # index = sklearn's class id: 0 malignant, 1 benign
    frame["diagnosis"] = [labels[int(v)] for v in frame["diagnosis"]]
    _, test_idx = train_test_split(np.arange(len(frame)), test_size=0.2, random_state=42)
    split = np.full(len(frame), "train", dtype=object)
    split[test_idx] = "test"
    return frame, list(bunch.feature_names), labels, split


def tabular_featurizer(ds, features: str | None) -> TabularSpec | None:
    """The (unfitted) featurizer of a tabular dataset: its feature columns; None for molecules."""
    if not getattr(ds, "is_tabular", False):
        return None
    if features not in (None, TABULAR):
        raise FeaturizerError(
            f"dataset {ds.task.name!r} has numeric feature columns, so --features {features!r} "
            "(a molecule featurizer) does not apply; leave --features out"
        )
    return TabularSpec(tuple(ds.columns))
