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

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.pipeline.data import (
    RowProblem,
    TaskSpec,
    parse_target,
    read_csv_text,
    summarize_problems,
)
from molcloak.pipeline.errors import AuditError, DataError, MolcloakError
from molcloak.pipeline.predict import LocalBackend, PredictionBackend

STATE_FORMAT = 1
ProgressCallback = Callable[[int, int, str], None]  # (rows done, rows to score, status)


@dataclass(frozen=True)
class AuditConfig:
    test_set: Path
    out: Path
    target_col: str
    smiles_col: str = "smiles"
    task: str | None = None  # "classification" / "regression": checked against the model's task
    group_col: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 8
    skip_invalid: bool = False
    restart: bool = False


# ---------------------------------------------------------------- the test set


@dataclass
class TestSet:
    rows: list[int]  # 1-based CSV data rows of the valid molecules
    smiles: list[str]  # canonical
    y: np.ndarray
    targets: list[str]  # as written in the file
    groups: list[str] | None
    invalid: list[RowProblem]
    n_rows: int
    sha256: str


def read_test_set(config: AuditConfig, task: TaskSpec) -> TestSet:
    """Validate every row before anything is encrypted; invalid rows raise unless skip_invalid."""
    from molcloak.pipeline.featurize import canonical_smiles

    path = Path(config.test_set)
    df = read_csv_text(path, "check --test-set")
    for flag, col in (
        ("--smiles-col", config.smiles_col),
        ("--target-col", config.target_col),
        ("--group-col", config.group_col),
    ):
        if col is not None and col not in df.columns:
            raise DataError(
                f"{path}: {flag} column {col!r} not found; available columns: {', '.join(map(repr, df.columns))}"
            )
    task = dataclasses.replace(task, target=config.target_col)
    test = TestSet([], [], np.zeros(0), [], [] if config.group_col else None, [], len(df), _sha256(path))
    ys = []
    for i, rec in enumerate(df.to_dict("records"), start=1):
        smi, raw = (
            str(rec[config.smiles_col]).strip(),
            _label_alias(str(rec[config.target_col]).strip(), task),
        )
        canon = canonical_smiles(smi)
        y, reason = (
            (None, f"SMILES {smi!r} could not be parsed by RDKit; fix it or pass --skip-invalid")
            if canon is None
            else parse_target(raw, task, None)
        )
        if y is None:
            test.invalid.append(RowProblem(i, smi if canon is None else raw, reason))
            continue
        test.rows.append(i)
        test.smiles.append(canon)
        test.targets.append(str(rec[config.target_col]).strip())
        ys.append(y)
        if config.group_col:
            test.groups.append(str(rec[config.group_col]).strip() or "(empty)")
    test.y = np.asarray(ys, dtype=np.float64 if task.kind == "regression" else np.int64)
    _check_problems(test, config, path)
    if not test.rows:
        raise DataError(
            f"{path}: no valid row to score ({len(test.invalid)} invalid); check --smiles-col and --target-col"
        )
    return test


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


def _check_problems(test: TestSet, config: AuditConfig, path: Path) -> None:
    if test.invalid and not config.skip_invalid:
        raise DataError(summarize_problems(test.invalid, str(path)))


def _features(client, test: TestSet, config: AuditConfig) -> np.ndarray:
    """Featurize with the model's spec; rows whose features are not finite become invalid."""
    X = client.featurize(test.smiles)
    bad = ~np.isfinite(X.reshape(len(X), -1)).all(1)
    if bad.any():
        for j in np.flatnonzero(bad):
            test.invalid.append(
                RowProblem(
                    test.rows[j],
                    test.smiles[j],
                    "RDKit computed non-finite features; remove the row or pass --skip-invalid",
                )
            )
        test.invalid.sort(key=lambda p: p.row)
        keep = np.flatnonzero(~bad)
        test.rows, test.smiles, test.targets = (
            [v[j] for j in keep] for v in (test.rows, test.smiles, test.targets)
        )
        test.groups = None if test.groups is None else [test.groups[j] for j in keep]
        test.y, X = test.y[keep], X[keep]
        _check_problems(test, config, Path(config.test_set))
    return X


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ---------------------------------------------------------------- where the model runs


def open_backend(bundle=None, server=None, model=None, key_dir=None, token=None) -> PredictionBackend:
    """The model to audit: a bundle in this process (`LocalBackend`) or a served model (`RemoteModel`)."""
    if (bundle is None) == (server is None):
        raise DataError("pass either --bundle DIR (local audit) or --server URL --model NAME (remote audit)")
    if bundle is not None:
        return LocalBackend(bundle, key_dir)
    if not model:
        raise DataError("--server needs --model NAME; list the served models with GET /models")
    from molcloak.pipeline.serving.http_client import RemoteModel

    return RemoteModel(server, model, key_dir, token)


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
    task, featurizer = backend.client.task, backend.client.featurizer
    if featurizer.input_kind != "smiles":
        raise DataError(
            f"model {backend.client.manifest.name!r} reads {featurizer.input_kind} ({featurizer}), not SMILES; "
            "audits score SMILES models only for now: score this model with `molcloak predict --input FILE.csv` "
            "and compare the predictions with your labels"
        )
    if task.kind not in ("binary", "multiclass", "regression"):
        raise DataError(
            f"model {backend.client.manifest.name!r} is a {task.kind} model; audits cover binary, multiclass "
            "and regression models"
        )
    if config.task and config.task != ("regression" if task.kind == "regression" else "classification"):
        raise DataError(
            f"--task {config.task} does not match model {backend.client.manifest.name!r}, a {task.kind} model; "
            "drop --task or audit a matching model"
        )
    if config.batch_size < 1:
        raise DataError(f"--batch-size {config.batch_size} must be at least 1")
    test = read_test_set(config, task)
    X = _features(backend.client, test, config)
    identity = {
        "test_set_sha256": test.sha256,
        "smiles_col": config.smiles_col,
        "target_col": config.target_col,
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

    return build_report(config, state, backend, test)


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


def audit_command(
    config: AuditConfig,
    bundle=None,
    server=None,
    model=None,
    key_dir=None,
    token=None,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """The `molcloak audit` command: open the model, score, write report.json/md/html in config.out."""
    from .report import write_reports

    with open_backend(bundle, server, model, key_dir, token) as backend:
        report = run_audit(config, backend, on_progress)
    report["files"] = write_reports(report, Path(config.out))
    return report
