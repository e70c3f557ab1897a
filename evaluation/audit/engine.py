"""Private test-set audits: score a model on a secret test set, resumably, and report.

The auditor featurizes and encrypts the test molecules locally, the model runs on ciphertexts
(a `PredictionBackend`: a `molcloak serve` server through `RemoteModel`, or the server half of a
bundle in this process through `LocalBackend`), and only the auditor decrypts. Progress is
checkpointed in the output directory::

    DIR/audit.json       what this audit is (test file hash, columns, task, model), sessions
    DIR/progress.jsonl   one line per scored row: {"row": 17, "raw": [...]} (decrypted outputs)

A rerun with the same test file, columns, task and model (`backend.identity()`: source, name and
client fingerprint, the sha256 of client.zip) continues where the last run stopped (Ctrl-C, lost
connection, server restart); every valid row is scored exactly once. Options that only change the
analysis (--group-col, --bootstrap, --seed, --batch-size) may differ between runs:
the report is recomputed from all stored predictions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.pipeline.errors import AuditError, DataError, MolcloakError
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


class AuditState:
    """audit.json + progress.jsonl in the output directory (see module docstring)."""

    def __init__(self, out: Path, identity: dict, restart: bool = False):
        self.out, self.meta_path, self.progress_path = out, out / "audit.json", out / "progress.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)  # decrypted predictions: for the auditor only
        if restart:
            for p in (self.meta_path, self.progress_path):
                p.unlink(missing_ok=True)
        if self.meta_path.is_file():
            self.meta = json.loads(self.meta_path.read_text())
            _check_same_audit(self.meta["identity"], identity, out)
        else:
            self.meta = {"format": STATE_FORMAT, "identity": identity, "sessions": []}
            self.progress_path.unlink(missing_ok=True)
            self.save()
        self.done = self._read_progress()

    def _read_progress(self) -> dict[int, list[float]]:
        if not self.progress_path.is_file():
            return {}
        data = self.progress_path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1]:  # a line cut short by a crash mid-write: drop it, its row is scored again
            with self.progress_path.open("r+b") as fh:
                fh.truncate(len(data) - len(lines[-1]))
        done: dict[int, list[float]] = {}
        for n, line in enumerate(lines[:-1], start=1):
            try:
                rec = json.loads(line)
                done.setdefault(int(rec["row"]), [float(v) for v in rec["raw"]])
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(
                    f"{self.progress_path} line {n} is damaged ({exc}); delete the directory or pass --restart"
                ) from exc
        return done

    def append(self, rows: list[int], raws: list[np.ndarray]) -> None:
        text = "".join(
            json.dumps({"row": r, "raw": np.ravel(raw).tolist()}) + "\n" for r, raw in zip(rows, raws)
        )
        with self.progress_path.open("a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for r, raw in zip(rows, raws):
            self.done[r] = np.ravel(raw).tolist()

    def save(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, self.meta_path)


IDENTITY_NAMES = {
    "test_set_sha256": "test file content",
    "smiles_col": "--smiles-col",
    "target_col": "--target-col",
    "task": "task",
    "skip_invalid": "--skip-invalid",
    "model": "model",
}


def _check_same_audit(old: dict, new: dict, out: Path) -> None:
    changed = [
        f"{IDENTITY_NAMES.get(k, k)} (was {old.get(k)!r}, now {new.get(k)!r})"
        for k in new
        if old.get(k) != new[k]
    ]
    if changed:
        raise AuditError(
            f"{out} holds an audit with other inputs: {'; '.join(changed)}; predictions of different runs cannot be "
            f"mixed. Rerun with the original arguments to resume, choose another --out, or pass --restart to start over"
        )


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
    total, session = len(position), {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows_scored": 0}
    on_progress(total - len(todo), total, "")
    t0 = time.perf_counter()
    try:
        if todo:
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
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; {len(state.done)} of {total} rows are scored and saved in {state.out}; "
            "rerun the same command to resume"
        ) from None
    except MolcloakError as exc:
        raise type(exc)(
            f"{exc}; {len(state.done)} of {total} rows are scored and saved in {state.out}; "
            "rerun the same command to resume"
        ) from exc
    finally:
        session["seconds"] = time.perf_counter() - t0
        if todo:
            state.meta["sessions"].append(session)
            state.save()


def audit_command(config: AuditConfig, on_progress: ProgressCallback | None = None, **where) -> dict:
    """The `molcloak audit` command: open the model (`where`: bundle, or server and model; key_dir, token),
    score, write report.json/md/html in config.out."""
    from .report import write_reports

    return with_model(
        lambda backend: run_audit(config, backend, on_progress), write_reports, config.out, **where
    )
