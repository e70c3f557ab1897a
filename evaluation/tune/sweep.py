"""`molcloak tune`: sweep bit widths, rounding bits, p_error and width; find the Pareto front.

Accuracy comes from Concrete's FHE simulation of each compiled variant on the test split
(which includes the error injected by `p_error`); latency is predicted from the circuit's PBS
count and maximum bit width with a per-PBS cost measured on this machine (`molcloak.pipeline.pbs_cost`); the
key size is the serialized evaluation-key size (throwaway keys generated once per variant).
Points on the Pareto front (accuracy up, latency down, key size down) can then be run for real
(keygen, encrypt, server run, decrypt). The chosen point is written as a JSON configuration that
`molcloak train --config FILE` accepts.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molcloak.pipeline.bundle import Checkpoint
from molcloak.pipeline.compile import CompileConfig
from molcloak.pipeline.data import Dataset
from molcloak.pipeline.errors import TuneError
from molcloak.pipeline.metrics import fhe_equals_simulation
from molcloak.pipeline.pbs_cost import Calibration
from molcloak.pipeline.runconfig import RunConfig
from molcloak.pipeline.train import TrainConfig
from molcloak.pipeline.workflow import (
    DEFAULT_FEATURES,
    DEFAULT_MODEL,
    compile_checkpoint,
    train_checkpoint,
)


@dataclass(frozen=True)
class TuneGrid:
    """The values to sweep; every combination is one variant (trained once per model setting and seed)."""

    features: tuple[str, ...] = (DEFAULT_FEATURES,)
    hidden: tuple[tuple[int, ...], ...] = ((16,),)
    weight_bits: tuple[int, ...] = (3,)
    act_bits: tuple[int, ...] = (3,)
    input_bits: tuple[int, ...] = (4,)
    rounding_bits: tuple[int | None, ...] = (5,)
    p_error: tuple[float | None, ...] = (1e-6,)
    seeds: tuple[int, ...] = (0,)
    model: str = DEFAULT_MODEL

    def model_settings(self) -> list[tuple[str, dict]]:
        combos = itertools.product(
            self.features, self.hidden, self.weight_bits, self.act_bits, self.input_bits
        )
        return [
            (f, {"hidden": list(h), "weight_bits": w, "act_bits": a, "input_bits": i})
            for f, h, w, a, i in combos
        ]

    def compile_settings(self) -> list[CompileConfig]:
        return [
            CompileConfig(r, "approximate", p) for r, p in itertools.product(self.rounding_bits, self.p_error)
        ]

    def size(self) -> int:
        return len(self.model_settings()) * len(self.compile_settings())


@dataclass
class Point:
    """One variant: its settings, accuracy per seed, circuit figures and predicted / measured latency."""

    features: str
    model: str
    model_options: dict
    compile: CompileConfig
    metric: str
    scores: list[float] = field(default_factory=list)  # FHE-simulated test metric, one per seed
    float_scores: list[float] = field(default_factory=list)
    pbs: int = 0
    max_bits: int = 0
    evaluation_key_bytes: int = 0
    predicted_s: float = 0.0
    measured: dict | None = None
    on_front: bool = False

    @property
    def score(self) -> float:
        return float(np.mean(self.scores))

    @property
    def label(self) -> str:
        o = self.model_options
        p = "default" if self.compile.p_error is None else f"{self.compile.p_error:g}"
        return (
            f"{self.features} h={','.join(map(str, o['hidden']))} w{o['weight_bits']}a{o['act_bits']}i{o['input_bits']} "
            f"r{self.compile.rounding_bits} p={p}"
        )

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "features": self.features,
            "model": self.model,
            "model_options": self.model_options,
            "compile": self.compile.to_dict(),
            "metric": self.metric,
            "score": self.score,
            "scores": self.scores,
            "float_score": float(np.mean(self.float_scores)),
            "pbs": self.pbs,
            "max_bits": self.max_bits,
            "evaluation_key_bytes": self.evaluation_key_bytes,
            "predicted_s": self.predicted_s,
            "measured": self.measured,
            "on_front": self.on_front,
        }


def metric_name(ds: Dataset) -> str:
    return "roc_auc" if ds.task.is_classification else "r2"


StepCallback = Callable[[str], None]


def sweep(
    ds: Dataset,
    grid: TuneGrid,
    train_config: TrainConfig | None = None,
    calibration: Calibration | None = None,
    on_step: StepCallback | None = None,
    split: str | None = None,
    test_fraction: float = 0.2,
) -> tuple[list[Point], dict[str, Checkpoint]]:
    """Train each model setting (per seed), compile each compile setting, simulate; returns points and
    the first seed's checkpoint per point label (to execute or export the chosen ones)."""
    calibration = calibration or Calibration()
    train_config = train_config or TrainConfig()
    metric = metric_name(ds)
    points: dict[str, Point] = {}
    checkpoints: dict[str, Checkpoint] = {}
    for features, options in grid.model_settings():
        for seed in grid.seeds:
            ckpt = train_checkpoint(
                ds,
                features,
                grid.model,
                options,
                dataclasses.replace(train_config, seed=seed),
                split,
                test_fraction,
            )
            for cfg in grid.compile_settings():
                compiled = compile_checkpoint(ckpt, cfg, measure_keys=True)
                pt = Point(features, grid.model, ckpt.model_config, cfg, metric)
                pt = points.setdefault(pt.label, pt)
                pt.scores.append(compiled.metrics["fhe_simulate"][metric])
                pt.float_scores.append(compiled.metrics["float"][metric])
                s = compiled.stats
                pt.pbs, pt.max_bits = max(pt.pbs, s.pbs_count), max(pt.max_bits, s.max_bit_width)
                pt.evaluation_key_bytes = max(pt.evaluation_key_bytes, s.serialized_evaluation_key_bytes)
                pt.predicted_s = calibration.predict(pt.pbs, pt.max_bits, cfg.rounding_bits, cfg.p_error)
                checkpoints.setdefault(pt.label, ckpt)
                if on_step:
                    on_step(
                        f"{pt.label} seed {seed}: {metric} {pt.scores[-1]:.3f}, {s.pbs_count} PBS, {s.max_bit_width} bits"
                    )
    front = pareto_front(list(points.values()))
    for pt in front:
        pt.on_front = True
    return list(points.values()), checkpoints


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on accuracy, predicted latency and key size at once."""

    def dominates(a: Point, b: Point) -> bool:
        ge = (
            a.score >= b.score
            and a.predicted_s <= b.predicted_s
            and a.evaluation_key_bytes <= b.evaluation_key_bytes
        )
        gt = (
            a.score > b.score
            or a.predicted_s < b.predicted_s
            or a.evaluation_key_bytes < b.evaluation_key_bytes
        )
        return ge and gt

    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: p.predicted_s)


def execute(point: Point, ckpt: Checkpoint, n_runs: int, on_item=None) -> dict:
    """Compile the point's model for real and time `n_runs` encrypted single-molecule predictions."""
    from ..bench.fhe_timing import measure_concrete

    compiled = compile_checkpoint(ckpt, point.compile, measure_keys=False)
    m = measure_concrete(compiled.q_module, ckpt.X_test[:n_runs], on_item)
    sim = compiled.q_module.forward(ckpt.X_test[:n_runs], fhe="simulate")
    point.measured = {
        **{
            k: m[k]
            for k in (
                "keygen_s",
                "evaluation_key_bytes",
                "input_ciphertext_bytes",
                "output_ciphertext_bytes",
                "latency",
            )
        },
        "fhe_equals_simulation": int(fhe_equals_simulation(m["outputs"], sim).sum()),
        "load_avg": _load(),
    }
    return point.measured


def choose(points: Sequence[Point], max_latency_s: float, max_key_mb: float) -> Point:
    """Most accurate front point within the latency (measured if run, else predicted) and key-size budgets;
    the fastest front point when none fits."""
    front = [p for p in points if p.on_front] or list(points)
    if not front:
        raise TuneError("the sweep produced no variant; widen the grid")

    ok = [p for p in front if _fits(p, max_latency_s, max_key_mb)]
    return max(ok, key=lambda p: p.score) if ok else min(front, key=_latency)


def _latency(p: Point) -> float:
    return p.measured["latency"]["median_s"] if p.measured else p.predicted_s


def _fits(p: Point, max_latency_s: float, max_key_mb: float) -> bool:
    return _latency(p) <= max_latency_s and p.evaluation_key_bytes <= max_key_mb * 1e6


def to_run_config(point: Point, dataset: str, train_config: TrainConfig) -> RunConfig:
    """The run configuration `molcloak train --config FILE` reads (compile settings travel with it)."""
    return RunConfig(
        features=point.features,
        model=point.model,
        model_options=point.model_options,
        train=train_config,
        compile=point.compile,
        dataset=dataset,
        tuned={
            point.metric: point.score,
            "predicted_s": point.predicted_s,
            "measured": point.measured,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def plot(points: Sequence[Point], path: str | Path, title: str) -> Path:
    """Accuracy vs predicted latency, marker size = key size, front points joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [20 + p.evaluation_key_bytes / 1e6 * 2 for p in points]
    ax.scatter(
        [p.predicted_s for p in points],
        [p.score for p in points],
        s=sizes,
        alpha=0.5,
        label="variants (size = eval keys)",
    )
    front = sorted((p for p in points if p.on_front), key=lambda p: p.predicted_s)
    ax.plot([p.predicted_s for p in front], [p.score for p in front], "r.-", label="Pareto front")
    measured = [p for p in front if p.measured]
    if measured:
        ax.scatter(
            [p.measured["latency"]["median_s"] for p in measured],
            [p.score for p in measured],
            marker="x",
            c="k",
            label="measured latency",
        )
    ax.set_xlabel("server-side latency per molecule (s, predicted from PBS count)")
    ax.set_ylabel(f"FHE-simulated test {points[0].metric if points else ''}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load() -> float:
    import os

    return os.getloadavg()[0]


def run_tune(
    ds: Dataset,
    dataset: str,
    grid: TuneGrid,
    train_config: TrainConfig,
    *,
    n_runs: int = 5,
    execute_front: int = 3,
    max_latency_s: float = 0.25,
    max_key_mb: float = 30.0,
    calibration: str | Path | None = None,
    plot_path: str | Path | None = None,
    config_path: str | Path | None = None,
    layer_report: bool = True,
    say: StepCallback | None = None,
    split: str | None = None,
    test_fraction: float = 0.2,
) -> dict:
    """The whole `molcloak tune` job: sweep, Pareto front, real runs of the front, choice, exports."""
    say = say or (lambda _m: None)
    calib = Calibration(calibration)
    points, checkpoints = sweep(
        ds, grid, train_config, calib, on_step=say, split=split, test_fraction=test_fraction
    )
    front = pareto_front(points)
    # run the most accurate front points for real (latency and key size measured, not predicted)
    for pt in sorted(front, key=lambda p: -p.score)[:execute_front]:
        say(f"executing {pt.label}: keygen + {n_runs} encrypted molecules")
        execute(pt, checkpoints[pt.label], n_runs)
    chosen = choose(points, max_latency_s, max_key_mb)
    result = {
        "dataset": dataset,
        "metric": metric_name(ds),
        "grid": _grid_dict(grid),
        "train": train_config.to_dict(),
        "calibration": str(calib.path),
        "points": [p.to_dict() for p in points],
        "front": [p.label for p in front],
        "chosen": chosen.label,
        "chosen_within_budget": _fits(chosen, max_latency_s, max_key_mb),
        "budget": {"max_latency_s": max_latency_s, "max_key_mb": max_key_mb},
        "config": to_run_config(chosen, dataset, train_config).to_dict(),
        "load_avg": _load(),
    }
    if layer_report:
        from .layer_error import layer_errors

        say(f"per-layer errors of {chosen.label}")
        result["layer_errors"] = {
            "label": chosen.label,
            "rows": layer_errors(checkpoints[chosen.label], chosen.compile),
        }
    if plot_path:
        result["plot"] = str(plot(points, plot_path, f"molcloak tune: {dataset}"))
    if config_path:
        result["config_file"] = str(to_run_config(chosen, dataset, train_config).save(config_path))
    return result


def _grid_dict(grid: TuneGrid) -> dict:
    return {
        k: [list(v) if isinstance(v, tuple) else v for v in vals] if isinstance(vals, tuple) else vals
        for k, vals in dataclasses.asdict(grid).items()
    }


def print_tune(result: dict, console) -> None:
    """The Pareto front as a table, the choice, and the per-layer error report."""
    from rich.table import Table

    metric = result["metric"]
    table = Table(
        title=f"molcloak tune: {result['dataset']}, {len(result['points'])} variants, Pareto front "
        f"(accuracy vs latency vs key size)"
    )
    for col in (
        "variant",
        f"FHE-sim {metric}",
        "float",
        "PBS",
        "max bits",
        "eval keys MB",
        "predicted s",
        "measured s",
        "keygen s",
        "FHE = sim",
    ):
        table.add_column(col)
    for p in sorted((p for p in result["points"] if p["on_front"]), key=lambda p: p["predicted_s"]):
        m = p["measured"] or {}
        mark = " *" if p["label"] == result["chosen"] else ""
        table.add_row(
            p["label"] + mark,
            f"{p['score']:.3f}",
            f"{p['float_score']:.3f}",
            str(p["pbs"]),
            str(p["max_bits"]),
            f"{p['evaluation_key_bytes'] / 1e6:.1f}",
            f"{p['predicted_s']:.3f}",
            f"{m['latency']['median_s']:.3f}" if m else "-",
            f"{m['keygen_s']:.2f}" if m else "-",
            f"{m['fhe_equals_simulation']}/{m['latency']['n_runs']}" if m else "-",
        )
    console.print(table)
    b = result["budget"]
    why = (
        f"most accurate front point within {b['max_latency_s']} s and {b['max_key_mb']} MB of evaluation keys"
        if result["chosen_within_budget"]
        else f"no front point fits {b['max_latency_s']} s and {b['max_key_mb']} MB: the fastest one"
    )
    console.print(f"* chosen: {result['chosen']} ({why}; latency: measured where run, else predicted)")
    if result.get("layer_errors"):
        le = Table(title=f"per-layer |difference|, max / mean: {result['layer_errors']['label']}")
        for col in (
            "layer",
            "values",
            "float vs quantized",
            "quantized vs FHE-sim",
            "float vs FHE-sim",
            "FHE != quantized",
        ):
            le.add_column(col)
        for r in result["layer_errors"]["rows"]:
            cells = [
                f"{r[k]['max']:.3g} / {r[k]['mean']:.3g}"
                for k in ("float_vs_quantized", "quantized_vs_fhe", "float_vs_fhe")
            ]
            le.add_row(r["layer"], str(r["values"]), *cells, f"{r['fhe_differs_share']:.1%}")
        console.print(le)
    for key in ("plot", "config_file"):
        if result.get(key):
            console.print(f"{key.replace('_', ' ')}: {result[key]}")
    console.print(f"PBS cost calibration: {result['calibration']}")
