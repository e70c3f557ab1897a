"""Private test-set audits: score a model on a secret test set, resumably, and report.

The auditor featurizes and encrypts the test molecules locally, the model runs on ciphertexts
(a `PredictionBackend`: a `molcloak serve` server through `RemoteModel`, or the server half of a
bundle in this process through `LocalBackend`), and only the auditor decrypts. Progress is
checkpointed in the output directory::

    DIR/audit.json       what this audit is (test file hash, columns, task, model), sessions
    DIR/progress.jsonl   one line per scored row: {"row": 17, "raw": [...]} (decrypted outputs)
    DIR/explain-runs.jsonl  with --explain: the explanation's encrypted runs, one line per batch
                         (evaluation/audit/explain.py), so that part resumes too

A rerun with the same test file, columns, task and model (`backend.identity()`: source, name and
client fingerprint, the sha256 of client.zip) continues where the last run stopped (Ctrl-C, lost
connection, server restart); every valid row is scored exactly once. The directory is an
`evaluation.resume.RunState`, as for `molcloak screen`. Options that only change the
analysis (--group-col, --bootstrap, --seed, --batch-size) may differ between runs:
the report is recomputed from all stored predictions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.evaluation.resume import RunState, append_durably, read_jsonl
from molcloak.pipeline.errors import AuditError, DataError
from molcloak.pipeline.predict import PredictionBackend

from .backend import open_backend, with_model
from .testset import TestSet, featurize_test_set, read_test_set, target_columns

__all__ = [
    "AuditConfig",
    "AuditState",
    "TestSet",
    "open_backend",
    "read_test_set",
    "run_audit",
    "audit_command",
]

STATE_FORMAT = 1
ProgressCallback = Callable[[int, int, str], None]  # (rows done, rows to score, status)


@dataclass(frozen=True)
class AuditConfig:
    test_set: Path
    out: Path
    target_col: str | None  # one column, or one per task ("a,b"); None / "": the model's target name(s)
    smiles_col: str = "smiles"  # SMILES models; a tabular model reads its feature columns by name
    task: str | None = None  # "classification" / "regression": checked against the model's task
    group_col: str | None = None  # one column or several ("site,assay"): subgroups by each
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 8
    skip_invalid: bool = False
    restart: bool = False
    explain: int = 0  # --explain N: attributions of the first N molecules (and permutation importance)
    importance: bool = True  # with --explain: also the permutation importance (groups x rows encrypted runs)


# ---------------------------------------------------------------- the test set (testset.py)


def export_test_split(dataset: str, path: str | Path, seed: int = 0) -> int:
    """Write the test split of a bundled dataset as CSV (smiles + target column); returns the row count."""
    import pandas as pd

    from molcloak.pipeline.data import load_bundled
    from molcloak.pipeline.splits import split_dataset

    ds = load_bundled(dataset)
    test = ds.subset(split_dataset(ds, seed=seed).test)
    target = test.y.tolist() if test.task.kind == "regression" else [test.task.labels[i] for i in test.y]
    pd.DataFrame({"smiles": test.smiles, test.task.target: target}).to_csv(path, index=False)
    return len(test)


# ---------------------------------------------------------------- where the model runs: backend.py


# ---------------------------------------------------------------- checkpoint


IDENTITY_NAMES = {
    "test_set_sha256": "test file content",
    "smiles_col": "--smiles-col",
    "target_col": "--target-col",
    "task": "task",
    "skip_invalid": "--skip-invalid",
    "model": "model",
}


class AuditState(RunState):
    """The audit's run directory (`RunState`: audit.json, refusal of other inputs, sessions), its
    progress.jsonl (`done` maps each scored row to its decrypted raw outputs) and, with --explain, the
    explanation's saved runs (explain-runs.jsonl)."""

    def __init__(self, out: Path, identity: dict, restart: bool = False):
        super().__init__(
            Path(out),
            "audit.json",
            identity,
            data_files=("progress.jsonl", "explain-runs.jsonl"),
            restart=restart,
            names=IDENTITY_NAMES,
            what="an audit",
            error=AuditError,
            fmt=STATE_FORMAT,
        )
        self.progress_path = self.out / "progress.jsonl"
        self.explain_runs_path = self.out / "explain-runs.jsonl"
        self.done: dict[int, list[float]] = {}
        for row, raw in read_jsonl(self.progress_path, _progress_record, AuditError):
            self.done.setdefault(row, raw)

    def append(self, rows: list[int], raws: list[np.ndarray]) -> None:
        """Store the decrypted outputs of scored rows durably (the checkpoint of one batch)."""
        raws = [np.ravel(raw).tolist() for raw in raws]
        append_durably(
            self.progress_path,
            "".join(json.dumps({"row": r, "raw": raw}) + "\n" for r, raw in zip(rows, raws)),
        )
        self.done.update(zip(rows, raws))


def _progress_record(rec: dict) -> tuple[int, list[float]]:
    return int(rec["row"]), [float(v) for v in rec["raw"]]


# ---------------------------------------------------------------- the audit


def run_audit(
    config: AuditConfig, backend: PredictionBackend, on_progress: ProgressCallback | None = None
) -> dict:
    """Score every valid row once (resuming from DIR), compute metrics, return the report dict."""
    on_progress = on_progress or (lambda done, total, status: None)
    task = backend.client.task
    _check_task(config, task, backend.client.manifest.name)
    if config.batch_size < 1:
        raise DataError(f"--batch-size {config.batch_size} must be at least 1")
    test = read_test_set(config, task, backend.client.featurizer)
    X = featurize_test_set(backend.client, test, config)
    identity = {
        "test_set_sha256": test.sha256,
        "smiles_col": config.smiles_col if test.smiles else None,
        "target_col": ",".join(target_columns(config, task)),
        "task": task.kind,
        "skip_invalid": config.skip_invalid,
        "model": backend.identity(),
    }
    state = AuditState(Path(config.out), identity, config.restart)
    position = {r: j for j, r in enumerate(test.rows)}
    unknown = sorted(set(state.done) - set(position))
    if unknown:
        raise AuditError(
            f"{state.progress_path} holds rows {unknown[:5]} that are not valid rows of the test set; "
            "delete the directory or pass --restart"
        )
    todo = [r for r in test.rows if r not in state.done]
    _score(state, backend, X, position, todo, config, on_progress)
    from .report import build_report

    report = build_report(config, state, backend, test)
    if config.explain:
        from .explain import explain_audit

        report["explain"] = explain_audit(config, backend, test, X, state, on_progress)
    return report


def _check_task(config: AuditConfig, task, name: str) -> None:
    regression = task.kind in ("regression", "multitarget")
    if config.task and config.task != ("regression" if regression else "classification"):
        raise DataError(
            f"--task {config.task} does not match model {name!r}, a {task.kind} model; "
            "drop --task or audit a matching model"
        )


def _score(state: AuditState, backend: PredictionBackend, X, position, todo, config, on_progress) -> None:
    total = len(position)
    on_progress(total - len(todo), total, "")
    if not todo:
        return
    with state.session(lambda: f"{len(state.done)} of {total} rows are scored") as session:
        on_progress(total - len(todo), total, "keys")
        keyinfo = backend.keygen()
        session["keygen_seconds"], session["keys_reused"] = keyinfo.seconds, keyinfo.reused
        t_score = time.perf_counter()
        for start in range(0, len(todo), config.batch_size):
            rows = todo[start : start + config.batch_size]
            state.append(rows, [r.raw for r in backend.run_rows(X[[position[r] for r in rows]])])
            session["rows_scored"] += len(rows)
            rate = session["rows_scored"] / (time.perf_counter() - t_score)
            on_progress(len(state.done), total, f"{rate:.2f} mol/s")


def audit_command(config: AuditConfig, on_progress: ProgressCallback | None = None, **where) -> dict:
    """The `molcloak audit` command: open the model (`where`: bundle, or server and model; key_dir, token),
    score, write report.json/md/html in config.out."""
    from .report import write_reports

    return with_model(
        lambda backend: run_audit(config, backend, on_progress), write_reports, config.out, **where
    )
