"""The state of one `fit` search (`Search`): features and trained networks cached per spec, variants scored
on the inner validation part (`evaluate`) and on the inner folds (`cross_validate`), and the chosen variant
refitted on all the training molecules (`final`). The stages that drive it are in `fit.py`."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import networks
from .bundle import Checkpoint
from .compile import CompileConfig
from .errors import CompilationError, FeaturizerError, TuneError
from .featurize import FeaturizerSpec, raw_features
from .fit_space import INNER_VALID_FRACTION, MAX_MEASURED_BITS, Candidate, folds_needed, selection_metric
from .latency import TIMED_RUNS, LoadGauge, SearchClock, time_circuit
from .metrics import score, to_predictions
from .splits import Split, can_score, fold_groups_for, inner_folds, split_dataset
from .teacher import TEACHERS, teacher_outputs
from .train import TrainConfig, predict_raw
from .workflow import compile_checkpoint, train_on_features, unfitted_featurizer

SCORE_KEYS = {False: "quantized", True: "fhe_simulate"}  # compile_checkpoint's metrics, by whether simulated


class Search:
    """The state of one search: features cached per spec, trained checkpoints cached per network."""

    def __init__(self, ds, space, budget, split, test_fraction, seed, train, calibration, on_step, **how):
        self.ds, self.space, self.budget, self.train = ds, space, budget, train
        self.timed_runs, self.refit = how.get("timed_runs", TIMED_RUNS), how.get("refit", True)
        self.split, self.test_fraction, self.seed = split, test_fraction, seed
        self.calibration, self.on_step = calibration, on_step or (lambda msg, done, total: None)
        self.gauge = LoadGauge(calibration) if budget.latency_check == "normalized" else None
        self.metric = selection_metric(ds.task)
        self.tolerance = space.tie_tolerance(self.metric)  # scores this close to the best count as equal
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
        self.folds_used = ""  # the inner folds' kind: "scaffold, rare", "scaffold, balanced" or "random"
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
        self,
        features: str | None,
        options: dict,
        cfg: CompileConfig,
        stage: str,
        teacher: str | None = None,
        unplanned: bool = False,
    ) -> Candidate:
        """Train (once per network), compile, score on the inner validation part (`SearchSpace.scoring`) and
        time one variant.
        `unplanned`: a variant the plan could not count beforehand (a weight-bits retry); it is added to the
        progress bar's total when it runs, so the bar never passes 100 %."""
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
        self.planned += unplanned
        valid_view = dataclasses.replace(ckpt, X_test=X[sp.valid], y_test=self.ds.y[sp.valid], smiles_test=[])
        cand = Candidate(features, dict(ckpt.model_config), cfg, stage, teacher=teacher, trained=key)
        cand.n_inputs = int(X.shape[1])
        simulate = cand.simulated(self.space)
        cand.scored_by = "simulate" if simulate else "clear"
        try:
            compiled = compile_checkpoint(valid_view, cfg, measure_keys=True, simulate=simulate)
        except CompilationError as exc:  # a variant Concrete cannot compile is skipped, the search goes on
            self.on_step(f"skipped {cand.label}: {str(exc)[:120]}", self.done, self.planned)
            return cand
        raw = predict_raw(ckpt.build_model(), X[sp.valid])
        float_metrics = score(
            self.ds.task, self.ds.y[sp.valid], to_predictions(self.ds.task, raw, ckpt.scaler)
        )
        cand.valid = compiled.metrics[SCORE_KEYS[simulate]].get(self.metric, float("nan"))
        cand.float_valid = float_metrics.get(self.metric, float("nan"))
        self.record_circuit(cand, compiled.stats)
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
        inner validation part, on `space.fold_groups`, "auto" resolved by `splits.fold_groups_for`; when a fold
        would be empty or hold one class only, balanced scaffold folds, then random ones: `self.folds_used` says
        which)."""
        if self._folds is None:
            sp = self.inner_split()
            rows, k = np.union1d(sp.train, sp.valid), self.space.inner_folds
            groups = fold_groups_for(self.ds, rows, k, self.space.fold_groups)
            tries = [(self.inner_valid, groups), (self.inner_valid, "balanced"), ("random", "balanced")]
            for method, groups in dict.fromkeys(tries):
                self._folds = inner_folds(self.ds, rows, k, method, self.seed, groups)
                self.folds_used = f"{method}, {groups}" if method == "scaffold" else method
                if all(can_score(self.ds, f.valid) for f in self._folds):
                    break
        return self._folds

    def cv_folds(self) -> list[Split]:
        """The folds validated on: in order, until they hold `space.cv_molecules` molecules (all with 0)."""
        folds = self.folds()
        return folds[: folds_needed([len(f.valid) for f in folds], self.space.cv_molecules)]

    def cross_validate(self, cand: Candidate) -> None:
        """Score `cand` on every inner fold (its network and teacher trained on the others, compiled with its
        settings, scored on the fold): `cand.cv` is the mean. One inner part of a few hundred
        molecules ranks feature sets by noise (bace: 0.01-0.03); all the training molecules rank them better.
        On large data only the first folds are used (`cv_folds`): they already hold thousands of molecules."""
        if self.space.inner_folds < 2 or cand.cv is not None or not np.isfinite(cand.valid):
            return
        start = time.perf_counter()
        try:
            folds = self.cv_folds()
            scores = [self._fold_score(cand, f, fold) for f, fold in enumerate(folds)]
        except (FeaturizerError, CompilationError) as exc:  # as in the search: the variant keeps no score
            # (a fold trains on fewer molecules: a selection may find too few varied columns)
            self.on_step(f"{cand.label}: not cross-validated: {str(exc)[:120]}", self.done, self.planned)
            scores = []
        seconds = time.perf_counter() - start
        cand.seconds += seconds
        self.clock.charge(seconds, self.gauge.load_factor() if self.gauge else None)  # quiet-machine time
        if scores:
            cand.cv, cand.cv_folds = float(np.mean(scores)), [float(x) for x in scores]
            cand.cv_sizes = [int(len(f.valid)) for f in folds]
            n = sum(cand.cv_sizes)
            msg = f"{cand.label}: {self.metric} {cand.cv:.3f} over {len(scores)} inner folds ({n} molecules)"
            self.on_step(msg, self.done, self.planned)

    def _fold_score(self, cand: Candidate, f: int, fold: Split) -> float:
        """`cand`'s network trained on the fold's training part and scored on its validation part."""
        if (cand.features, f) not in self._fold_features:
            self._fold_features[cand.features, f] = self.fitted(cand.features, fold.train)
        spec, X = self._fold_features[cand.features, f]
        if (cand.trained, f) not in self._fold_models:
            soft = self.teacher(cand.teacher, fold.train) if cand.teacher else None
            train, rows = dataclasses.replace(self.train, teacher=cand.teacher), fold
            if self.space.fold_training == "refit":  # no validation rows: the fold's part only scores
                train = self._refit_config(cand, len(fold.train))
                rows = Split(fold.train, np.array([], dtype=int), fold.valid, fold.method)
            self._fold_models[cand.trained, f] = train_on_features(
                self.ds, spec, X, rows, self.space.model, cand.options, train, soft_train=soft
            )
        view = dataclasses.replace(
            self._fold_models[cand.trained, f], X_test=X[fold.valid], y_test=self.ds.y[fold.valid]
        )
        simulate = cand.simulated(self.space)
        compiled = compile_checkpoint(
            dataclasses.replace(view, smiles_test=[]), cand.compile, False, simulate
        )
        return compiled.metrics[SCORE_KEYS[simulate]].get(self.metric, float("nan"))

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

    def record_circuit(self, cand: Candidate, s) -> None:
        """The candidate's circuit statistics (`CircuitStats`) and the cost model's latency for them."""
        cand.pbs, cand.max_bits = s.pbs_count, s.max_bit_width
        cand.key_bytes = s.serialized_evaluation_key_bytes
        cand.predicted_s = float("inf")
        if s.max_bit_width <= MAX_MEASURED_BITS:
            cfg = cand.compile
            cand.predicted_s = self.calibration.predict(
                s.pbs_count, s.max_bit_width, cfg.rounding_bits, cfg.p_error
            )

    def final(self, cand: Candidate) -> Checkpoint:
        """The chosen features and network refitted on training and inner validation molecules together, for as many
        epochs as its search run needed, or for a linear network with the L2 penalty its search run chose (validation only
        chose it; with a scaffold inner part, leaving its small scaffold groups out would keep the model from the
        molecules most like the test's)."""
        if not self.refit:
            return self.trained[cand.trained]
        both, spec, X = self.refitted(cand.features)  # scaling and selection refitted on the same molecules
        cfg = self._refit_config(cand, len(both.train))
        soft = self.teacher(cfg.teacher, both.train) if cfg.teacher else None
        final = train_on_features(
            self.ds, spec, X, both, self.space.model, cand.options, cfg, soft_train=soft
        )
        final.train_info["n_inner_valid"] = int(len(self.featurize(cand.features)[2].valid))
        return final

    def _refit_config(self, cand: Candidate, n_rows: int) -> TrainConfig:
        """The training of `cand`'s network on `n_rows` molecules with no validation rows: every epoch its search
        run needed, or for a linear network the penalty its search run chose (`linear_fit`), chosen on validation
        for a mean loss over the search's training rows: the same weight against the data over `n_rows` is that
        penalty x n_train / n_rows."""
        ckpt = self.trained[cand.trained]
        # best_epoch 0: no epoch improved (a loss that was never finite); train one epoch then
        epochs = max(1, int(ckpt.train_info["best_epoch"]))
        l2 = ckpt.train_info["final"].get("l2")
        l2 = None if l2 is None else l2 * int(ckpt.train_info["n_train"]) / n_rows
        return dataclasses.replace(
            self.train, epochs=epochs, patience=epochs, patience_steps=None, teacher=cand.teacher, l2=l2
        )

    def best(self, pool: list[Candidate] | None = None, within: bool = True) -> Candidate | None:
        pool = [c for c in (self.candidates if pool is None else pool) if np.isfinite(c.valid)]
        pool = [c for c in pool if c.fits(self.budget)] if within else pool
        return max(pool, key=Candidate.rank, default=None)
