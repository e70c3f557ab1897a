"""Timing compiled circuits on this machine: a few encrypted runs of a circuit that has keys, or keygen and
runs through both halves of a temporary bundle (what `molcloak fit` measures its candidates with).

Other processes slow every run down on a shared machine, so each timing can be paired with runs of a
fixed reference circuit (`LoadGauge`: a vector of PBS shaped like one layer of the default model),
interleaved with the candidate's runs: the reference's median now over its time on this machine when
quiet is the load factor, and the candidate's median over that factor its normalized time, the time
a quiet machine would give. When other processes used under 10 % of the CPU meanwhile (`CpuWindow`), the
machine was quiet and the factor is 1. `--latency-check normalized` (the default) checks the budget on it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Checkpoint
from .errors import ConfigError
from .files import molcloak_home
from .pbs_cost import Calibration, key, layer_circuit
from .workflow import Compiled, deploy

TIMED_RUNS = 3  # encrypted runs of a candidate's circuit (after one warm-up), median kept
LATENCY_CHECKS = ("normalized", "raw")
REFERENCE = (8, 5, 1e-6, 8)  # bits, lookup bits, p_error, PBS of the reference circuit
QUIET_OTHERS = 0.10  # other processes' share of the CPU below which the machine counts as quiet


@dataclass(frozen=True)
class Timing:
    """The median of a circuit's runs, and the reference circuit's median in the same minute."""

    seconds: float
    reference_s: float | None = None  # None: no reference was run (load factor 1)
    reference_quiet_s: float | None = None
    others_cpu: float | None = (
        None  # other processes' share of the CPU meanwhile (`CpuWindow`; None: unknown)
    )

    @property
    def load_factor(self) -> float:
        """How much slower the machine runs the reference now than when quiet; never below 1 (a run
        faster than the quiet time only means that time was set on a busier minute), and 1 when other
        processes used under 10 % of the CPU meanwhile: the reference's own spread on a quiet machine
        (70-124 ms on this VM) is not load, and dividing by it passed models over the budget."""
        quiet = self.others_cpu is not None and self.others_cpu < QUIET_OTHERS
        if quiet or not self.reference_s or not self.reference_quiet_s:
            return 1.0
        return max(self.reference_s / self.reference_quiet_s, 1.0)

    @property
    def normalized_s(self) -> float:
        return self.seconds / self.load_factor

    def to_dict(self) -> dict:
        return {
            "median_run_s": self.seconds,
            "load_factor": self.load_factor,
            "normalized_run_s": self.normalized_s,
            "reference_s": self.reference_s,
            "reference_quiet_s": self.reference_quiet_s,
            "others_cpu": self.others_cpu,
        }


class CpuWindow:
    """The share of the machine's CPU time that other processes (and a hypervisor's steal) used since the
    window opened, this process's own threads left out: read from /proc/stat and `os.times()`. `others()`
    is None where /proc/stat cannot be read (not Linux)."""

    def __init__(self):
        self.start = _cpu_now()

    def others(self) -> float | None:
        end = _cpu_now()
        if self.start is None or end is None:
            return None
        (busy0, own0, t0), (busy1, own1, t1) = self.start, end
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        return None if capacity <= 0 else min(max(busy1 - busy0 - (own1 - own0), 0.0) / capacity, 1.0)


def _cpu_now() -> tuple[float, float, float] | None:
    """(seconds the machine's CPUs were busy since boot, this process's CPU seconds, a monotonic clock)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait: user nice system irq softirq steal
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()


def normalized(seconds: float | None, load_factor: float | None) -> float | None:
    """`seconds` divided by the load factor, or as measured without one."""
    return None if seconds is None else seconds / (load_factor or 1.0)


@dataclass(frozen=True)
class FitBudget:
    latency_ms: float = 250.0  # median server-side run of one encrypted molecule, this machine (quiet)
    key_mb: float = 60.0  # serialized evaluation keys a client uploads
    # cap of the search, the best found so far is returned: quiet-machine minutes with the normalized check
    # (`SearchClock`), wall-clock minutes with the raw one
    max_minutes: float | None = None
    # normalized: timings divided by the load factor the reference circuit shows in the same minute
    # (the budget means a quiet machine); raw: the timings as measured
    latency_check: str = "normalized"

    def __post_init__(self):
        if self.latency_check not in LATENCY_CHECKS:
            raise ConfigError(
                f"--latency-check {self.latency_check!r} is not one of {', '.join(LATENCY_CHECKS)}; "
                "use normalized (budget on a quiet machine) or raw (as measured now)"
            )
        if (
            self.latency_ms <= 0
            or self.key_mb <= 0
            or (self.max_minutes is not None and self.max_minutes <= 0)
        ):
            raise ConfigError(
                f"budget {dataclasses.asdict(self)} is not positive; use e.g. --budget-ms 250 --max-key-mb 60"
            )


class SearchClock:
    """`--max-minutes` counted in quiet-machine time, so a loaded machine does not cut the search short.

    Each variant's wall time is charged at 1 / the load factor measured while it was timed (the rest is
    other jobs' doing); time not measured that way (featurizing) counts in full. Without load factors (the
    raw check) it is plain wall-clock time. A stop at `WALL_FACTOR` x the cap in wall-clock time keeps a heavily
    loaded run's stages bounded (`fit`'s steps past the cap, the distilled leader, the confirmation on the folds
    and the refit, then run in full)."""

    WALL_FACTOR = 3.0

    def __init__(
        self, max_minutes: float | None, normalized: bool, now: Callable[[], float] = time.monotonic
    ):
        self.cap = max_minutes * 60 if max_minutes else None
        self.normalized, self.now = normalized, now
        self.start, self.discount = now(), 0.0

    def charge(self, seconds: float, load_factor: float | None) -> None:
        if self.normalized and load_factor and load_factor > 1:
            self.discount += seconds * (1 - 1 / load_factor)

    @property
    def elapsed(self) -> float:
        return self.now() - self.start

    @property
    def quiet_elapsed(self) -> float:
        return self.elapsed - self.discount

    def out_of_time(self) -> bool:
        if self.cap is None:
            return False
        return self.quiet_elapsed > self.cap or self.elapsed > self.WALL_FACTOR * self.cap


def describe(seconds: float | None, load_factor: float | None) -> str:
    """'312 ms measured, load factor 1.6x -> 195 ms normalized' (just the measurement without a factor)."""
    if seconds is None:
        return "not timed"
    text = f"{seconds * 1e3:.0f} ms measured"
    if load_factor is None:
        return text
    return f"{text}, load factor {load_factor:.1f}x -> {normalized(seconds, load_factor) * 1e3:.0f} ms normalized"


class LoadGauge:
    """The reference circuit, compiled with keys on first use, and its quiet time kept in the calibration
    file (`Calibration.quiet_reference`: a low percentile of the medians seen on this machine)."""

    def __init__(self, calibration: Calibration):
        self.calibration = calibration
        self.label = f"{key(*REFERENCE[:3])} x{REFERENCE[3]}"

    def run(self) -> float:
        """Seconds of one encrypted run of the reference circuit."""
        circuit, enc = _reference_circuit()
        start = time.perf_counter()
        circuit.run(enc)
        return time.perf_counter() - start

    def load_factor(self, runs: int = 3) -> float:
        """The machine's load factor now: the reference circuit's median of `runs` over its quiet time."""
        window = CpuWindow()
        reference = [self.run() for _ in range(runs)]
        return self.timing([0.0], reference, window.others()).load_factor

    def timing(self, seconds: list[float], reference: list[float], others: float | None = None) -> Timing:
        now = statistics.median(reference)
        quiet = self.calibration.quiet_reference(self.label, now)
        return Timing(statistics.median(seconds), now, quiet, others)


@functools.cache
def _reference_circuit():
    """The reference circuit with keys and one encrypted input, built once per process (it is deterministic,
    and a `bench --panel` or a test session makes many gauges). Its keys are kept in `reference-keys/` of
    molcloak's home and reused by later processes: generating them takes longer than any run it gauges."""
    rng = np.random.default_rng(0)
    circuit, enc = layer_circuit(
        *REFERENCE[:3], REFERENCE[3], rng, key_dir=molcloak_home() / "reference-keys"
    )
    circuit.run(enc)  # warm-up
    return circuit, enc


def interleaved(run: Callable[[], float], n: int, gauge: LoadGauge | None) -> Timing | None:
    """`n` timed calls of `run` (after one untimed warm-up call), each followed by a reference run."""
    if n < 1:
        return None
    run()  # the first run pays one-time setup
    seconds, reference, window = [], [], CpuWindow()
    for _ in range(n):
        seconds.append(run())
        if gauge is not None:
            reference.append(gauge.run())
    others = window.others()
    return (
        gauge.timing(seconds, reference, others)
        if gauge
        else Timing(statistics.median(seconds), others_cpu=others)
    )


def time_circuit(q_module, X: np.ndarray, runs: int = TIMED_RUNS, gauge: LoadGauge | None = None):
    """Timing of `runs` encrypted runs of one row through a compiled circuit that has keys, on the engine the
    server would use (`linear_fast_path` for a bootstrap-free linear circuit, else Concrete's runtime); None
    without rows."""
    from . import linear_fast_path

    if not len(X):
        return None
    circuit = q_module.fhe_circuit
    encrypted = circuit.encrypt(q_module.quantize_input(np.asarray(X[:1], dtype=np.float32)))
    fast, _ = linear_fast_path.load_circuit(circuit)
    serialized = encrypted.serialize() if fast is not None else None
    if fast is not None and fast.run(serialized) is None:  # never expected: the same client specs
        fast = None

    def once() -> float:
        start = time.perf_counter()
        fast.run(serialized) if fast is not None else circuit.run(encrypted)
        return time.perf_counter() - start

    return interleaved(once, runs, gauge)


def measure_latency(
    ckpt: Checkpoint, compiled: Compiled, n_runs: int, gauge: LoadGauge | None = None
) -> dict:
    """Keygen and `n_runs` encrypted runs of a test row through both halves (a temporary bundle), with
    the reference circuit's runs interleaved when there is a `gauge`."""
    from .predict import LocalBackend

    with tempfile.TemporaryDirectory(prefix="molcloak-fit-") as tmp:
        deploy(ckpt, compiled, f"{tmp}/bundle", "fit")
        backend = LocalBackend(f"{tmp}/bundle", key_dir=f"{tmp}/keys")
        info = backend.keygen()
        rows = ckpt.X_test[:1]
        timing = (
            interleaved(lambda: backend.run_rows(rows)[0].seconds["run"], n_runs, gauge)
            if len(rows)
            else None
        )
        engine = backend.server.engine
        backend.close()
    return {
        "keygen_s": info.seconds,
        "evaluation_key_bytes": info.evaluation_key_bytes,
        **(timing.to_dict() if timing else {"median_run_s": None}),
        "runs": n_runs if timing else 0,
        "server_engine": engine,  # linear fast path or Concrete runtime (`PrivateServer.engine`)
    }
