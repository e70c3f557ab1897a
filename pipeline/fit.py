"""`molcloak fit`: the most accurate encrypted model for the owner's data within a latency and key budget.

The search runs on the training part of the split only: models are trained on `train`, and chosen
by their FHE-simulated metric on an inner validation part (`valid`: whole scaffold groups of the
training molecules when the split is by scaffold, so the choice is judged on unseen scaffolds like
the test; a seeded random share otherwise); the test part is scored once, for the chosen model.
Latency is predicted from the circuit's PBS count and maximum bit width with the PBS cost measured
on this machine (`pbs_cost.Calibration`, the model `molcloak tune` uses) and, since compiling already
made throwaway keys (to measure the evaluation-key size), also timed: a few encrypted runs of the
candidate's own circuit, divided by the machine's load factor in the same minute (`latency.LoadGauge`;
not with `latency_check="raw"`); the timing decides when there is one. Three stages, each bounded,
with a time cap (quiet-machine minutes, `latency.SearchClock`) that returns the best so far:

1. features: every candidate feature spec with the reference network;
2. network: for the best feature specs, one setting at a time (hidden widths, weight bits, input
   bits) moved from the best network found so far, kept when it is more accurate within budget;
2b. teacher: with more than one teacher in the space (`--teacher auto`), the best networks retrained on a
   plaintext RandomForest's out-of-bag outputs as well as the labels (distillation), kept on validation;
3. compile settings: the best networks recompiled with other rounding bits and p_error (no training).

With `inner_folds` > 1 the choice is made on K inner folds of all the training molecules (`cross_validate`):
each feature spec's reference network after stage 1, and the `confirm` best other variants at the end, are
trained on each fold's training part and FHE-simulated on its validation part, and compared by the mean.

The most accurate candidates within the predicted budget are then compiled on the test split and
timed for real (keygen and encrypted runs through both halves), in order, until one runs within the
budget: the prediction ranks, the measurement decides. The chosen checkpoint records its compile
settings for `deploy`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import networks
from .bundle import Checkpoint
from .compile import CompileConfig
from .data import Dataset
from .errors import CompilationError, FeaturizerError, TuneError
from .featurize import FeaturizerSpec, raw_features
from .fit_space import (  # noqa: F401  (re-exported: `from molcloak.pipeline.fit import SearchSpace`)
    AUTO_TEACHERS,
    DEFAULT_FEATURE_CANDIDATES,
    INNER_VALID_FRACTION,
    MAX_MEASURED_BITS,
    Candidate,
    FitResult,
    SearchSpace,
    StepCallback,
    selection_metric,
    teachers_for,
)
from .latency import (
    TIMED_RUNS,
    FitBudget,
    LoadGauge,
    SearchClock,
    describe,
    measure_latency,
    normalized,
    time_circuit,
)
from .metrics import score, to_predictions
from .pbs_cost import Calibration
from .splits import Split, can_score, inner_folds, split_dataset
from .teacher import TEACHERS, teacher_outputs
from .train import TrainConfig, predict_raw
from .workflow import compile_checkpoint, train_on_features, unfitted_featurizer


class _Search:
    """The state of one search: features cached per spec, trained checkpoints cached per network."""

    def __init__(self, ds, space, budget, split, test_fraction, seed, train, calibration, on_step, **how):
        self.ds, self.space, self.budget, self.train = ds, space, budget, train
        self.timed_runs, self.refit = how.get("timed_runs", TIMED_RUNS), how.get("refit", True)
        self.split, self.test_fraction, self.seed = split, test_fraction, seed
        self.calibration, self.on_step = calibration, on_step or (lambda msg, done, total: None)
        self.gauge = LoadGauge(calibration) if budget.latency_check == "normalized" else None
        self.metric = selection_metric(ds.task)
        self.clock = SearchClock(budget.max_minutes, self.gauge is not None)
        self.features: dict[str | None, tuple] = {}
        self.inner_valid = "random"  # how the inner validation part was drawn (scaffold or random)
        self.trained: dict[str, Checkpoint] = {}
        self.candidates: list[Candidate] = []
        self._teachers: dict[tuple, np.ndarray] = {}  # (kind, rows) -> out-of-bag outputs on those rows
        self._refitted: dict[str | None, tuple] = {}  # features -> (split, spec, X) on train + inner valid
        self._raw: dict[str | None, np.ndarray] = {}  # molecular features -> raw features of every row
        self._split: Split | None = None
        self._folds: list[Split] | None = None
        self._fold_models: dict[tuple, Checkpoint] = {}  # (candidate's trained key, fold) -> checkpoint
        self._fold_features: dict[tuple, tuple] = {}  # (features, fold) -> (spec, X)
        self.planned = len(space.features) + space.top_features * sum(
            len(v) for _, v in space.network_moves()
        )
        self.planned += space.top_networks * (len(space.rounding_bits) * len(space.p_error) - 1)
        self.planned += space.top_networks * (len(space.teachers) - 1)
        self.planned += (len(space.features) + space.confirm) * (space.inner_folds > 1)

    @property
    def done(self) -> int:  # steps for the progress bar: variants scored, and variants cross-validated
        return len(self.candidates) + sum(c.cv is not None for c in self.candidates)

    @property
    def out_of_time(self) -> bool:
        return self.clock.out_of_time()

    def fitted(self, features: str | None, rows: np.ndarray) -> tuple:
        """(the featurizer fitted on `rows`, features of every row). A molecular spec's raw features (RDKit,
        milliseconds per molecule) are computed once per search and refitted on each subset of them."""
        spec = unfitted_featurizer(self.ds, features)
        if not isinstance(spec, FeaturizerSpec):  # a tabular dataset's columns: cheap to recompute
            spec = spec.fit(self.ds.inputs(rows), self.ds.y[rows])
            return spec, spec.transform(self.ds.inputs())
        raw = self.raw(features)
        spec = spec.fit_raw(raw[rows], self.ds.y[rows])
        return spec, spec.transform_raw(raw)

    def raw(self, features: str) -> np.ndarray:
        """The raw features (`raw_features`) of every row for a molecular feature spec, computed once."""
        if features not in self._raw:
            self._raw[features] = raw_features(FeaturizerSpec.parse(features), self.ds.inputs())
        return self._raw[features]

    def inner_split(self) -> Split:
        """Train / inner validation / test rows, the same for every feature spec."""
        if self._split is None:
            for valid_method in dict.fromkeys(
                ("scaffold" if self.split == "scaffold" else "random", "random")
            ):
                sp = split_dataset(
                    self.ds, self.split, self.test_fraction, INNER_VALID_FRACTION, self.seed, valid_method
                )
                if can_score(self.ds, sp.valid):
                    break
                self.on_step(  # e.g. every small scaffold group holds one class: choose on random molecules
                    f"the {valid_method} inner validation part has one class only; using a random one",
                    self.done,
                    self.planned,
                )
            self.inner_valid = valid_method
            if len(sp.valid) < 10:
                raise TuneError(
                    f"the inner validation part has {len(sp.valid)} molecules; fit needs at least 10 to choose "
                    "a model: use a larger dataset or a smaller --test-fraction"
                )
            self._split = sp
        return self._split

    def featurize(self, features: str | None):
        if features not in self.features:
            sp = self.inner_split()
            self.features[features] = (*self.fitted(features, sp.train), sp)
        return self.features[features]

    def evaluate(
        self, features: str | None, options: dict, cfg: CompileConfig, stage: str, teacher: str | None = None
    ) -> Candidate:
        start = time.perf_counter()
        spec, X, sp = self.featurize(features)
        options = networks.make_config(self.space.model, options).to_dict()  # defaults filled: one key
        key = f"{features}|{sorted((k, str(v)) for k, v in options.items())}|{teacher}"
        if key not in self.trained:
            soft = self.teacher(teacher, sp.train) if teacher else None
            train = dataclasses.replace(self.train, teacher=teacher)
            self.trained[key] = train_on_features(
                self.ds, spec, X, sp, self.space.model, options, train, soft_train=soft
            )
        ckpt = self.trained[key]
        done = next((c for c in self.candidates if c.trained == key and c.compile == cfg), None)
        if done is not None:
            return done
        valid_view = dataclasses.replace(ckpt, X_test=X[sp.valid], y_test=self.ds.y[sp.valid], smiles_test=[])
        cand = Candidate(features, dict(ckpt.model_config), cfg, stage, teacher=teacher, trained=key)
        try:
            compiled = compile_checkpoint(valid_view, cfg, measure_keys=True)
        except CompilationError as exc:  # a variant Concrete cannot compile is skipped, the search goes on
            self.on_step(f"skipped {cand.label}: {str(exc)[:120]}", self.done, self.planned)
            return cand
        raw = predict_raw(ckpt.build_model(), X[sp.valid])
        float_metrics = score(
            self.ds.task, self.ds.y[sp.valid], to_predictions(self.ds.task, raw, ckpt.scaler)
        )
        cand.valid = compiled.metrics["fhe_simulate"].get(self.metric, float("nan"))
        cand.float_valid = float_metrics.get(self.metric, float("nan"))
        s = compiled.stats
        cand.pbs, cand.max_bits = s.pbs_count, s.max_bit_width
        cand.key_bytes = s.serialized_evaluation_key_bytes
        if s.max_bit_width <= MAX_MEASURED_BITS:
            cand.predicted_s = self.calibration.predict(
                s.pbs_count, s.max_bit_width, cfg.rounding_bits, cfg.p_error
            )
        if self.timed_runs and cand.key_bytes <= self.budget.key_mb * 1e6:  # valid has >= 10 rows
            timing = time_circuit(compiled.q_module, X[sp.valid], self.timed_runs, self.gauge)
            cand.run_s, cand.load_factor = timing.seconds, timing.load_factor if self.gauge else None
        cand.seconds = time.perf_counter() - start
        self.clock.charge(cand.seconds, cand.load_factor)
        self.candidates.append(cand)
        fits = "within budget" if cand.fits(self.budget) else "over budget"
        self.on_step(
            f"{cand.label}: {self.metric} {cand.valid:.3f}, {cand.latency_text}, {fits}",
            self.done,
            self.planned,
        )
        return cand

    def folds(self) -> list[Split]:
        """The K inner folds of the training and inner validation molecules (the same kind of groups as the
        inner validation part; random ones when a scaffold fold would hold one class only)."""
        if self._folds is None:
            sp = self.inner_split()
            rows, k = np.union1d(sp.train, sp.valid), self.space.inner_folds
            for method in dict.fromkeys((self.inner_valid, "random")):
                self._folds = inner_folds(self.ds, rows, k, method, self.seed)
                if all(can_score(self.ds, f.valid) for f in self._folds):
                    break
        return self._folds

    def cross_validate(self, cand: Candidate) -> None:
        """Score `cand` on every inner fold (its network and teacher trained on the others, compiled with its
        settings, FHE-simulated on the fold): `cand.cv` is the mean. One inner part of a few hundred
        molecules ranks feature sets by noise (bace: 0.01-0.03); all the training molecules rank them better."""
        if self.space.inner_folds < 2 or cand.cv is not None or not np.isfinite(cand.valid):
            return
        start = time.perf_counter()
        try:
            scores = [self._fold_score(cand, f, fold) for f, fold in enumerate(self.folds())]
        except (FeaturizerError, CompilationError) as exc:  # as in the search: the variant keeps no score
            # (a fold trains on fewer molecules: a selection may find too few varied columns)
            self.on_step(f"{cand.label}: not cross-validated: {str(exc)[:120]}", self.done, self.planned)
            scores = []
        seconds = time.perf_counter() - start
        cand.seconds += seconds
        self.clock.charge(seconds, self.gauge.load_factor() if self.gauge else None)  # quiet-machine time
        if scores:
            cand.cv, cand.cv_folds = float(np.mean(scores)), [float(x) for x in scores]
            msg = f"{cand.label}: {self.metric} {cand.cv:.3f} over {len(scores)} inner folds"
            self.on_step(msg, self.done, self.planned)

    def _fold_score(self, cand: Candidate, f: int, fold: Split) -> float:
        """`cand`'s network trained on the fold's training part and FHE-simulated on its validation part."""
        if (cand.features, f) not in self._fold_features:
            self._fold_features[cand.features, f] = self.fitted(cand.features, fold.train)
        spec, X = self._fold_features[cand.features, f]
        if (cand.trained, f) not in self._fold_models:
            soft = self.teacher(cand.teacher, fold.train) if cand.teacher else None
            train = dataclasses.replace(self.train, teacher=cand.teacher)
            self._fold_models[cand.trained, f] = train_on_features(
                self.ds, spec, X, fold, self.space.model, cand.options, train, soft_train=soft
            )
        view = dataclasses.replace(
            self._fold_models[cand.trained, f], X_test=X[fold.valid], y_test=self.ds.y[fold.valid]
        )
        compiled = compile_checkpoint(dataclasses.replace(view, smiles_test=[]), cand.compile, False)
        return compiled.metrics["fhe_simulate"].get(self.metric, float("nan"))

    def teacher(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """A teacher's out-of-bag outputs on `rows`, computed once per search, kind and rows (the search's
        training rows; the final refit's training + inner validation rows)."""
        key = (kind, rows.tobytes())
        if key not in self._teachers:
            self.on_step(f"training the {kind} teacher", self.done, self.planned)
            raw = None if self.ds.is_tabular else self.raw(TEACHERS[kind])
            self._teachers[key] = teacher_outputs(self.ds, rows, kind, self.seed, raw=raw)
        return self._teachers[key]

    def refitted(self, features: str | None) -> tuple:
        """(split, featurizer, features of every row) with scaling and selection refitted on the training and
        inner validation molecules together, computed once per feature spec."""
        if features not in self._refitted:
            _, _, sp = self.featurize(features)
            both = Split(np.union1d(sp.train, sp.valid), np.array([], dtype=int), sp.test, sp.method)
            self._refitted[features] = (both, *self.fitted(features, both.train))
        return self._refitted[features]

    def final(self, cand: Candidate) -> Checkpoint:
        """The chosen features and network refitted on training and inner validation molecules together, for as many
        epochs as its search run needed (validation only chose it; with a scaffold inner part, leaving its
        small scaffold groups out would keep the model from the molecules most like the test's)."""
        ckpt = self.trained[cand.trained]
        if not self.refit:
            return ckpt
        both, spec, X = self.refitted(cand.features)  # scaling and selection refitted on the same molecules
        epochs = int(ckpt.train_info["best_epoch"])
        cfg = dataclasses.replace(self.train, epochs=epochs, patience=epochs, teacher=cand.teacher)
        soft = self.teacher(cfg.teacher, both.train) if cfg.teacher else None
        final = train_on_features(
            self.ds, spec, X, both, self.space.model, cand.options, cfg, soft_train=soft
        )
        final.train_info["n_inner_valid"] = int(len(self.featurize(cand.features)[2].valid))
        return final

    def best(self, pool: list[Candidate] | None = None, within: bool = True) -> Candidate | None:
        pool = [c for c in (self.candidates if pool is None else pool) if np.isfinite(c.valid)]
        pool = [c for c in pool if c.fits(self.budget)] if within else pool
        return max(pool, key=Candidate.rank, default=None)


def fit(
    ds: Dataset,
    space: SearchSpace = SearchSpace(),
    budget: FitBudget = FitBudget(),
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    train: TrainConfig = TrainConfig(patience=30),
    calibration: Calibration | None = None,
    on_step: StepCallback | None = None,
    measure_runs: int = 5,
    verify: int = 3,
    time_candidates: bool = True,
    refit: bool = True,
) -> FitResult:
    """Search, choose on the inner validation part, compile the choice on the test part and time it.

    `time_candidates`: time every candidate's circuit during the search (else the cost model alone
    ranks them until the final timing of the `verify` best). `refit`: retrain the chosen network on the
    training and inner validation molecules together before compiling it (else the search's model)."""
    if ds.is_tabular:
        space = dataclasses.replace(space, features=(None,))
    if train.teacher and space.teachers == (None,):  # TrainConfig(teacher=...): every variant distilled
        space = dataclasses.replace(space, teachers=(train.teacher,))
    train = dataclasses.replace(train, seed=seed, teacher=None)
    timed_runs = TIMED_RUNS if time_candidates and measure_runs else 0
    args = (ds, space, budget, split, test_fraction, seed, train, calibration or Calibration(), on_step)
    search = _Search(*args, timed_runs=timed_runs, refit=refit)
    _search(search)
    pool = [c for c in search.candidates if c.fits(budget) and np.isfinite(c.score)]
    if any(c.cv is not None for c in pool):  # compared on the same molecules: the cross-validated ones
        pool = [c for c in pool if c.cv is not None]
    ranked = _preference(pool, space.tolerance)
    if not ranked:
        raise TuneError(_nothing_fits(search.candidates, budget))
    chosen, ckpt, compiled, measured, over = _verify(search, ranked[: max(1, verify)], measure_runs)
    ckpt.train_info["compile"] = chosen.compile.to_dict()
    ckpt.train_info["fit"] = {
        "metric": search.metric,
        "valid": chosen.valid,
        "cv": chosen.cv,
        "inner_folds": space.inner_folds,
        "budget": dataclasses.asdict(budget),
        "features": chosen.features,
        "teacher": chosen.teacher,
        "measured_s": chosen.measured_s,
        "load_factor": chosen.measured_load_factor,
        "latency_check": budget.latency_check,
        "inner_valid": search.inner_valid,
        "refit": refit,
    }
    return FitResult(
        ckpt,
        compiled,
        chosen,
        search.candidates,
        search.metric,
        measured,
        search.out_of_time,
        over,
        search.inner_valid,
        space.tolerance,
        budget.latency_check,
    )


def feature_scores(
    ds: Dataset, space: SearchSpace, split: str | None, test_fraction: float, seed: int, train: TrainConfig
) -> list[tuple[Candidate, Checkpoint]]:
    """fit's first stage alone, untimed: each feature spec's reference network scored on the inner part and
    (with `space.inner_folds` > 1) on the inner folds, with its checkpoint trained on the training part (whose
    test split a benchmark of the choice may score: `evaluation/bench/choice.py`)."""
    train = dataclasses.replace(train, seed=seed, teacher=None)
    args = (ds, space, FitBudget(), split, test_fraction, seed, train, Calibration(measure=False), None)
    search = _Search(*args, timed_runs=0)
    out = []
    for features in space.features:
        cand = search.evaluate(features, space.start_options, space.first_compile, "features")
        search.cross_validate(cand)
        out.append((cand, search.trained[cand.trained]))
    return out


def _nothing_fits(candidates: list[Candidate], budget: FitBudget) -> str:
    cheapest = min(candidates, key=lambda c: c.checked_s(budget.latency_check), default=None)
    found = (
        f"the cheapest found is {cheapest.label} at {cheapest.latency_text} and "
        f"{cheapest.key_bytes / 1e6:.1f} MB of keys"
        if cheapest
        else "no variant compiled"
    )
    return (
        f"no configuration meets {budget.latency_ms:g} ms and {budget.key_mb:g} MB ({found}); raise "
        "--budget-ms / --max-key-mb or try smaller networks"
    )


def _preference(pool: list[Candidate], tolerance: float) -> list[Candidate]:
    """Candidates in the order they are timed for the final choice: those within `tolerance` of the best
    score (inner folds' mean, else validation metric), fastest first (by PBS count and bit width,
    deterministic), then the rest by score."""
    if not pool:
        return []
    best = max(c.score for c in pool)
    near = sorted(
        (c for c in pool if c.score >= best - tolerance), key=lambda c: (c.pbs, c.max_bits, -c.score)
    )
    rest = sorted((c for c in pool if c.score < best - tolerance), key=lambda c: (c.score, *c.rank()))
    return near + rest[::-1]


def _verify(search: _Search, ranked: list[Candidate], measure_runs: int):
    """Compile the most accurate candidates (on the test split) and time them for real, in order, until
    one runs within the latency budget: the PBS cost model is a prediction, the measured median decides.
    When none does, the fastest measured one is kept and flagged (a loaded machine inflates timings)."""
    tried = []
    for cand in ranked:
        ckpt = search.final(cand)
        compiled = compile_checkpoint(ckpt, cand.compile, measure_keys=True)
        measured = measure_latency(ckpt, compiled, measure_runs, search.gauge) if measure_runs else {}
        cand.measured_s = measured.get("median_run_s")
        cand.measured_load_factor = measured.get("load_factor") if search.gauge else None
        checked = normalized(cand.measured_s, cand.measured_load_factor)
        tried.append((checked, cand, ckpt, compiled, measured))
        msg = f"timed {cand.label}: {describe(cand.measured_s, cand.measured_load_factor)}"
        search.on_step(msg, search.done, search.planned)
        if checked is None or checked * 1e3 <= search.budget.latency_ms:
            return cand, ckpt, compiled, measured, False
    return (*min(tried, key=lambda t: t[0])[1:], True)


def _search(search: _Search) -> None:
    space = search.space
    start, cfg0, t0 = space.start_options, space.first_compile, space.teachers[0]
    unusable = []  # feature specs these molecules cannot fill (e.g. select:k=384 on a small dataset)
    for features in space.features:  # stage 1
        if search.out_of_time:
            return
        try:
            search.evaluate(features, start, cfg0, "features", t0)
        except FeaturizerError as exc:
            unusable.append(exc)
            search.on_step(f"skipped {features}: {exc}", search.done, search.planned)
    if len(unusable) == len(space.features):
        raise unusable[0]
    # the feature specs that fit the budget on every inner fold, the best on the inner part first (the time
    # cap may stop this: the choice is then made among those scored)
    for cand in sorted(
        search.candidates, key=lambda c: c.valid if np.isfinite(c.valid) else -1, reverse=True
    ):
        if cand.fits(search.budget) and not search.out_of_time:
            search.cross_validate(cand)
    ranked = sorted(
        (c for c in search.candidates if np.isfinite(c.valid)),
        key=lambda c: (c.fits(search.budget), c.score),
        reverse=True,
    )
    for features in [c.features for c in ranked][: space.top_features]:  # stage 2
        current = start
        for name, values in space.network_moves():
            for value in values:
                if search.out_of_time:
                    return
                options = {**current, name: value}
                search.evaluate(features, options, cfg0, "network", t0)
            mine = [c for c in search.candidates if c.features == features and c.compile == cfg0]
            best = search.best(mine) or search.best(mine, within=False)
            current = {**best.options} if best else current
    best_networks = _best_networks(search, cfg0)
    for base in best_networks[: space.top_networks]:  # stage "teacher": the best networks distilled
        for teacher in space.teachers[1:]:
            if not search.out_of_time:
                search.evaluate(base.features, base.options, cfg0, "teacher", teacher)
    for base in _best_networks(search, cfg0)[: space.top_networks]:  # stage 3
        for rounding in space.rounding_bits:
            for p_error in space.p_error:
                cfg = CompileConfig(rounding, "approximate", p_error)
                if cfg != cfg0 and not search.out_of_time:
                    search.evaluate(base.features, base.options, cfg, "compile", base.teacher)
    _confirm(search)


def _confirm(search: _Search) -> None:
    """The `confirm` most accurate variants within budget (on the inner part) not scored on the inner folds yet
    (the network, teacher and compile stages' best) scored on every fold too, so that the final choice compares
    them with the feature sets on all the training molecules; the first one even when the time cap is reached."""
    pool = [c for c in search.candidates if c.fits(search.budget) and np.isfinite(c.valid) and c.cv is None]
    seeded = lambda c: (c.valid, -c.predicted_s, -c.pbs, -c.max_bits)  # noqa: E731  (no timing: reproducible)
    for i, cand in enumerate(sorted(pool, key=seeded, reverse=True)[: search.space.confirm]):
        if i == 0 or not search.out_of_time:
            search.cross_validate(cand)


def _best_networks(search: _Search, cfg0: CompileConfig) -> list[Candidate]:
    pool = (c for c in search.candidates if c.compile == cfg0 and np.isfinite(c.valid))
    return sorted(pool, key=lambda c: c.valid, reverse=True)
