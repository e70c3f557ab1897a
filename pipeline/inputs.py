"""What `molcloak predict` reads and writes, for every input and output kind.

Inputs: SMILES (arguments or a CSV column) for molecule models, rows of a CSV file for
tabular models (the columns the bundle's featurizer names; other columns are ignored).
Outputs: one flat row per prediction: index, the molecule, then the prediction (single
task) or one column per task (multi-task), then the error of a skipped row.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .data import read_csv_text
from .errors import DataError


def read_inputs(featurizer, args: list[str] | None, input_csv: Path | None, smiles_col: str) -> list:
    """SMILES strings, or for a tabular model (`input_kind` "rows") the CSV rows as mappings column -> text."""
    if featurizer.input_kind == "rows":
        return _read_rows(featurizer, args, input_csv)
    if input_csv is None:
        if not args:
            raise DataError("no molecules given; pass SMILES arguments or --input file.csv")
        return list(args)
    if args:
        raise DataError("give SMILES arguments or --input, not both")
    fieldnames, rows = _read_csv(input_csv)
    if smiles_col not in fieldnames:
        raise DataError(
            f"{input_csv}: column {smiles_col!r} not found; available columns: {', '.join(fieldnames)}; pass --smiles-col"
        )
    return [row[smiles_col] for row in rows]


def _read_rows(featurizer, args: list[str] | None, input_csv: Path | None) -> list[dict[str, str]]:
    columns = featurizer.names
    if args or input_csv is None:
        raise DataError(
            f"this model reads numeric rows, not SMILES; pass --input rows.csv with the columns "
            f"{', '.join(columns)}"
        )
    fieldnames, rows = _read_csv(input_csv)
    missing = [c for c in columns if c not in fieldnames]
    if missing:
        raise DataError(
            f"{input_csv}: column {missing[0]!r} not found ({len(missing)} of the model's {len(columns)} "
            f"feature columns missing); the model needs the columns {', '.join(columns)}; add them to the file"
        )
    return rows


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and the rows (every cell as text) of an input file, read by `data.read_csv_text`."""
    df = read_csv_text(Path(path), "check the --input path")
    if df.empty:
        raise DataError(f"{path} has no data rows; add at least one row under the header")
    return [str(c) for c in df.columns], df.to_dict("records")


def output_rows(report) -> list[dict[str, Any]]:
    """Flat rows for a CSV file: index, smiles (molecules), prediction and value, or one column per task, error."""
    rows = []
    for p in report.predictions:
        row: dict[str, Any] = {"index": p.index}
        if p.features is None:
            row["smiles"] = p.smiles
        if p.error:
            pass  # no prediction: only the index, the input and the error
        elif isinstance(p.value, dict):
            row.update(p.value)
        else:
            value = p.value
            row["prediction"] = p.label or ("" if value is None else value)
            row["value"] = json.dumps(value) if isinstance(value, list) else ("" if value is None else value)
        row["error"] = p.error
        rows.append(row)
    return rows


def write_csv(path: Path, report) -> None:
    rows = output_rows(report)
    header: list[str] = []
    for row in rows:  # error rows of a multi-task model lack the task columns
        header += [k for k in row if k not in header]
    header = [k for k in header if k != "error"] + ["error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
