"""The auditor's secret test set: read and validate every row before anything is encrypted.

A row holds a molecule (SMILES models) or the model's feature columns (tabular models), the target(s)
and optional group columns. Targets: one column (class name, class id 0..k-1 or value), or for a
multi-task model one column per task (empty = missing label, masked as in training). Invalid rows raise
unless skip_invalid; then they are listed by row number in the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molcloak.pipeline.data import (
    RowProblem,
    parse_target,
    parse_target_record,
    read_csv_text,
    summarize_problems,
)
from molcloak.pipeline.errors import DataError
from molcloak.pipeline.tabular import parse_number
from molcloak.pipeline.tasks import TaskSpec

MAX_CATEGORIES = 10  # a numeric group column with more distinct values is cut into quartiles


@dataclass
class TestSet:
    rows: list[int]  # 1-based CSV data rows of the valid inputs
    smiles: list[str]  # canonical; empty for a tabular model
    y: np.ndarray  # class ids or values (n,); multi-task (n, tasks) float with NaN = missing label
    targets: list[str]  # as written in the file (multi-task: the cells joined by ",")
    groups: dict[str, list[str]] | None  # group column -> value per valid row
    invalid: list[RowProblem]
    n_rows: int
    sha256: str
    records: list[list[float]] = field(default_factory=list)  # tabular: feature values in model column order

    @property
    def inputs(self) -> list:
        """What the featurizer reads: SMILES, or rows of numbers in the model's column order."""
        return self.records if not self.smiles and self.records else self.smiles

    def keep(self, idx) -> None:
        """Keep the valid rows at positions `idx` (features that turned out non-finite drop the others)."""
        idx = list(idx)
        for name in ("rows", "smiles", "targets", "records"):
            values = getattr(self, name)
            if values:
                setattr(self, name, [values[j] for j in idx])
        if self.groups is not None:
            self.groups = {g: [v[j] for j in idx] for g, v in self.groups.items()}
        self.y = self.y[idx]


def target_columns(config, task: TaskSpec) -> list[str]:
    """--target-col as a list: one column, or one per task of a multi-task model (default: the model's)."""
    given = [c.strip() for c in (config.target_col or "").split(",") if c.strip()]
    expected = list(task.tasks) if task.is_multitask else [task.target]
    if not given:
        return expected
    if len(given) != len(expected):
        what = f"{len(expected)} tasks ({', '.join(expected)})" if task.is_multitask else "one target"
        raise DataError(
            f"--target-col {config.target_col!r} names {len(given)} column(s); model {task.name!r} predicts "
            f"{what}; pass {'one column per task, in that order' if task.is_multitask else 'one column'}"
        )
    return given


def group_columns(config) -> list[str]:
    """The subgroup columns of an audit's config (aggregate audits and explanations have none)."""
    return [c.strip() for c in (getattr(config, "group_col", None) or "").split(",") if c.strip()]


def read_test_set(config, task: TaskSpec, featurizer=None, labelled: bool = True) -> TestSet:
    """Validate every row before anything is encrypted; invalid rows raise unless skip_invalid.

    `featurizer`: the model's (its `input_kind` says whether rows hold SMILES or feature columns);
    None reads SMILES. `labelled` False: inputs only (no target column is read; `y` is empty)."""
    path = Path(config.test_set)
    df = read_csv_text(path, "check --test-set")
    tabular = getattr(featurizer, "input_kind", "smiles") == "rows"
    targets, groups = target_columns(config, task) if labelled else [], group_columns(config)
    wanted = [("--target-col", c) for c in targets] + [("--group-col", c) for c in groups]
    wanted += (
        [("feature", c) for c in featurizer.columns] if tabular else [("--smiles-col", config.smiles_col)]
    )
    for flag, col in wanted:
        if col not in df.columns:
            raise DataError(
                f"{path}: {flag} column {col!r} not found; available columns: {', '.join(map(repr, df.columns))}"
            )
    test = TestSet(
        [], [], np.zeros(0), [], {g: [] for g in groups} if groups else None, [], len(df), _sha256(path)
    )
    ys = []
    for i, rec in enumerate(df.to_dict("records"), start=1):
        value, problem, y, reason = _read_input(rec, config, featurizer, tabular)
        if value is not None and not targets:
            y = 0
        elif value is not None:
            y, reason = _read_target(rec, task, targets)
            problem = "; ".join(str(rec[c]).strip() for c in targets)
        if y is None:
            test.invalid.append(RowProblem(i, problem, reason))
            continue
        test.rows.append(i)
        (test.records if tabular else test.smiles).append(value)
        test.targets.append(",".join(str(rec[c]).strip() for c in targets))
        ys.append(y)
        for g in groups:
            test.groups[g].append(str(rec[g]).strip() or "(empty)")
    dtype = np.float64 if task.kind == "regression" or task.is_multitask else np.int64
    shape = (len(ys), len(targets)) if task.is_multitask and targets else len(ys)
    test.y = np.asarray(ys, dtype=dtype).reshape(shape)
    check_problems(test, config)
    if not test.rows:
        raise DataError(
            f"{path}: no valid row to score ({len(test.invalid)} invalid); check the input and --target-col columns"
        )
    return test


def _read_input(rec: dict, config, featurizer, tabular: bool):
    """(value the featurizer reads, shown value, None, reason if invalid)."""
    if tabular:
        values, reason = featurizer.check_input(rec)
        shown = ", ".join(f"{c}={rec[c]}" for c in featurizer.columns[:3])
        return values, shown, None, reason
    from molcloak.pipeline.featurize import canonical_smiles

    smi = str(rec[config.smiles_col]).strip()
    canon = canonical_smiles(smi)
    reason = f"SMILES {smi!r} could not be parsed by RDKit; fix it or pass --skip-invalid"
    return canon, smi, None, "" if canon else reason


def _read_target(rec: dict, task: TaskSpec, targets: list[str]):
    if task.is_multitask:
        return parse_target_record({t: rec[c] for t, c in zip(task.tasks, targets)}, task, None)
    single = dataclasses.replace(task, target=targets[0])
    return parse_target(_label_alias(str(rec[targets[0]]).strip(), single), single, None)


def _label_alias(raw: str, task: TaskSpec) -> str:
    """Class ids 0..k-1 are accepted for class names when no class name is itself a number."""
    if (
        task.is_classification
        and raw.isdigit()
        and int(raw) < len(task.labels)
        and not any(lab.isdigit() for lab in task.labels)
    ):
        return task.labels[int(raw)]
    return raw


def check_problems(test: TestSet, config) -> None:
    if test.invalid and not config.skip_invalid:
        raise DataError(summarize_problems(test.invalid, str(config.test_set)))


def featurize_test_set(client, test: TestSet, config) -> np.ndarray:
    """Featurize with the model's spec; rows whose features are not finite become invalid."""
    X = client.featurize(test.inputs)
    bad = ~np.isfinite(X.reshape(len(X), -1)).all(1)
    if bad.any():
        for j in np.flatnonzero(bad):
            test.invalid.append(
                RowProblem(
                    test.rows[j],
                    test.smiles[j] if test.smiles else str(test.records[j][:3]),
                    "RDKit computed non-finite features; remove the row or pass --skip-invalid",
                )
            )
        test.invalid.sort(key=lambda p: p.row)
        keep = np.flatnonzero(~bad)
        test.keep(keep)
        X = X[keep]
        check_problems(test, config)
    return X


def group_labels(values: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """A group column as subgroup labels: its values, or quartile bins when it holds many distinct numbers."""
    numbers = [parse_number(v) for v in values]
    distinct = set(values)
    if len(distinct) <= MAX_CATEGORIES or any(reason for _, reason in numbers):
        return np.array(values, dtype=object), None
    x = np.array([v for v, _ in numbers])
    edges = np.unique(np.quantile(x, [0.25, 0.5, 0.75]))
    names = [f"<= {edges[0]:.4g}"] + [f"{a:.4g} - {b:.4g}" for a, b in zip(edges, edges[1:])]
    names += [f"> {edges[-1]:.4g}"]
    return np.array([names[i] for i in np.searchsorted(edges, x, side="left")], dtype=object), names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
