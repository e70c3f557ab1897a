"""`molcloak fit`: the most accurate encrypted model for the owner's data within a latency and key budget.

The search runs on the training part of the split only: models are trained on `train`, and chosen
by their metric on an inner validation part (`valid`, from Concrete ML's clear integer pass, deterministic, or
with `SearchSpace.scoring="simulate"` from the FHE simulation; `valid`'s part is whole scaffold groups of the
training molecules when the split is by scaffold, so the choice is judged on unseen scaffolds like
the test; a seeded random share otherwise); the test part is scored once, for the chosen model.
Latency is predicted from the circuit's PBS count and maximum bit width with the PBS cost measured
on this machine (`pbs_cost.Calibration`, the model `molcloak tune` uses) and, since compiling already
made throwaway keys (to measure the evaluation-key size), also timed: a few encrypted runs of the
candidate's own circuit, divided by the machine's load factor in the same minute (`latency.LoadGauge`;
not with `latency_check="raw"`); the timing decides when there is one. Three stages, each bounded,
with a time cap (quiet-machine minutes, `latency.SearchClock`) that returns the best so far:

1. features: every candidate feature spec with the reference network;
1b. with more than one teacher in the space (`--teacher auto`): the leader so far distilled from each other
   teacher, scored on the inner folds at once (`_distil_leader`: the time cap may end the search in stage 2;
   the first teacher runs even when the cap came in stage 1);
2. network: for the best feature specs (and the most accurate one on the inner part when its reference
   network is over the budget: `_carried_features`), one setting at a time (hidden widths, weight bits, input
   bits) moved from the best network found so far, kept when it is more accurate within budget; a width
   over the budget is tried again with the fewest weight bits (cheaper crypto parameters);
2b. teacher: with more than one teacher in the space (`--teacher auto`), the best networks retrained on a
   plaintext RandomForest's out-of-bag outputs as well as the labels (distillation), kept on validation;
   `--teacher auto` picks the RandomForest that sees the student's descriptors (`teacher.matched_teacher`);
3. compile settings: the best networks recompiled with other rounding bits and p_error (no training).

With `inner_folds` > 1 the choice is made on K inner folds of all the training molecules (`fit_search.Search`):
each feature spec's reference network after stage 1, and the `confirm` best other variants at the end, are
trained on each fold's training part and scored on its validation part, and compared by the mean. A fold's network
trains as the final refit does (`SearchSpace.fold_training="refit"`): for the epochs, or a linear network's penalty,
its search run chose, so the fold's validation part only scores it; early-stopped on that part instead, the
networks' fold means came out 0.02-0.03 optimistic against the linear machines' (session 31).

The most accurate candidates within the predicted budget are then compiled on the test split and
timed for real (keygen and encrypted runs through both halves), in order, until one runs within the
budget: the prediction ranks, the measurement decides. A refitted network over the budget with exact outputs is
timed once more with its outputs rounded to its rounding bits (`CompileConfig.output_bits`) before the next one:
refitting changes the output layer's weights, and an exact output of a wider range can alone need crypto parameters
with twice the bootstrap work (lipophilicity, session 17: 298 ms exact, 215 ms rounded). The chosen checkpoint
records its compile settings for `deploy`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .bundle import Checkpoint
from .compile import CompileConfig
from .data import Dataset
from .errors import FeaturizerError, TuneError
from .featurize import FeaturizerSpec
from .fit_search import Search
from .fit_space import (  # noqa: F401  (re-exported: `from molcloak.pipeline.fit import SearchSpace`)
    AUTO_TEACHERS,
    DEFAULT_FEATURE_CANDIDATES,
    INNER_VALID_FRACTION,
    Candidate,
    FitResult,
    SearchSpace,
    StepCallback,
    teachers_for,
)
from .latency import TIMED_RUNS, FitBudget, describe, measure_latency, normalized
from .pbs_cost import Calibration
from .splits import split_dataset
from .train import TrainConfig
from .workflow import compile_checkpoint

# the training each variant gets: at most 150 epochs, stopped after 30 without a better validation loss
FIT_TRAIN = TrainConfig(patience=30)


def fit(
    ds: Dataset,
    space: SearchSpace = SearchSpace(),
    budget: FitBudget = FitBudget(),
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    train: TrainConfig = FIT_TRAIN,
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
    space, left_out = task_space(ds, space, split, test_fraction, seed)
    if train.teacher and space.teachers == (None,):  # TrainConfig(teacher=...): every variant distilled
        space = dataclasses.replace(space, teachers=(train.teacher,))
    train = dataclasses.replace(train, seed=seed, teacher=None)
    if not refit:  # the deployed network is the search's early-stopped one: the folds train as it did
        space = dataclasses.replace(space, fold_training="stopped")
    timed_runs = TIMED_RUNS if time_candidates and measure_runs else 0
    args = (ds, space, budget, split, test_fraction, seed, train, calibration or Calibration(), on_step)
    search = Search(*args, timed_runs=timed_runs, refit=refit)
    _search(search)
    ranked = _preference(_choosable(search.candidates, budget), search.tolerance)
    if not ranked:
        raise TuneError(_nothing_fits(search.candidates, budget))
    chosen, ckpt, compiled, measured, over = _verify(search, ranked[: max(1, verify)], measure_runs)
    ckpt.train_info["compile"] = chosen.compile.to_dict()
    ckpt.train_info["fit"] = {
        "metric": search.metric,
        "valid": chosen.valid,
        "scoring": space.scoring,
        "cv": chosen.cv,
        "inner_folds": space.inner_folds,
        "fold_groups": space.fold_groups,
        "fold_training": space.fold_training,
        "folds_used": search.folds_used,
        "cv_folds_used": len(chosen.cv_folds or []),
        "cv_molecules": space.cv_molecules,
        "budget": dataclasses.asdict(budget),
        "features": chosen.features,
        "teacher": chosen.teacher,
        "measured_s": chosen.measured_s,
        "load_factor": chosen.measured_load_factor,
        "latency_check": budget.latency_check,
        "inner_valid": search.inner_valid,
        "refit": refit,
        "patience_steps": train.patience_steps,  # the variants' training (the refit runs the search's epochs)
        "left_out": list(left_out),
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
        search.tolerance,
        budget.latency_check,
        search.folds_used,
        left_out,
    )


def task_space(ds, space, split, test_fraction, seed) -> tuple[SearchSpace, tuple[str, ...]]:
    """`space.for_task` for the molecules the search trains on (all but the test part), and a line for each of
    the task's wide specs it leaves out, saying why. (It splits as `Search.inner_split` will again: the scaffolds
    are cached, `splits.murcko_scaffold`, so the second split costs milliseconds: on tox21 1.36 s, then 6 ms,
    session 44.)"""
    molecules = len(ds) - len(split_dataset(ds, split, test_fraction, INNER_VALID_FRACTION, seed).test)
    offered = space.for_task(ds.task, molecules)
    left_out = [f for f in space.for_task(ds.task).features if f not in offered.features]
    return offered, tuple(
        f"{spec}: not tried, its {FeaturizerSpec.parse(spec).width:,} encrypted inputs outnumber the "
        f"{molecules:,} training molecules"
        for spec in left_out
    )


def feature_scores(
    ds: Dataset,
    space: SearchSpace,
    split: str | None,
    test_fraction: float,
    seed: int,
    train: TrainConfig,
    refit: bool = False,
) -> list[tuple[Candidate, Checkpoint, Checkpoint | None]]:
    """fit's first stage alone, untimed: each feature spec's reference network scored on the inner part and
    (with `space.inner_folds` > 1) on the inner folds, with its checkpoint trained on the training part and (with
    `refit`) the one `fit` would deploy, refitted on the training and inner molecules (whose test split a benchmark
    of the choice may score: `evaluation/bench/choice.py`)."""
    train = dataclasses.replace(train, seed=seed, teacher=None)
    space, _ = task_space(ds, space, split, test_fraction, seed)
    args = (ds, space, FitBudget(), split, test_fraction, seed, train, Calibration(measure=False), None)
    search = Search(*args, timed_runs=0)
    out = []
    for features in space.features:
        cand = search.evaluate(features, space.start_for(features), space.first_compile, "features")
        search.cross_validate(cand)
        out.append((cand, search.trained[cand.trained], search.final(cand) if refit else None))
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


def _choosable(candidates: list[Candidate], budget: FitBudget) -> list[Candidate]:
    """The candidates the choice is made among: scored and within budget, and, when any was cross-validated,
    the cross-validated ones (compared on the same molecules)."""
    pool = [c for c in candidates if c.fits(budget) and np.isfinite(c.score)]
    return [c for c in pool if c.cv is not None] if any(c.cv is not None for c in pool) else pool


def _preference(pool: list[Candidate], tolerance: float) -> list[Candidate]:
    """Candidates in the order they are timed for the final choice: those within `tolerance` of the best score
    (inner folds' mean, else validation metric) with the richest features first (most encrypted inputs), then
    the fewest PBS and narrowest circuit; then the rest by score. Richest first: among feature sets the folds
    cannot tell apart, the one with more inputs scored higher on the test on herg, and no lower on bace and
    clintox (`evaluation/bench/choice.py`, seeds 0-2; before, the fewest PBS won such ties). `fit` passes the
    task's tolerance (`SearchSpace.tie_tolerance`): on regression 0, so the richest features break exact ties only."""
    if not pool:
        return []
    best = max(c.score for c in pool)
    near = sorted(
        (c for c in pool if c.score >= best - tolerance),
        key=lambda c: (-c.n_inputs, c.pbs, c.max_bits, -c.score),
    )
    rest = sorted((c for c in pool if c.score < best - tolerance), key=lambda c: (c.score, *c.rank()))
    return near + rest[::-1]


def _verify(search: Search, ranked: list[Candidate], measure_runs: int):
    """Compile the most accurate candidates (on the test split) and time them for real, in order, until
    one runs within the latency budget: the PBS cost model is a prediction, the measured median decides.
    When none does, the fastest measured one is kept and flagged (a loaded machine inflates timings)."""
    tried = []
    for base in ranked:
        ckpt = search.final(base)
        for cand in _final_variants(search, base):  # the next one only when the previous is over the budget
            compiled = compile_checkpoint(ckpt, cand.compile, measure_keys=True)
            if cand.stage == "outputs":  # the search never compiled it: its own circuit's figures
                search.record_circuit(cand, compiled.stats)
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


def _final_variants(search: Search, cand: Candidate):
    """The candidate, then (with exact outputs and rounded lookups) the same network with its outputs rounded to its
    rounding bits, added to the front as a variant of stage "outputs" (scored as the candidate: validation did not
    simulate it; its circuit figures are the refitted network's, and it has no search timing)."""
    yield cand
    cfg = cand.compile
    if cfg.output == "logits" and cfg.output_bits is None and cfg.rounding_bits:
        rounded = dataclasses.replace(
            cand,
            compile=dataclasses.replace(cfg, output_bits=cfg.rounding_bits),
            stage="outputs",
            run_s=None,
            load_factor=None,
        )
        search.candidates.append(rounded)
        yield rounded


def _search(search: Search) -> None:
    """The three stages, then the confirmation on the inner folds, which runs even when the time cap ended the
    stages: without it, on large data nothing explored after the feature stage could be chosen (the choice
    compares cross-validated variants only; lipophilicity seed 1, session 19: RDKit 2D + 384 bits at 16 units
    with 2-bit weights, 0.543 on the inner part and 241 ms, against 0.437 for the cross-validated choice)."""
    _stages(search)
    _confirm(search)


def _stages(search: Search) -> None:
    space = search.space
    cfg0, t0 = space.first_compile, space.teachers[0]
    unusable = []  # feature specs these molecules cannot fill (e.g. select:k=384 on a small dataset)
    for features in space.features:  # stage 1
        if search.out_of_time:
            break  # the leader so far is still distilled (`_distil_leader`)
        try:
            search.evaluate(features, space.start_for(features), cfg0, "features", t0)
        except FeaturizerError as exc:
            unusable.append(exc)
            search.on_step(f"skipped {features}: {exc}", search.done, search.planned)
    if len(unusable) == len(space.features):
        raise unusable[0]
    # the feature specs that fit the budget on every inner fold, the best on the inner part first (the time
    # cap may stop this: the leader is then taken on the inner part, and the choice made among the variants
    # scored on the folds: those scored here, the distilled leader and `_confirm`'s first)
    for cand in sorted(
        search.candidates, key=lambda c: c.valid if np.isfinite(c.valid) else -1, reverse=True
    ):
        if cand.fits(search.budget) and not search.out_of_time:
            search.cross_validate(cand)
    _distil_leader(search)
    for features in _carried_features(search):  # stage 2
        current = space.start_for(features)
        for name, values in space.network_moves(features):
            for value in values:
                if search.out_of_time:
                    return
                options = {**current, name: value}
                cand = search.evaluate(features, options, cfg0, "network", t0)
                cheaper = _lighter_weights(cand, options, search) if name == "hidden" else None
                if cheaper and not search.out_of_time:
                    search.evaluate(features, cheaper, cfg0, "network", t0, unplanned=True)
            mine = [c for c in _untaught(search) if c.features == features and c.compile == cfg0]
            best = search.best(mine) or search.best(mine, within=False)
            current = {**best.options} if best else current
    best_networks = [c for c in _best_networks(search, cfg0) if c.teacher == t0]
    for base in best_networks[: space.top_networks]:  # stage "teacher": the best networks distilled
        for teacher in space.teachers[1:]:
            if not search.out_of_time:
                search.evaluate(
                    base.features, base.options, cfg0, "teacher", space.teacher_for(teacher, base.features)
                )
    for base in _best_networks(search, cfg0)[: space.top_networks]:  # stage 3
        for cfg in _compile_variants(space, base, cfg0):
            if not search.out_of_time:
                search.evaluate(base.features, base.options, cfg, "compile", base.teacher)


def _untaught(search: Search) -> list[Candidate]:
    """The candidates trained with the space's first teacher (stages 1-2's): what stage 2 carries and climbs from
    and the teacher stage distils. The leader distilled early (`_distil_leader`) only competes in the final choice
    and stage 3: in stage 2 it would take a spec's second place and be the bar the label-only moves must beat."""
    return [c for c in search.candidates if c.teacher == search.space.teachers[0]]


def _distil_leader(search: Search) -> None:
    """Stage 1's leader (the variant the final choice would take now) distilled from each teacher after the
    first and scored on the inner folds at once, before stage 2: on large data the time cap ends the search in
    stage 2, before the teacher stage (tox21, session 33: on 2 seeds of 3 no distilled kernel machine was scored,
    while the one distilled from `rf-both` tests +0.003 over the labels, mean of seeds 0-2, session 35).
    The first teacher runs, and its variant is scored on the folds, even past the cap (ames seed 2, session 40: the
    cap came at the end of stage 1, so the leader went undistilled, 0.814 on the test against 0.817 distilled in
    session 39's replay). That is the work past the cap: the teacher fitted on the training rows and on each fold's
    (a RandomForest per task on multi-task data, each once per search), the student trained, compiled and timed once
    and on each fold (tox21: 313-328 s with its teacher fits, session 35), then `_confirm`'s first scoring on
    the folds and the final refit, none of them stopped by `SearchClock`'s wall-clock limit."""
    space = search.space
    leader = next(iter(_preference(_choosable(search.candidates, search.budget), search.tolerance)), None)
    if leader is None:
        return
    for i, teacher in enumerate(space.teachers[1:]):
        if i and search.out_of_time:  # the first teacher even past the cap
            return
        kind = space.teacher_for(teacher, leader.features)
        cand = search.evaluate(
            leader.features, leader.options, leader.compile, "teacher", kind, unplanned=True
        )
        if cand.fits(search.budget) and (i == 0 or not search.out_of_time) and cand.cv is None:
            search.planned += space.inner_folds > 1  # its scoring on the folds, too, is beyond the plan
            search.cross_validate(cand)


def _compile_variants(space, base: Candidate, cfg0: CompileConfig) -> list[CompileConfig]:
    """Stage 3's compile settings for a network: every rounding and p_error of the space but the first; for a
    circuit with no lookup (a kernel machine, 0 PBS) the p_error values only, since rounding bits only narrow what
    a lookup reads (clintox seed 0, session 21: 4 of 27 variants spent recompiling kernel machines at other
    rounding bits, to the same circuit)."""
    roundings = space.rounding_bits if base.pbs else (cfg0.rounding_bits,)
    configs = (space.compile_config(r, p) for r in roundings for p in space.p_error)
    return [cfg for cfg in dict.fromkeys(configs) if cfg != cfg0]


def _carried_features(search: Search) -> list[str | None]:
    """The feature specs stage 2 explores networks for, in order: the first `top_features` in the order of the
    final choice (within budget, compared on the inner folds), then the rest by score; except that the most
    accurate spec on the inner validation part, when its reference network is over the budget and it beats every
    carried spec there by more than `tolerance`, goes first and the last one drops out (with two or more places):
    stage 2's narrower and lighter networks may bring it within the budget, and on large data the time cap ends
    the search within the first spec's moves (lipophilicity, session 19: in second place, given by the rule or by
    the ranking, it was reached late or never). The specs it displaces keep their reference networks, so the
    choice still compares them.

    lipophilicity, seeds 0-2 (sessions 17 and 19): RDKit 2D + 384 Morgan bits scored R² 0.52-0.56 on the inner
    part against 0.48 at most for the specs within budget, but its 16-unit network ran 296-406 ms, so stage 2
    explored it late or never, and the choices ended at RMSE +13 to +27 %; where it went first (session 18, seed 0:
    no spec fitted; session 19, seed 1: this rule) stage 2 found it at 8 units within the budget, at +6 and +10 %."""
    space, pool = search.space, _untaught(search)
    ranked = _preference(_choosable(pool, search.budget), search.tolerance)
    chosen = {id(c) for c in ranked}
    ranked += sorted((c for c in pool if id(c) not in chosen), key=lambda c: -c.score)
    # one label-only variant per spec: stage 1 scores each spec once (`SearchSpace` drops repeated specs), and the
    # folds and `_distil_leader` add no label-only variant
    carried = [c for c in ranked if np.isfinite(c.valid)][: space.top_features]
    top = max((c for c in pool if np.isfinite(c.valid)), key=lambda c: c.valid, default=None)
    others = [c for c in carried if top is None or c.features != top.features]
    if (
        top is not None
        and len(carried) >= 2
        and not top.fits(search.budget)
        and top.valid > max(c.valid for c in others) + space.tolerance  # noise on one part, whatever the task
    ):
        carried = [top, *others][: len(carried)]
    return [c.features for c in carried]


def _lighter_weights(cand: Candidate, options: dict, search: Search) -> dict | None:
    """A width over the budget, tried again with the space's fewest weight bits: the first layer's weights
    set the noise the bootstraps must absorb, so lighter weights buy cheaper crypto parameters. tox21 seed 0,
    32 hidden units on 384 inputs (quiet machine): 3-bit weights 339 ms and 54 MB of keys, 2-bit 215 ms and
    27 MB at the same FHE-simulated ROC-AUC; 3-bit inputs (a narrower circuit) saved nothing
    (evaluation/PERFORMANCE.md, session 11). One move at a time never reached it: 32 units at 3 bits was over
    the budget, so the weight bits were moved on the 16-unit network."""
    lightest = min(search.space.weight_bits, default=None)
    if not np.isfinite(cand.valid) or cand.fits(search.budget):
        return None
    filled = cand.options  # the network's settings with its defaults filled in (what was trained)
    if lightest is None or filled.get("weight_bits", lightest) <= lightest:
        return None
    return {**options, "weight_bits": lightest}


def _confirm(search: Search) -> None:
    """The `confirm` most accurate variants within budget (on the inner part) not scored on the inner folds yet
    (the network, teacher and compile stages' best) scored on every fold too, so that the final choice compares
    them with the feature sets on all the training molecules; the first one even when the time cap is reached."""
    pool = [c for c in search.candidates if c.fits(search.budget) and np.isfinite(c.valid) and c.cv is None]
    seeded = lambda c: (c.valid, -c.predicted_s, -c.pbs, -c.max_bits)  # noqa: E731  (no timing: reproducible)
    for i, cand in enumerate(sorted(pool, key=seeded, reverse=True)[: search.space.confirm]):
        if i == 0 or not search.out_of_time:
            search.cross_validate(cand)


COMPILE_SLACK = 1.15  # rounding to 4 bits saved 6-10 % of a run in session 11; a network further over is out


def _best_networks(search: Search, cfg0: CompileConfig) -> list[Candidate]:
    """The networks at the first compile settings, most accurate first, among those within the budget or
    close enough that the compile stage may bring them in: distilling or recompiling a network 40 % over
    the budget spends variants that can never be chosen (clintox seed 0, session 12: 6 of 35 variants on
    32-unit networks at 293-811 ms against 250)."""
    budget = search.budget
    near = dataclasses.replace(
        budget, latency_ms=budget.latency_ms * COMPILE_SLACK, key_mb=budget.key_mb * COMPILE_SLACK
    )
    pool = (c for c in search.candidates if c.compile == cfg0 and np.isfinite(c.valid) and c.fits(near))
    return sorted(pool, key=lambda c: c.valid, reverse=True)
