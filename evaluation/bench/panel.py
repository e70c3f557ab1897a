"""`molcloak bench --panel`: molcloak against plaintext references on a panel of real assay files.

A panel is a folder of CSV files, each described by its SMILES column, target column(s) and task
(`panel_files`: the built-in table for `../shared/data/panel`, or a `panel.json` in the folder).

Per dataset, loaded like any user file (`DataSource(..., skip_invalid=True)`: invalid and duplicate
SMILES are reported and skipped), and per seed of the scaffold split (test fraction 0.2):
- the plaintext references (`references.py`), trained on train + valid, scored on test;
- molcloak: `molcloak_model` (checkpoint and compiled model), its float / FHE-simulated metrics on
  the whole test split, and the FHE-executed metric on all test molecules or a fixed seeded sample,
  run through `predict.LocalBackend` from a temporary bundle (fresh keys; median server-side
  latency from `run_rows`, keygen time, evaluation-key size, PBS count, max bit width);
- optionally Concrete ML's XGB on molcloak's features (`peers.bench_cml_xgb`, its latency too).
The result is JSON-ready (`run_panel`); `panel_report` averages the seeds and writes the markdown table.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molcloak.pipeline import workflow
from molcloak.pipeline.compile import DEFAULT_P_ERROR, check_p_error
from molcloak.pipeline.data import Dataset
from molcloak.pipeline.errors import ConfigError, TuneError
from molcloak.pipeline.featurize import FeaturizerSpec
from molcloak.pipeline.fit import FIT_TRAIN, FitBudget, FitResult, SearchSpace, fit, teachers_for
from molcloak.pipeline.fit_space import SCORINGS, check_fold_training
from molcloak.pipeline.metrics import fhe_equals_simulation, score, to_predictions
from molcloak.pipeline.pbs_cost import Calibration
from molcloak.pipeline.predict import LocalBackend
from molcloak.pipeline.splits import Split, check_fold_groups, split_dataset
from molcloak.pipeline.train import TrainConfig

from . import panel_report, references
from .fhe_timing import latency_summary
from .panel_files import (  # noqa: F401  (re-exported: the panel's files are part of its interface)
    BUILTIN,
    EXCLUDED,
    PanelEntry,
    default_panel_dir,
    describe_panel,
    load_entry,
)

SPLIT, TEST_FRACTION = "scaffold", 0.2
MODELS, DEFAULT_MODELS = ("molcloak", "references", "cml-xgb"), ("molcloak", "references")
QUICK_DATASETS, QUICK_SAMPLE, QUICK_TREES, MIN_SAMPLE = ("herg", "bace"), 8, 100, 200


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PanelConfig:
    folder: str
    datasets: tuple[str, ...] | None = None  # None: all described (quick: herg and bace, or the 2 smallest)
    seeds: tuple[int, ...] = (0, 1, 2)
    sample: int | None = None  # FHE-execute a seeded sample of N test molecules (None: all; 0: none)
    quick: bool = False  # CI: two small datasets, one seed, a sample of 8, 100 trees, a tiny search
    models: tuple[str, ...] = DEFAULT_MODELS
    trees: int | None = None  # RandomForest trees (default 500; quick 100)
    budget_ms: float = 250.0  # latency budget handed to `molcloak fit`
    fit_minutes: float | None = 15.0  # fit's --max-minutes per dataset and seed (None: no cap)
    latency_check: str = "normalized"  # FitBudget.latency_check: timings divided by the load factor, or raw
    teacher: str | None = None  # fit --teacher: distillation from a plaintext RandomForest (teacher.TEACHERS)
    p_error: float = DEFAULT_P_ERROR  # fit --p-error: every variant's error probability per bootstrap
    # fit --fold-groups: the scaffold groups its inner folds validate on
    fold_groups: str = SearchSpace.fold_groups
    round_outputs: bool = False  # fit --round-outputs: outputs rounded before they are decrypted
    scoring: str = SearchSpace.scoring  # fit --scoring: what the search compares variants by
    fold_training: str = (
        SearchSpace.fold_training
    )  # fit --fold-training: how each inner fold's network trains
    fit_features: tuple[str, ...] = ()  # feature specs fit tries after its default ones (--fit-features)
    # fit --patience-steps: the training patience in optimizer steps as well (None: in epochs only)
    patience_steps: int | None = None

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ConfigError(f"panel models {list(self.models)}: choose from {', '.join(MODELS)}")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed, e.g. 0,1,2")
        if self.sample is not None and self.sample < 0:
            raise ConfigError(f"--sample {self.sample} must be >= 0 (0 = no FHE execution)")
        if self.sample and self.sample < MIN_SAMPLE and not self.quick:
            raise ConfigError(
                f"--sample {self.sample}: the panel protocol FHE-executes at least {MIN_SAMPLE} test "
                f"molecules (or all); use --sample {MIN_SAMPLE} or more, 0 for none, or --quick"
            )
        if self.fit_minutes is not None and self.fit_minutes <= 0:
            raise ConfigError(f"--fit-minutes {self.fit_minutes} must be positive")
        teachers_for(self.teacher)  # a bad --teacher: one line before anything runs
        check_p_error(self.p_error, "--p-error")
        check_fold_groups(self.fold_groups, "--fold-groups")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"--scoring {self.scoring!r}: use one of {', '.join(SCORINGS)}")
        check_fold_training(self.fold_training)
        for spec in self.fit_features:  # a bad spec: one line before anything runs
            FeaturizerSpec.parse(spec)
        if self.trees is not None and self.trees < 1:
            raise ConfigError(f"trees {self.trees} must be at least 1")
        # a bad --patience-steps: one line before anything runs
        TrainConfig(patience_steps=self.patience_steps)

    @property
    def train(self) -> TrainConfig:
        """The training settings fit gets: fit's own, shorter for --quick, with --patience-steps."""
        train = dataclasses.replace(FIT_TRAIN, epochs=80, patience=20) if self.quick else FIT_TRAIN
        return dataclasses.replace(train, patience_steps=self.patience_steps)

    @property
    def n_trees(self) -> int:
        return self.trees or (QUICK_TREES if self.quick else 500)

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return self.seeds[:1] if self.quick else self.seeds

    @property
    def n_sample(self) -> int | None:
        return QUICK_SAMPLE if self.quick and self.sample is None else self.sample

    def select(self, entries: dict[str, PanelEntry]) -> list[PanelEntry]:
        if self.datasets:
            unknown = [d for d in self.datasets if d not in entries]
            if unknown:
                raise ConfigError(
                    f"--datasets {','.join(unknown)}: not in the panel {self.folder}; "
                    f"choose from {', '.join(entries)}"
                )
            return [entries[d] for d in self.datasets]
        if not self.quick:
            return list(entries.values())
        if all(d in entries for d in QUICK_DATASETS):
            return [entries[d] for d in QUICK_DATASETS]
        size = lambda e: (Path(self.folder) / e.file).stat().st_size  # noqa: E731
        return sorted(entries.values(), key=size)[:2]


def command_line(config: PanelConfig, json_path=None, markdown_path=None) -> str:
    """The `molcloak bench --panel` command that reproduces `config`."""
    args = ["molcloak", "bench", "--panel", config.folder]
    args += ["--seeds", ",".join(map(str, config.seeds))] if config.seeds != (0, 1, 2) else []
    args += ["--datasets", ",".join(config.datasets)] if config.datasets else []
    args += ["--sample", str(config.sample)] if config.sample is not None else []
    args += ["--quick"] if config.quick else []
    args += ["--models", ",".join(config.models)] if config.models != DEFAULT_MODELS else []
    args += ["--trees", str(config.trees)] if config.trees else []
    args += ["--budget-ms", f"{config.budget_ms:g}"] if config.budget_ms != 250.0 else []
    args += ["--fit-minutes", f"{config.fit_minutes:g}"] if config.fit_minutes != 15.0 else []
    args += ["--latency-check", config.latency_check] if config.latency_check != "normalized" else []
    args += ["--teacher", config.teacher] if config.teacher else []
    args += ["--p-error", f"{config.p_error:g}"] if config.p_error != DEFAULT_P_ERROR else []
    args += ["--fold-groups", config.fold_groups] if config.fold_groups != SearchSpace.fold_groups else []
    args += ["--scoring", config.scoring] if config.scoring != SearchSpace.scoring else []
    training = config.fold_training
    args += ["--fold-training", training] if training != SearchSpace.fold_training else []
    args += ["--round-outputs"] if config.round_outputs else []
    args += ["--patience-steps", str(config.patience_steps)] if config.patience_steps else []
    for spec in config.fit_features:
        args += ["--fit-features", spec]
    args += ["--json", str(json_path)] if json_path else []
    args += ["--markdown", str(markdown_path)] if markdown_path else []
    return shlex.join(args)


# ---------------------------------------------------------------- the molcloak row


# The search `--quick` runs (CI): one feature spec, one tiny network, no moves.
QUICK_SPACE = SearchSpace(
    ("physchem:scale=quantile",), start=(("hidden", (8,)), ("weight_bits", 3), ("act_bits", 3), ("input_bits", 4)),
    hidden=((8,),), weight_bits=(3,), act_bits=(3,), input_bits=(4,), rounding_bits=(5,), top_features=1,
    top_networks=1, inner_folds=2, confirm=1,
)  # fmt: skip


QUICK_BUDGET_MS = 60_000.0  # --quick is a smoke run: a loaded CI machine must not fail it on time


def molcloak_model(ds: Dataset, split: str, seed: int, config: PanelConfig) -> FitResult:
    """`molcloak fit` on the `split` method's training part with `seed`, under the panel's budget: it
    chooses on an inner validation part and compiles its choice on the test part. `--quick` uses a
    generous budget and only the PBS costs already calibrated (timings decide; nothing is written)."""
    return fit(
        ds,
        molcloak_space(config),
        FitBudget(budget_ms(config), max_minutes=config.fit_minutes, latency_check=config.latency_check),
        split,
        TEST_FRACTION,
        seed,
        config.train,
        calibration=Calibration(measure=not config.quick),
        measure_runs=2 if config.quick else 5,
        verify=1 if config.quick else 3,
    )


def molcloak_space(config: PanelConfig) -> SearchSpace:
    """fit's search space with the panel's fit options (teacher, p_error, inner folds' groups)."""
    space = QUICK_SPACE if config.quick else SearchSpace()
    fit_options = {"p_error": (config.p_error,), "fold_groups": config.fold_groups}
    fit_options["round_outputs"], fit_options["scoring"] = config.round_outputs, config.scoring
    fit_options["fold_training"] = config.fold_training
    fit_options["features"] = space.features + tuple(config.fit_features)  # repeats are tried once
    return dataclasses.replace(space, teachers=teachers_for(config.teacher), **fit_options)


def budget_ms(config: PanelConfig) -> float:
    return QUICK_BUDGET_MS if config.quick else config.budget_ms


MODEL_SOURCE = "molcloak fit (search under the latency and key budget, chosen on an inner validation part)"


def sample_positions(n_test: int, sample: int | None, seed: int) -> np.ndarray:
    """Positions in the test split to FHE-execute: all, or a fixed seeded random sample, sorted."""
    if sample is None or sample >= n_test:
        return np.arange(n_test)
    return np.sort(np.random.default_rng(seed).choice(n_test, size=sample, replace=False))


def execute_sample(ckpt, compiled, picks: np.ndarray, on_row: Callable[[], None] | None = None) -> dict:
    """Deploy to a temporary bundle, make fresh keys and run the `picks` test rows one at a time through
    `LocalBackend` (client encrypts, the server half gets evaluation keys and ciphertexts only)."""
    X, y = ckpt.X_test[picks], ckpt.y_test[picks]
    simulated = compiled.q_module.forward(X, fhe="simulate")
    with tempfile.TemporaryDirectory(prefix="molcloak-panel-") as tmp:
        bundle = Path(tmp) / "bundle"
        workflow.deploy(ckpt, compiled, bundle, f"panel-{ckpt.task.name}")
        with LocalBackend(bundle, Path(tmp) / "keys") as backend:
            keys = backend.keygen(force=True)
            backend.run_rows(X[:1])  # warm-up, not timed
            runs = []
            for i in range(len(X)):
                runs += backend.run_rows(X[i : i + 1])
                if on_row:
                    on_row()
            engine = backend.server.engine
    raws = np.asarray([r.raw[0] for r in runs])
    seconds = [r.seconds["run"] for r in runs]
    return {
        "n_molecules": len(picks),
        "metrics": score(ckpt.task, y, to_predictions(ckpt.task, raws, ckpt.scaler)),
        "fhe_simulate_same_molecules": score(ckpt.task, y, to_predictions(ckpt.task, simulated, ckpt.scaler)),
        "fhe_equals_simulation": int(fhe_equals_simulation(raws, simulated).sum()),
        "latency": latency_summary(seconds),
        "run_s": seconds,
        "encrypt_median_s": float(np.median([r.seconds["encrypt"] for r in runs])),
        "decrypt_median_s": float(np.median([r.seconds["decrypt"] for r in runs])),
        "keygen_s": keys.seconds,
        "evaluation_key_bytes": keys.evaluation_key_bytes,
        "input_ciphertext_bytes": len(runs[-1].ciphertext),
        "output_ciphertext_bytes": len(runs[-1].output),
        "load_avg_1min": os.getloadavg()[0],
        "server_engine": engine,  # linear fast path or Concrete runtime (`PrivateServer.engine`)
    }


def run_molcloak(
    ds: Dataset, sp: Split, seed: int, config: PanelConfig, tick, execute: bool = True
) -> tuple[dict, object]:
    """molcloak's row for one seed: metrics, circuit, and the FHE-executed sample (when `execute`)."""
    start = time.perf_counter()
    fitted = molcloak_model(ds, SPLIT, seed, config)
    ckpt, compiled = fitted.checkpoint, fitted.compiled
    fit_s = time.perf_counter() - start
    if list(ckpt.smiles_test) != [ds.smiles[i] for i in sp.test]:
        raise ConfigError(f"{ds.task.name} seed {seed}: molcloak_model's test split differs from the panel's")
    tick("molcloak trained and compiled", "fit")
    row = {
        "source": MODEL_SOURCE + (f"; distilled from teacher {config.teacher}" if config.teacher else ""),
        "budget_ms": budget_ms(config),
        "metrics": compiled.metrics,
        "pbs": compiled.stats.pbs_count,
        "max_bits": compiled.stats.max_bit_width,
        "circuit": compiled.stats.to_dict(),
        "config": {
            "features": str(ckpt.featurizer),
            "model": ckpt.model_name,
            "model_config": ckpt.model_config,
            "compile": compiled.config.to_dict(),
            "train": {k: ckpt.train_info.get(k) for k in ("config", "best_epoch", "epochs_run")},
        },
        "fit": {  # the search: every variant, the final timing (raw, load factor, normalized), the flags
            **{k: v for k, v in fitted.to_dict().items() if k not in ("test_metrics", "circuit")},
            "n_candidates": len(fitted.candidates),
            "fit_minutes": config.fit_minutes,
        },
        "seconds": {"fit_and_compile": fit_s, "compile": compiled.seconds},
    }
    picks = sample_positions(len(sp.test), config.n_sample, seed) if execute else []
    if len(picks):
        start = time.perf_counter()
        row["fhe_execute"] = execute_sample(ckpt, compiled, picks, lambda: tick("FHE execution", "row"))
        row["seconds"]["fhe_execute"] = time.perf_counter() - start
    return row, ckpt


def run_cml_xgb(ds: Dataset, sp: Split, ckpt, seed: int, quick: bool) -> dict:
    """Concrete ML's XGBClassifier/XGBRegressor on molcloak's features, timed like `molcloak bench`."""
    if ds.task.kind not in ("binary", "regression"):
        return {"skipped": f"Concrete ML's XGB has no {ds.task.kind} model (one output per task)"}
    from .peers import BenchConfig, TaskData, bench_cml_xgb

    train = np.sort(np.concatenate([sp.train, sp.valid]))
    X_train = ckpt.featurizer.transform(ds.inputs(train))
    data = TaskData(ds.task.name, ds, ds.task, X_train, ds.y[train], ckpt.X_test, ckpt.y_test)
    return bench_cml_xgb(data, BenchConfig(models=("cml-xgb",), quick=quick, seed=seed), lambda _m: None)


# ---------------------------------------------------------------- the loop

ProgressFn = Callable[[str, float, float], None]  # (status, work done, total work), in rough seconds


def run_panel(
    config: PanelConfig,
    on_progress: ProgressFn | None = None,
    previous: dict | None = None,
    on_run: Callable[[dict], None] | None = None,
    command: str | None = None,
) -> dict:
    """Every selected dataset and seed; `previous` (an earlier result of the same configuration) lends
    its finished runs; `on_run(result so far)` after each (dataset, seed), e.g. to save a checkpoint."""
    entries, left_out = describe_panel(config.folder)
    chosen = config.select(entries)
    work = panel_report.Work(config, chosen, on_progress)
    done = panel_report.reusable_runs(previous, config)
    cache = references.FeatureCache()
    result = {
        "command": command or command_line(config),
        "config": {**dataclasses.asdict(config), "n_trees": config.n_trees, "n_sample": config.n_sample},
        "panel": {
            "folder": config.folder,
            "entries": {e.name: e.to_dict() for e in chosen},
            "left_out": left_out,
        },
        "split": {"method": SPLIT, "test_fraction": TEST_FRACTION, "seeds": list(config.run_seeds)},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": panel_report.machine(),
        "datasets": {},
    }
    for entry in chosen:
        ds = load_entry(config.folder, entry)
        result["datasets"][entry.name] = panel_report.dataset_header(entry, ds)
        runs = result["datasets"][entry.name]["runs"]
        for seed in config.run_seeds:
            key = panel_report.run_key(config, entry, seed)
            if key in done:
                runs.append({**done[key], "resumed": True})
                work.skip(entry, seed)
            else:
                runs.append(_one_run(ds, entry, seed, config, cache, work, done))
            result["datasets"][entry.name]["mean"] = panel_report.summarize(runs, ds.task)
            if on_run:
                on_run(result)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    work.finish()
    return result


def _one_run(ds: Dataset, entry: PanelEntry, seed: int, config: PanelConfig, cache, work, done) -> dict:
    """One (dataset, seed); a part (references, molcloak, Concrete ML's XGB) whose key is in `done` (an
    earlier JSON) is reused, so e.g. the references of a `--models references` run are not recomputed."""
    tick = work.ticker(entry, seed)
    start = time.perf_counter()
    sp = split_dataset(ds, SPLIT, test_fraction=TEST_FRACTION, seed=seed)
    train = np.sort(np.concatenate([sp.train, sp.valid]))
    wanted = [part for part in panel_report.PARTS if part.replace("_", "-") in config.models]
    run = {
        "key": panel_report.run_key(config, entry, seed),
        "part_keys": {p: panel_report.run_key(config, entry, seed, p) for p in wanted},
        "seed": seed,
        "n_train": int(len(sp.train)),
        "n_valid": int(len(sp.valid)),
        "n_test": int(len(sp.test)),
        "load_avg_at_start": list(os.getloadavg()),
        "resumed_parts": [],
    }
    for part in wanted:
        if run["part_keys"][part] in done and not (part == "molcloak" and "cml_xgb" in wanted):
            run.update(done[run["part_keys"][part]])
            run["resumed_parts"].append(part)
    if "references" in wanted and "references" not in run["resumed_parts"]:
        feats = cache.get(str(Path(config.folder) / entry.file), ds.smiles)
        tick("features", "features")
        run["feature_seconds"] = feats.seconds
        refs = references.run_references(
            ds.task, feats, ds.y, train, sp.test, seed, config.n_trees, on_done=lambda n, _s: tick(n, "ref")
        )
        run["imputation"] = refs.pop("_imputation")
        run["references"] = refs
    if {"molcloak", "cml_xgb"} & set(wanted) - set(run["resumed_parts"]):
        ours = "molcloak" in wanted
        try:
            row, ckpt = run_molcloak(ds, sp, seed, config, tick, execute=ours)
        except TuneError as exc:  # nothing met the budget (a loaded machine times slow): go on, rerun later
            run["molcloak_error"] = str(exc)
            del run["key"]  # not a finished run: a rerun redoes this part and reuses the references
            return _finish(run, start)
        if ours:
            run["molcloak"] = row
        if "cml_xgb" in wanted:
            run["cml_xgb"] = run_cml_xgb(ds, sp, ckpt, seed, config.quick)
            tick("Concrete ML XGB", "xgb")
    return _finish(run, start)


def _finish(run: dict, start: float) -> dict:
    run["seconds"] = time.perf_counter() - start
    run["load_avg_at_end"] = list(os.getloadavg())
    run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return run
