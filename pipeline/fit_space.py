"""The search space and the records of `molcloak fit`: what it may try, each variant it scored, what it chose.

`fit.py` runs the search; these are its plain data: the `SearchSpace` (feature specs, networks, compile
settings, teachers), one `Candidate` per trained and compiled variant (its validation metric, circuit
statistics and timings), and the `FitResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .bundle import Checkpoint
from .compile import DEFAULT_P_ERROR, CompileConfig
from .errors import ConfigError, FeaturizerError
from .featurize import FeaturizerSpec
from .latency import FitBudget, describe, normalized
from .random_features import FeatureMap, MinHash
from .runconfig import DEFAULT_FEATURES, DEFAULT_MODEL
from .splits import FOLD_GROUPS, check_fold_groups
from .teacher import MATCHED, TEACHERS, matched_teacher

if TYPE_CHECKING:
    from .workflow import Compiled

# Feature specs tried by default, cheapest first: the 10 physchem descriptors, then richer sets
# reduced to a bounded number of encrypted inputs by selection fitted on the training molecules.
DEFAULT_FEATURE_CANDIDATES = (
    DEFAULT_FEATURES,
    "rdkit2d:scale=quantile+select:k=32",
    "rdkit2d:scale=quantile+morgan_count:r=2,n=2048,scale=quantile+select:k=48",
    # Morgan bits carry what the RandomForest on ECFP4 uses; every encrypted input costs server time (about
    # 0.12 ms each on this machine, whatever the width: 2,058 inputs ran 370 ms, too slow), so 256 are kept
    "physchem:scale=quantile+morgan:r=2,n=2048+select:k=256",
    # RDKit 2D + Morgan bits, the RandomForest's richest features, 384 kept (ames keeps at most ~440 Morgan
    # columns after its filters): ames seed 0 0.790 (others at most 0.779), herg seed 0 0.901 (others 0.880)
    "rdkit2d:scale=quantile+morgan:r=2,n=2048+select:k=384",
    # a kernel machine: a linear layer on 2,048 random Fourier features of the RDKit 2D descriptors, no bootstrap
    # (`random_features`). herg seeds 0-2 (session 27): chosen on every seed, 0.886 FHE-executed at about 100 ms
    # against 0.862 for session 18's networks; ames seed 0 chose it too (0.797 FHE-simulated, as the network it
    # replaced, at 91 instead of 211 ms), tox21 on every seed (0.758 against 0.751, session 28); on clintox and bace
    # its inner folds rate it below the networks
    "rdkit2d:scale=quantile+rff:n=2048",
    # a linear model on the 2,048 ECFP4 bits as they are: no hidden layer, no bootstrap, the convex fit. On bace
    # seeds 0-2 it tests 0.862 / 0.860 / 0.884 refitted, level with the best RandomForest, and with refit folds
    # (`fold_training`) fit's first stage picks it on every seed (session 31; with stopped folds the networks'
    # optimistic fold scores kept it out on two seeds of three). Weaker on descriptor-driven assays, where the
    # folds rank it below the rff kernel machine (clintox, herg: never picked)
    "morgan:r=2,n=2048+linear",
)
# regression only, after the default candidates when the training molecules are at least its 2,560 inputs
# (`extra_offered`): the kernel machine on a wider map, 2,560 random Fourier features.
# lipophilicity seeds 0-2, distilled from rf-both as `fit` distils its leader (session 37, `bench.replay`): inner
# folds R² 0.607 / 0.616 / 0.589 against 0.605 / 0.603 / 0.574 for 2,048, test RMSE 0.805 / 0.801 / 0.801 against
# 0.827 / 0.822 / 0.827 (FHE-simulated), timed 185-222 ms in the search against about 147 ms. 3,072 features tested
# as well (0.806 / 0.791 / 0.817) but timed 259-267 ms, over the budget (about 60 % of a kernel machine's time is
# Concrete expanding the compressed input ciphertexts, session 38). Classification keeps 2,048 only: tox21's folds
# rank 3,072 below it on every seed and it tests 0.010 lower on the mean (0.756 against 0.766, sessions 33-34); on
# ames it tied on the folds, took the tie as the richer spec and tested no better (session 30)
REGRESSION_FEATURE_CANDIDATES = ("rdkit2d:scale=quantile+rff:n=2560",)
# classification only, after the default candidates when the training molecules are at least its 4,096 inputs
# (`extra_offered`: ames and tox21 try it, bace, clintox and herg do not): the kernel machine's 2,048 random Fourier features beside 2,048
# quantile-scaled ECFP4 counts, 4,096 encrypted inputs, no bootstrap. Concrete's runtime took 369 ms for 4,096 inputs,
# over the budget; the server's `linear_fast_path` gives the same ciphertexts in about 90 ms (session 39-40). ames
# seeds 0-2 (session 39, `bench.replay` with fit's code): distilled from rf-both its folds lead everything fit chose
# (0.843 against 0.833-0.838) and it tests 0.812 / 0.822 / 0.817 against 0.802 / 0.810 / 0.803 FHE-executed for the
# rff 2,048 machine. Regression keeps its own list: never measured there
CLASSIFICATION_FEATURE_CANDIDATES = (
    "rdkit2d:scale=quantile+rff:n=2048+morgan_count:r=2,n=2048,scale=quantile",
)


def extra_offered(spec: str, molecules: int | None) -> bool:
    """Whether a search on `molecules` training molecules (None: not counted) tries `spec`, one of the wide
    specs a task adds after the defaults: only with at least one molecule per encrypted input. Measured on the
    panel with the 4,096-input classification spec: on ames (5.8k training molecules) it led the folds and the
    test; on bace (1.2k) it led the folds by 0.002-0.005 and tested 0.004-0.020 lower on every seed, making bace
    miss its target, on herg (0.5k) it was chosen and tested 0.0025 lower on the mean than the specs it replaced,
    on clintox (1.2k) it was never chosen (sessions 35, 40-41; tox21, with 5.8k as ames, keeps it and its folds rank it
    below the 2,048-input machine). The regression spec's 2,560 inputs stay offered on lipophilicity (3.4k)."""
    return molecules is None or FeaturizerSpec.parse(spec).width <= molecules


# fit --teacher auto: labels only, then stage 1's leader and the best networks distilled from the teacher that
# matches each one's descriptors (`teacher.matched_teacher`: rf-both on RDKit 2D, rf otherwise)
AUTO_TEACHERS = (None, MATCHED)


def check_fold_training(value: str) -> None:
    """A `--fold-training` value (`SearchSpace.fold_training`): one line naming it and the choices when unknown."""
    if value not in FOLD_TRAININGS:
        raise ConfigError(f"--fold-training {value!r}: use one of {', '.join(FOLD_TRAININGS)}")


def folds_needed(sizes: list[int], cv_molecules: int) -> int:
    """How many of the folds (of `sizes` validation molecules, in order) fit validates on: the first ones that
    together hold `cv_molecules` molecules; all of them when `cv_molecules` is 0 or never reached."""
    total = 0
    for n, size in enumerate(sizes, 1):
        total += size
        if cv_molecules and total >= cv_molecules:
            return n
    return len(sizes)


def teachers_for(option: str | None) -> tuple[str | None, ...]:
    """`SearchSpace.teachers` for a --teacher option: none, auto, or one teacher for every variant; anything
    else is a one-line `ConfigError` naming the choices."""
    if option not in (None, "none", "auto", *TEACHERS):
        raise ConfigError(f"--teacher {option}: choose one of {', '.join(TEACHERS)}, auto or none")
    return AUTO_TEACHERS if option == "auto" else (None if option in (None, "none") else option,)


MAX_MEASURED_BITS = 9  # the cost model is calibrated up to this width; wider circuits are only timed
INNER_VALID_FRACTION = 0.2
StepCallback = Callable[[str, int, int], None]  # (message, steps done, steps planned)


SCORINGS = ("clear", "simulate")
FOLD_TRAININGS = ("stopped", "refit")
CLEAR_MAX_P_ERROR = (
    1e-4  # per bootstrap: under it, a molecule's ~10-40 bootstraps all succeed 99.6 % of the time
)


@dataclass(frozen=True)
class SearchSpace:
    features: tuple[str | None, ...] = DEFAULT_FEATURE_CANDIDATES  # None: a tabular dataset's columns
    # tried after `features` on a regression task when `features` starts with the defaults, each on at least as
    # many training molecules as its inputs (`for_task`)
    regression_features: tuple[str, ...] = REGRESSION_FEATURE_CANDIDATES
    # tried after `features` on a classification task, likewise
    classification_features: tuple[str, ...] = CLASSIFICATION_FEATURE_CANDIDATES
    start: tuple[tuple[str, object], ...] = (
        ("hidden", (16,)),
        ("weight_bits", 3),
        ("act_bits", 3),
        ("input_bits", 4),
    )
    hidden: tuple[tuple[int, ...], ...] = ((8,), (16,), (24,), (32,), (16, 16))
    weight_bits: tuple[int, ...] = (2, 3, 4)
    # 4-bit activations: 8 levels after ReLU instead of 4 (the quantizer is signed), at the same PBS count. RDKit
    # 2D + 384 Morgan bits, 16 hidden, seeds 0-2: bace 0.843 -> 0.853 ROC-AUC but keys 27 -> 54 MB and about
    # 140 -> 215 ms; lipophilicity RMSE 0.820 -> 0.816. The search keeps it where it pays within budget
    act_bits: tuple[int, ...] = (3, 4)
    input_bits: tuple[int, ...] = (3, 4)
    rounding_bits: tuple[int | None, ...] = (5, 4, 6)  # the first is used in stages 1-2
    # DEFAULT_P_ERROR (1e-6) per PBS, as `train`: the key-rotation bound of the security model (README, "Keys")
    # assumes it. 0.05 gave the same FHE-simulated metric in 5-41 % less time and 19.6 MB of keys (herg 32
    # hidden 406 -> 301 ms, tox21 32 hidden 552 ms and 54 MB -> 326 ms; evaluation/results/p_error_{herg,tox21}
    # _s13.json), but every prediction then carries a bootstrap failure with probability about 1 - 0.95^PBS,
    # which the owner must choose knowingly
    p_error: tuple[float | None, ...] = (DEFAULT_P_ERROR,)
    # round every variant's outputs to its lookups' bits before they are decrypted (`CompileConfig.output_bits`):
    # an exact output can double the cost of every bootstrap (lipophilicity seed 0's refitted network: 298 ->
    # 215 ms, RMSE 0.882 -> 0.891; PERFORMANCE.md, session 17). Off until the panel has measured it
    round_outputs: bool = False
    top_features: int = 2  # feature specs carried into stage 2
    top_networks: int = 3  # networks retrained with the other teachers and recompiled in stage 3
    # plaintext teachers (teacher.TEACHERS, or MATCHED; None = labels only): the first is used in stages 1-2,
    # the others are tried on stage 1's leader and the best networks (distillation helps some assays and
    # features and hurts others)
    teachers: tuple[str | None, ...] = (None,)
    model: str = DEFAULT_MODEL
    # the choice is made on the mean metric over this many inner folds of all the training molecules (1: on
    # the one inner validation part): every feature spec's reference network, then the `confirm` best variants
    inner_folds: int = 5
    confirm: int = 3
    # which molecules the scaffold folds validate on (`splits.inner_folds`): every scaffold group ("balanced"),
    # only the smallest groups, like a scaffold test split's ("rare"), or rare ones when one group would fill
    # more than half of a balanced fold ("auto", `splits.fold_groups_for`)
    fold_groups: str = FOLD_GROUPS[0]
    # folds validated on, in order, until they hold at least this many molecules (0: all): on small data all K
    # (bace, herg, clintox); on large data a few, which already validate on more molecules than the whole inner
    # part of bace (ames, 5,800 training molecules: 2 of 5 folds, about 2,300). Each fold trains a network on
    # the others and FHE-simulates its part: on ames 5 folds took 97 s per variant, and the 15-minute cap ran out
    # in the feature stage on lipophilicity at load 5
    cv_molecules: int = 2000
    # classification: variants within this much of the best score count as equally accurate (a difference this
    # small is noise on a few hundred validation molecules): of those, the richest features (most inputs), then the
    # fewest PBS. Also stage 2's carry rule's margin on the one inner part, whatever the task
    tolerance: float = 0.005
    # the same for regression (R² on the inner folds); 0: the higher fold mean wins. "Most inputs first" was
    # measured on classification only (herg, bace, clintox); on lipophilicity seed 0 (session 32) a fold tie
    # within 0.005 (R² 0.589 against 0.585) went to the 2,048-input kernel machine, which tests RMSE 0.854
    # FHE-simulated against 0.823 for the network it passed over (session 33, `evaluation/PERFORMANCE.md`)
    regression_tolerance: float = 0.0
    # what a variant is scored by on the inner validation part and folds (`SCORINGS`): "clear", Concrete ML's
    # integer forward pass in the clear (the circuit's arithmetic with exact rounding, deterministic, so a rerun
    # scores and chooses the same), or "simulate", Concrete's FHE simulation (adds approximate rounding's and the
    # bootstraps' errors, drawn from a generator Concrete seeds from the system: the same network on clintox's
    # 117 inner molecules scored 0.848 and 0.864 in two runs, enough to change the choice). A variant whose
    # p_error is above CLEAR_MAX_P_ERROR is simulated either way: its bootstrap errors are part of its accuracy
    scoring: str = "clear"
    # how a variant's network is trained on each inner fold (`FOLD_TRAININGS`): "refit", as `fit` trains what it
    # deploys: on the fold's training part, for the epochs (a linear network: the penalty) its search run chose on
    # the inner part, so the fold's validation part only scores; or "stopped" (until session 31), early-stopped on
    # the fold's validation part, which then scores it: the epoch is chosen on the molecules it is scored on, and
    # the networks' fold means came out 0.018-0.027 higher than refit ones on bace, clintox and herg, the linear
    # machines' 0.000-0.004 (evaluation/PERFORMANCE.md, session 31)
    fold_training: str = "refit"

    def for_task(self, task, molecules: int | None = None) -> SearchSpace:
        """The space a dataset's search runs: when its feature specs start with the default candidates (the
        defaults, or a panel's extra specs after them), `regression_features` after them on a regression task
        (one target or several), `classification_features` on any other, each only when the search trains on
        at least as many `molecules` as it has encrypted inputs (`extra_offered`; None: no count, all of them).
        `molcloak fit --features` passes none: a user's list is searched as given."""
        if self.features[: len(DEFAULT_FEATURE_CANDIDATES)] != DEFAULT_FEATURE_CANDIDATES:
            return self
        extra = self.classification_features if task.is_classification else self.regression_features
        extra = tuple(spec for spec in extra if extra_offered(spec, molecules))
        if not extra:
            return self
        return replace(self, features=self.features + extra)  # repeats are tried once

    def tie_tolerance(self, metric: str) -> float:
        """The tolerance the choice uses for a selection metric (`selection_metric`): R² is regression's."""
        return self.regression_tolerance if metric == "r2" else self.tolerance

    def __post_init__(self):
        # a spec given twice (`--features X --features X`, or a panel's extra spec that is already a default)
        # is tried once: scored twice it would only take a place in the search from another variant
        object.__setattr__(self, "features", tuple(dict.fromkeys(self.features)))
        if self.scoring not in SCORINGS:
            raise ConfigError(f"--scoring {self.scoring!r}: use one of {', '.join(SCORINGS)}")
        check_fold_training(self.fold_training)
        unknown = [t for t in self.teachers if t is not None and t not in (*TEACHERS, MATCHED)]
        if unknown or not self.teachers or self.teachers[0] == MATCHED:  # stages 1-2 train on one teacher
            raise ConfigError(
                f"teachers {list(self.teachers)}: use None or one of {', '.join(TEACHERS)} "
                f"({MATCHED!r}: only after the first)"
            )
        if self.cv_molecules < 0:
            raise ConfigError(
                f"--cv-molecules {self.cv_molecules}: use 0 (every inner fold) or a positive count"
            )
        if self.inner_folds < 1 or self.confirm < 1:
            raise ConfigError(
                f"--inner-folds {self.inner_folds} (confirm {self.confirm}): use 1 (one inner validation part) "
                "or more inner folds, e.g. 5, and confirm at least 1 variant"
            )
        check_fold_groups(self.fold_groups, "--fold-groups")
        for p in self.p_error:
            CompileConfig(p_error=p)  # a ConfigError naming the value when it is not a probability
        if not self.features or not self.hidden or not self.rounding_bits or not self.p_error:
            raise ConfigError(
                "the search space is empty; give at least one feature spec, width, rounding and p_error"
            )

    @property
    def start_options(self) -> dict:
        """The reference network: `start`, with each setting the space restricts (e.g. `--act-bits 2`) and
        that `start` is outside of replaced by the space's first value for it."""
        allowed = {"hidden": self.hidden, "weight_bits": self.weight_bits, "act_bits": self.act_bits}
        allowed["input_bits"] = self.input_bits
        options = {}
        for k, v in self.start:
            if k in allowed and allowed[k] and v not in allowed[k]:
                v = allowed[k][0]
            options[k] = list(v) if isinstance(v, tuple) else v
        return options

    @property
    def first_compile(self) -> CompileConfig:
        return self.compile_config(self.rounding_bits[0], self.p_error[0])

    def compile_config(self, rounding_bits: int | None, p_error: float | None) -> CompileConfig:
        """A variant's compile settings: approximate rounding, and its outputs rounded to the same bits when the
        space rounds outputs."""
        output_bits = rounding_bits if self.round_outputs else None
        return CompileConfig(rounding_bits, "approximate", p_error, output_bits=output_bits)

    def teacher_for(self, teacher: str | None, features: str | None) -> str | None:
        """The teacher a student on `features` learns from for an entry of `teachers` (`MATCHED`: by its
        descriptors, `teacher.matched_teacher`)."""
        return matched_teacher(features) if teacher == MATCHED else teacher

    def start_for(self, features: str | None) -> dict:
        """The reference network of a feature spec: `start_options`, except that a spec with a random feature map
        (rff:n=N or minhash:n=N, `random_features`) or ending in linear (the columns as they are) starts as a kernel
        machine: no hidden layer, the space's widest weights up to 4 bits. Its circuit then has no bootstrap at all;
        a hidden layer on its N inputs would cost N times as many multiplications into every hidden unit and wider
        accumulators (herg seed 0, 1,024 features, 16 units: 16 PBS, 12 bits, 122 MB of keys, about 0.8 s; session
        21). minhash's inputs take two
        values (+1 and -1) at any input bits: with no part kept after it, it starts at the fewest, for the narrowest
        sums."""
        options = self.start_options
        if kernel_map(features) is None:
            return options
        weights = [b for b in self.weight_bits if b <= 4] or [min(self.weight_bits)]
        options = {**options, "hidden": [], "weight_bits": max(weights)}
        return {**options, "input_bits": min(self.input_bits)} if _two_valued(features) else options

    def network_moves(self, features: str | None = None) -> list[tuple[str, list]]:
        """Stage 2's moves for a feature spec: hidden widths, weight, activation and input bits; for a kernel
        machine's features the bits of its one layer only (for minhash's two values alone, the weights only)."""
        moves = [
            ("hidden", [list(h) for h in self.hidden]),
            ("weight_bits", list(self.weight_bits)),
            ("act_bits", list(self.act_bits)),
            ("input_bits", list(self.input_bits)),
        ]
        if kernel_map(features) is None:
            return moves
        kept = ("weight_bits",) if _two_valued(features) else ("weight_bits", "input_bits")
        return [m for m in moves if m[0] in kept]


def kernel_map(features: str | None) -> FeatureMap | None:
    """The map (rff:n=N, minhash:n=N, or a final linear: none) of a spec, which makes its network a kernel machine;
    None without one, or for a spec that does not parse (its featurization reports the error, naming the part)."""
    spec = _parsed(features)
    return spec.feature_map if spec else None


def is_kernel(features: str | None) -> bool:
    """Whether a feature spec has a feature map (or ends in linear): a kernel machine's inputs."""
    return kernel_map(features) is not None


def _two_valued(features: str | None) -> bool:
    """Whether every input of the spec is a minhash value (+1 or -1): a minhash map with no part kept after it."""
    spec = _parsed(features)
    return spec is not None and isinstance(spec.feature_map, MinHash) and not spec.kept_parts


def _parsed(features: str | None) -> FeaturizerSpec | None:
    try:
        return FeaturizerSpec.parse(features) if features else None
    except FeaturizerError:
        return None


@dataclass
class Candidate:
    """One trained and compiled variant, scored on the inner validation part."""

    features: str | None
    options: dict
    compile: CompileConfig
    stage: str
    valid: float = float("nan")  # validation metric, as `SearchSpace.scoring` scores it (higher is better)
    float_valid: float = float("nan")
    pbs: int = 0
    max_bits: int = 0
    key_bytes: int = 0
    predicted_s: float = float("inf")
    run_s: float | None = None  # median of a few encrypted runs of its circuit during the search
    load_factor: float | None = None  # of the machine while run_s was measured (None: not gauged)
    seconds: float = 0.0
    measured_s: float | None = None  # median of real encrypted runs, for the candidates timed at the end
    measured_load_factor: float | None = None
    teacher: str | None = None  # the plaintext teacher it was distilled from (None: labels only)
    trained: str = ""  # key of its checkpoint in the search's cache
    cv: float | None = None  # mean validation metric over the inner folds (None: not cross-validated)
    cv_folds: list[float] = field(default_factory=list)
    cv_sizes: list[int] = field(default_factory=list)  # molecules in each fold's validation part
    n_inputs: int = 0  # encrypted inputs: the width of its feature spec
    scored_by: str = ""  # "clear" or "simulate": what `valid` and `cv` come from

    def simulated(self, space: SearchSpace) -> bool:
        """Whether the search scores this variant by FHE simulation rather than by the clear pass."""
        p_error = self.compile.p_error
        return space.scoring == "simulate" or (p_error is not None and p_error > CLEAR_MAX_P_ERROR)

    @property
    def score(self) -> float:
        """What the final choice compares: the inner folds' mean when there is one, else the validation
        metric."""
        return self.valid if self.cv is None else self.cv

    @property
    def network(self) -> str:
        o = self.options
        hidden = ",".join(map(str, o.get("hidden", [])))
        return f"h={hidden} w{o.get('weight_bits')}a{o.get('act_bits')}i{o.get('input_bits')}"

    @property
    def compile_label(self) -> str:
        p = "default" if self.compile.p_error is None else f"{self.compile.p_error:g}"
        out = f" out{self.compile.output_bits}" if self.compile.output_bits else ""
        return f"r{self.compile.rounding_bits}{out} p={p}"

    @property
    def label(self) -> str:
        taught = f" teacher={self.teacher}" if self.teacher else ""
        return f"{self.features or 'columns'} {self.network}{taught} {self.compile_label}"

    @property
    def latency_text(self) -> str:
        if self.run_s is None:
            return f"{self.predicted_s * 1e3:.0f} ms predicted"
        return describe(self.run_s, self.load_factor)

    def rank(self) -> tuple:
        """Higher is better: the validation metric, ties broken by the cost model's prediction (seeded,
        so a rerun chooses the same) and then by the (normalized) timing."""
        return (self.valid, -self.predicted_s, -(normalized(self.run_s, self.load_factor) or 0.0))

    def checked_s(self, check: str) -> float:
        """The latency the budget is checked on: the timing (normalized to a quiet machine unless the
        check is raw) when there is one, else the cost model's prediction."""
        if self.run_s is None:
            return self.predicted_s
        return normalized(self.run_s, self.load_factor) if check == "normalized" else self.run_s

    def fits(self, budget: FitBudget) -> bool:
        return (
            self.checked_s(budget.latency_check) * 1e3 <= budget.latency_ms
            and self.key_bytes <= budget.key_mb * 1e6
        )

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "features": self.features,
            "model_options": self.options,
            "compile": self.compile.to_dict(),
            "stage": self.stage,
            "teacher": self.teacher,
            "valid": self.valid,
            "scored_by": self.scored_by,
            "float_valid": self.float_valid,
            "cv": self.cv,
            "cv_folds": self.cv_folds,
            "cv_sizes": self.cv_sizes,
            "n_inputs": self.n_inputs,
            "pbs": self.pbs,
            "max_bits": self.max_bits,
            "evaluation_key_bytes": self.key_bytes,
            "predicted_s": self.predicted_s,
            "run_s": self.run_s,
            "load_factor": self.load_factor,
            "run_normalized_s": normalized(self.run_s, self.load_factor),
            "measured_s": self.measured_s,
            "measured_load_factor": self.measured_load_factor,
            "measured_normalized_s": normalized(self.measured_s, self.measured_load_factor),
            "seconds": self.seconds,
        }


@dataclass
class FitResult:
    checkpoint: Checkpoint
    compiled: Compiled
    chosen: Candidate
    candidates: list[Candidate]
    metric: str
    measured: dict = field(default_factory=dict)
    stopped_early: bool = False
    over_budget: bool = False  # no timed candidate ran within the budget: the fastest one was kept
    inner_valid: str = "random"  # the inner validation part: whole scaffold groups or random molecules
    tolerance: float = 0.0  # scores this close to the best counted as equal (SearchSpace.tie_tolerance)
    latency_check: str = "normalized"  # what the budget was checked on (FitBudget.latency_check)
    # the inner folds' kind: "scaffold, rare", "scaffold, balanced", "random"; "" = one inner part
    folds_used: str = ""
    left_out: tuple[str, ...] = ()  # the task's wide specs not tried, each with the reason (`extra_offered`)

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "chosen": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "test_metrics": self.compiled.metrics,
            "circuit": self.compiled.stats.to_dict(),
            "measured": self.measured,
            "stopped_early": self.stopped_early,
            "over_budget": self.over_budget,
            "inner_valid": self.inner_valid,
            "tolerance": self.tolerance,
            "latency_check": self.latency_check,
            "folds_used": self.folds_used,
            "left_out": list(self.left_out),
        }


def selection_metric(task) -> str:
    """ROC-AUC for classification (mean over tasks for multi-label), R² for regression."""
    return "roc_auc" if task.is_classification else "r2"
