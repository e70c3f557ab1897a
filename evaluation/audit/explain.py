"""Private explanations of a data set: what drives an encrypted model, from encrypted runs only.

Everything runs through one `PredictionBackend` (a bundle in this process, or a `molcloak serve`
server): the auditor featurizes, perturbs and encrypts here; the server sees ciphertexts and
evaluation keys only; only this machine decrypts. Two analyses:

- **Per-molecule attributions by perturbation**: `molcloak.pipeline.explain.explain_molecules` (the core
  the app's explain view uses too), here on the first N inputs of a file or of an audit set.
- **Dataset-level permutation importance** (`permutation_importance`): on a labelled set, each column
  group's rows are permuted (seeded), the permuted set is scored encrypted, and the importance is the
  loss of the primary metric (ROC-AUC, RMSE, or their mean over tasks), with a paired bootstrap 95% CI.

Both resume: every batch of encrypted runs is checkpointed (`evaluation.resume.BatchCache`) before the next
one runs, keyed by its stage, number and feature rows (`pipeline.explain.batch_key`). `molcloak explain`
keeps its run directory in --out::

    DIR/explain-run.json    what this explanation is (input hash or --smiles, columns, the options that
                            change what runs, model), sessions
    DIR/explain-runs.jsonl  one line per batch: {"key": ..., "raw": [[...], ...]} (decrypted outputs)

A rerun of the same command runs only the batches not saved and writes the same explanation; other inputs,
options or model are refused (`RunState`), --restart starts over. `--output` and `--bootstrap` only change
the analysis and may differ. `audit --explain` keeps explain-runs.jsonl in the audit's directory, whose
audit.json already pins the test set and the model: there, a batch whose rows changed (other --explain N,
--seed or --batch-size) has another key and simply runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.evaluation.resume import BatchCache, RunState
from molcloak.pipeline.attributions import Featurization
from molcloak.pipeline.errors import AuditError, ConfigError, DataError
from molcloak.pipeline.explain import ProgressCallback, Runner, explain_molecules, values

from . import metrics as am
from .testset import TestSet, featurize_test_set, read_test_set


@dataclass(frozen=True)
class ExplainOptions:
    molecules: int = 10  # per-molecule attributions of the first N inputs (0: none)
    importance: bool = True  # permutation importance (needs labels)
    repeats: int = 1  # permutations per group
    bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 8
    output: str | None = None  # the output explained (class, task); default: see `explained_output`


# ---------------------------------------------------------------- permutation importance


def permutation_importance(
    backend,
    X: np.ndarray,
    y: np.ndarray,
    original: np.ndarray,
    options: ExplainOptions,
    on_progress: ProgressCallback,
    cache: BatchCache | None = None,
) -> dict:
    """Importance of each column group on a labelled set: metric(original) - metric(permuted), oriented so
    that a positive value means the model needs the group; paired bootstrap 95% CI over rows."""
    task, feat = backend.client.task, Featurization(backend.client.featurizer)
    groups = feat.input_groups()
    n, rng = len(X), np.random.default_rng(options.seed)
    runs = len(groups) * options.repeats * n
    runner = Runner(backend, runs, options.batch_size, on_progress, "importance", cache)
    on_progress(0, runs, "importance")
    base = am.make_sample(task, y, original)
    primary = am.primary_metric(task.kind)
    if base.point()[primary] is None and primary == "roc_auc":  # one class only: as subgroups do
        primary = "accuracy"
    sign = -1.0 if primary in am.LOWER_IS_BETTER else 1.0
    idx = np.random.default_rng(options.seed + 1).integers(0, n, (options.bootstrap, n))
    base_boot = base.metrics(idx)[primary] if options.bootstrap > 0 else None
    out = []
    for g, cols in groups:
        diffs, boots = [], []
        for _ in range(options.repeats):
            Xp = X.reshape(n, -1).copy()
            Xp[:, cols] = Xp[rng.permutation(n)][:, cols]
            sample = am.make_sample(task, y, _squeeze(task, runner(Xp.reshape(X.shape))))
            before, after = base.point()[primary], sample.point()[primary]
            diffs.append(np.nan if before is None or after is None else sign * (before - after))
            if base_boot is not None:
                boots.append(sign * (base_boot - sample.metrics(idx)[primary]))
        value = am._num(np.mean(diffs))
        interval = am._interval(np.mean(boots, 0)) if boots else {"low": None, "high": None, "n_boot": 0}
        out.append({**g.to_dict(), "inputs": len(cols), "value": value, **interval})
    out.sort(key=lambda r: -np.inf if r["value"] is None else -r["value"])  # undefined last
    return {
        "metric": primary,
        "baseline": base.point()[primary],
        "rows": n,
        "repeats": options.repeats,
        "bootstrap": options.bootstrap,
        "seed": options.seed,
        "encrypted_runs": runs,
        "groups": out,
    }


def _squeeze(task, pred: np.ndarray) -> np.ndarray:
    """`values` rows -> the shape `make_sample` takes: (n,) for single-task regression."""
    return pred[:, 0] if task.kind == "regression" else pred


# ---------------------------------------------------------------- inside an audit


def explain_audit(config, backend, test, X: np.ndarray, state, on_progress: ProgressCallback) -> dict:
    """`molcloak audit --explain N`: attributions of the first N scored rows and permutation importance on
    the audit set, reusing the audit's decrypted predictions of the unperturbed rows; its encrypted runs
    are saved in the audit's directory (`state.explain_runs_path`), so a rerun resumes them too."""
    options = ExplainOptions(
        config.explain, config.importance, 1, config.bootstrap, config.seed, config.batch_size
    )
    raws = np.array([state.done[r] for r in test.rows], dtype=np.float64)
    original = values(backend.client, raws)
    m = min(config.explain, len(test.rows))
    cache, n = BatchCache(state.explain_runs_path, AuditError), len(test.rows)

    def saved() -> str:
        return f"{n} of {n} rows are scored; for the explanation, {cache.done()}"

    with state.session(saved):  # scores no audit row: not stored in audit.json (its timing is the scoring's)
        result = explain_molecules(
            backend,
            test.inputs[:m],
            test.smiles[:m] or None,
            on_progress,
            original[:m],
            ids=test.rows[:m],
            batch_size=options.batch_size,
            output=options.output,
            cache=cache,
        )
        if options.importance:
            original = _squeeze(backend.client.task, original)
            result["importance"] = permutation_importance(
                backend, X, test.y, original, options, on_progress, cache
            )
    return result


# ---------------------------------------------------------------- `molcloak explain`

RUN_META, RUNS_FILE = "explain-run.json", "explain-runs.jsonl"


@dataclass(frozen=True)
class ExplainConfig:
    out: Path
    input: Path | None = None  # CSV of molecules (or rows of a tabular model)
    smiles: tuple[str, ...] = ()  # or molecules given on the command line
    smiles_col: str = "smiles"
    target_col: str | None = None  # labels: permutation importance on every valid row
    skip_invalid: bool = False
    restart: bool = False  # discard the encrypted runs saved in `out`

    @property
    def test_set(self) -> Path | None:  # read_test_set's name of the input file
        return self.input


def _read(config: ExplainConfig, client):
    """The inputs to explain, validated like an audit's test set (labels only with --target-col)."""
    if (config.input is None) == (not config.smiles):
        raise DataError("pass either --input FILE.csv or --smiles SMILES (repeatable)")
    if config.input is not None:
        test = read_test_set(config, client.task, client.featurizer, labelled=bool(config.target_col))
        return test, featurize_test_set(client, test, config)
    if client.featurizer.input_kind != "smiles":
        raise DataError(
            f"model {client.manifest.name!r} reads rows of columns; pass them with --input FILE.csv"
        )
    smiles = []
    for i, smi in enumerate(config.smiles, start=1):
        canon, reason = client.featurizer.check_input(smi)
        if canon is None:
            raise DataError(f"--smiles number {i}: {reason}")
        smiles.append(canon)
    test = TestSet(list(range(1, len(smiles) + 1)), smiles, np.zeros(0), [], None, [], len(smiles), "")
    return test, client.featurize(smiles)


IDENTITY_NAMES = {
    "input_sha256": "--input file content",
    "smiles": "--smiles",
    "smiles_col": "--smiles-col",
    "target_col": "--target-col",
    "skip_invalid": "--skip-invalid",
    "molecules": "--molecules",
    "importance": "--importance",
    "repeats": "--repeats",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "model": "model",
}


def explain_state(config: ExplainConfig, options: ExplainOptions, test: TestSet, backend) -> RunState:
    """The run directory config.out: its identity is the inputs, the options that change which encrypted
    runs are made (and how they are batched) and the model (`backend.identity()`)."""
    identity = {
        "input_sha256": test.sha256 if config.input is not None else None,
        "smiles": None if config.input is not None else test.smiles,
        "smiles_col": config.smiles_col if test.smiles else None,
        "target_col": config.target_col,
        "skip_invalid": config.skip_invalid,
        "molecules": options.molecules,
        "importance": options.importance,
        "repeats": options.repeats,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "model": backend.identity(),
    }
    return RunState(
        config.out, RUN_META, identity, (RUNS_FILE,), config.restart, IDENTITY_NAMES, "an explanation"
    )


def run_explain(
    config: ExplainConfig, options: ExplainOptions, backend, on_progress: ProgressCallback | None = None
) -> dict:
    """Attributions of the first `options.molecules` inputs and, with labels, the permutation importance
    on every valid row: the explanation dict. The encrypted runs are checkpointed in config.out after
    every batch (`explain_state`); a rerun runs only those not saved."""
    on_progress = on_progress or (lambda done, total, status: None)
    if options.batch_size < 1 or options.repeats < 1 or options.molecules < 0:
        raise DataError("--batch-size and --repeats must be at least 1, --molecules at least 0")
    test, X = _read(config, backend.client)
    state = explain_state(config, options, test, backend)
    cache = BatchCache(state.out / RUNS_FILE, ConfigError)
    m = min(options.molecules, len(test.rows))
    t0 = time.perf_counter()
    with state.session(cache.done) as session:
        cache.record = session
        result = explain_molecules(
            backend,
            test.inputs[:m],
            test.smiles[:m] or None,
            on_progress,
            ids=test.rows[:m],
            batch_size=options.batch_size,
            output=options.output,
            cache=cache,
        )
        if config.target_col and options.importance:
            runner = Runner(backend, len(X), options.batch_size, on_progress, "predictions", cache)
            original = _squeeze(backend.client.task, runner(X))
            result["importance"] = permutation_importance(
                backend, X, test.y, original, options, on_progress, cache
            )
    result["seconds"] = time.perf_counter() - t0
    result["sessions"] = state.meta["sessions"]  # rows_scored: the encrypted runs made in each
    result["model"] = {**backend.identity(), "where": backend.where, "task": backend.client.task.to_dict()}
    result["invalid_rows"] = [
        {"row": p.row, "value": p.value, "reason": p.skipped_reason} for p in test.invalid
    ]
    return result


def explain_command(
    config: ExplainConfig, options: ExplainOptions, on_progress: ProgressCallback | None = None, **where
) -> dict:
    """The `molcloak explain` command: `run_explain` on the model (`where`: bundle, or server and model;
    key_dir, token), then explain.json/md/html in config.out."""
    from .backend import with_model
    from .explain_report import write_explain

    return with_model(
        lambda b: run_explain(config, options, b, on_progress), write_explain, config.out, **where
    )
