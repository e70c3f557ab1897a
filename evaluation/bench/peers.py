"""`molcloak bench`: molcloak's default model against its peers, in one run, on the same features.

Per task (`sol-low`, and its regression twin `sol-logs`), every model sees the same featurizer
fitted on the same training molecules and is scored on the same test split:
- molcloak: the default QAT MLP and compile settings (float, FHE-simulated and FHE-executed);
- Concrete ML's built-in LogisticRegression / LinearRegression and XGBClassifier / XGBRegressor
  with their default settings (what a user would pick instead);
- the CKKS recipe of the earlier TenSEAL tools (`ckks.py`), skipped with the reason when
  TenSEAL is not installed;
- a plaintext scikit-learn RandomForest (accuracy reference only).
Encrypted latency is the server-side run time of single-molecule predictions (median and p90
over `n_runs`, after one warm-up run), with key generation time, evaluation-key (public
context) size, ciphertext sizes and, for Concrete circuits, PBS count and maximum bit width.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from molcloak.pipeline.compile import CircuitStats, CompileConfig
from molcloak.pipeline.data import load_bundled
from molcloak.pipeline.errors import ConfigError
from molcloak.pipeline.featurize import FeaturizerSpec
from molcloak.pipeline.metrics import TargetScaler, fhe_equals_simulation, score, to_predictions
from molcloak.pipeline.splits import split_dataset
from molcloak.pipeline.train import TrainConfig, predict_raw
from molcloak.pipeline.workflow import (
    DEFAULT_FEATURES,
    compile_checkpoint,
    train_checkpoint,
)

from . import ckks
from .fhe_timing import encrypted_runs, measure_concrete

MODELS = ("molcloak", "cml-linear", "cml-xgb", "ckks", "random-forest")
LABELS = {
    "molcloak": "molcloak default (QAT MLP, TFHE)",
    "cml-linear": "Concrete ML {linear}",
    "cml-xgb": "Concrete ML {xgb}",
    "ckks": "TenSEAL CKKS MLP (cubic sigmoid)",
    "random-forest": "RandomForest (plaintext)",
}


@dataclass(frozen=True)
class BenchConfig:
    tasks: tuple[str, ...] = ("sol-low", "sol-logs")
    features: str = DEFAULT_FEATURES
    models: tuple[str, ...] = MODELS
    n_runs: int = 5  # encrypted single-molecule runs per model (latency)
    execute_all: bool = True  # molcloak: run every test molecule in FHE for the executed metrics
    quick: bool = False  # fewer runs, no full FHE execution, fewer trees: a smoke run
    seed: int = 0
    epochs: int | None = None  # override molcloak's training epochs (tests)
    max_test: int | None = None  # score on the first N test molecules only (tests)
    ckks_hidden: int = 32

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise ConfigError(f"unknown bench model(s) {unknown}; choose from {', '.join(MODELS)}")
        if self.n_runs < 1:
            raise ConfigError(f"n_runs {self.n_runs} must be at least 1 (the issue asks for >= 5)")

    @property
    def runs(self) -> int:
        return min(self.n_runs, 2) if self.quick else self.n_runs


ProgressFn = Callable[[str], None]  # status message
StepFn = Callable[[str, int], None]  # (status message, steps completed: 0 or 1)


@dataclass
class TaskData:
    name: str
    dataset: object
    task: object
    X_train: np.ndarray  # train + validation molecules (molcloak uses the validation part for early stopping)
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def _row(task: str, model: str, kind: str, label: str, **kw) -> dict:
    return {"task": task, "model": model, "kind": kind, "label": label, "metrics": {}, "latency": {}, **kw}


def run_bench(config: BenchConfig = BenchConfig(), on_progress: StepFn | None = None) -> dict:
    """All models on all tasks; `on_progress(message, advance)` gets one advance per (task, model)."""
    step = on_progress or (lambda _msg, _n: None)
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    for task in config.tasks:
        ds = load_bundled(task)
        data = _task_data(ds, config)
        for model in config.models:
            step(f"{task}: {model}", 0)
            rows.append(
                {**BENCHERS[model](data, config, lambda msg: step(msg, 0)), "n_test": len(data.y_test)}
            )
            step(f"{task}: {model} done", 1)
        _speedups(rows, task)
    return {
        "config": dataclasses.asdict(config),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(),
        "rows": rows,
    }


def _task_data(ds, config: BenchConfig) -> TaskData:
    """The split and featurizer of `train_checkpoint` (fitted on the training part), for every model."""
    sp = split_dataset(ds, None, seed=config.seed)
    spec = FeaturizerSpec.parse(config.features).fit(ds.inputs(sp.train))
    train = np.concatenate([sp.train, sp.valid])
    test = sp.test[: config.max_test] if config.max_test else sp.test
    return TaskData(
        ds.task.name,
        ds,
        ds.task,
        spec.transform(ds.inputs(train)),
        ds.y[train],
        spec.transform(ds.inputs(test)),
        ds.y[test],
    )


def _score(
    data: TaskData, raw: np.ndarray, scaler: TargetScaler | None = None, y: np.ndarray | None = None
) -> dict:
    return score(data.task, data.y_test if y is None else y, to_predictions(data.task, raw, scaler))


def _circuit(stats: CircuitStats) -> dict:
    return {"pbs": stats.pbs_count, "max_bits": stats.max_bit_width}


# ---------------------------------------------------------------- the models


def bench_molcloak(data: TaskData, config: BenchConfig, say: ProgressFn) -> dict:
    say(f"{data.name}: training the molcloak default model")
    tcfg = (
        TrainConfig(seed=config.seed)
        if config.epochs is None
        else TrainConfig(seed=config.seed, epochs=config.epochs)
    )
    ckpt = train_checkpoint(data.dataset, config.features, train_config=tcfg)
    n = len(data.y_test)
    ckpt = dataclasses.replace(
        ckpt,
        X_test=ckpt.X_test[:n],
        y_test=ckpt.y_test[:n],
        smiles_test=ckpt.smiles_test[:n],
        metrics={"float": _score(data, predict_raw(ckpt.build_model(), ckpt.X_test[:n]), ckpt.scaler)},
    )
    compiled = compile_checkpoint(ckpt, CompileConfig(), measure_keys=False)
    n_exec = len(data.X_test) if config.execute_all and not config.quick else config.runs
    say(f"{data.name}: molcloak, {n_exec} encrypted molecules")
    m = measure_concrete(compiled.q_module, data.X_test[:n_exec])
    sim = compiled.q_module.forward(data.X_test[:n_exec], fhe="simulate")
    row = _row(data.name, "molcloak", "TFHE (Concrete ML)", LABELS["molcloak"], **_circuit(compiled.stats))
    row["metrics"] = {k: compiled.metrics[k] for k in ("float", "quantized", "fhe_simulate")}
    row["metrics"]["fhe_execute"] = {
        "n_molecules": n_exec,
        **_score(data, m["outputs"], ckpt.scaler, data.y_test[:n_exec]),
    }
    row["fhe_equals_simulation"] = int(fhe_equals_simulation(m["outputs"], sim).sum())
    row["max_abs_output_diff_vs_simulation"] = float(np.max(np.abs(m["outputs"] - sim))) if n_exec else None
    row["config"] = {
        "features": str(ckpt.featurizer),
        "model": ckpt.model_config,
        "compile": compiled.config.to_dict(),
        "p_error": compiled.stats.p_error,
    }
    return _with_runs(row, m)


def _cml_models(task, quick: bool):
    from concrete.ml.sklearn import (
        LinearRegression,
        LogisticRegression,
        XGBClassifier,
        XGBRegressor,
    )

    if task.kind == "regression":
        return LinearRegression(), XGBRegressor(n_estimators=10 if quick else 20)
    return LogisticRegression(), XGBClassifier(n_estimators=10 if quick else 20)


def _bench_cml(which: int, name: str, data: TaskData, config: BenchConfig, say: ProgressFn) -> dict:
    import contextlib
    import io

    model = _cml_models(data.task, config.quick)[which]
    cls = type(model).__name__
    label = LABELS[name].format(linear=cls, xgb=cls)
    with contextlib.redirect_stdout(io.StringIO()):
        model, float_model = model.fit_benchmark(data.X_train, data.y_train, random_state=config.seed)
        model.compile(data.X_train)
    row = _row(data.name, name, "TFHE (Concrete ML)", label, **_circuit(CircuitStats.of(model.fhe_circuit)))
    row["metrics"] = {
        "float": _sk_score(data, float_model),
        "fhe_simulate": _sk_score(data, model, fhe="simulate"),
    }
    say(f"{data.name}: {cls}, {config.runs} encrypted molecules")
    m = measure_concrete(model, data.X_test[: config.runs])
    sim = _sk_outputs(data, model, data.X_test[: config.runs], fhe="simulate")
    row["fhe_equals_simulation"] = int(fhe_equals_simulation(m["outputs"], sim).sum())
    row["config"] = {"n_bits": model.n_bits, "p_error": float(model.fhe_circuit.statistics["p_error"])}
    return _with_runs(row, m)


def _sk_outputs(data: TaskData, model, X, **kw) -> np.ndarray:
    if data.task.kind == "regression":
        return np.asarray(model.predict(X, **kw), dtype=np.float64).reshape(len(X), -1)
    return np.asarray(model.predict_proba(X, **kw), dtype=np.float64)


def _sk_score(data: TaskData, model, **kw) -> dict:
    out = _sk_outputs(data, model, data.X_test, **kw)
    return score(data.task, data.y_test, out[:, 0] if data.task.kind == "regression" else out)


def bench_cml_linear(data, config, say) -> dict:
    return _bench_cml(0, "cml-linear", data, config, say)


def bench_cml_xgb(data, config, say) -> dict:
    return _bench_cml(1, "cml-xgb", data, config, say)


def bench_ckks(data: TaskData, config: BenchConfig, say: ProgressFn) -> dict:
    row = _row(data.name, "ckks", "CKKS (TenSEAL)", LABELS["ckks"])
    reason = ckks.available()
    if reason:
        row["skipped"] = reason
        return row
    regression = data.task.kind == "regression"
    scaler = TargetScaler.fit(data.y_train) if regression else None
    y = scaler.transform(data.y_train) if regression else data.y_train
    model = ckks.train_poly_mlp(
        data.X_train, y, data.task.n_outputs, regression, config.ckks_hidden, seed=config.seed
    )
    plain = ckks.plain_forward(model, data.X_test)
    row["metrics"] = {"float": _score(data, _logits(plain, regression), scaler)}
    say(f"{data.name}: CKKS, {config.runs} encrypted molecules")
    m = encrypted_runs(ckks.CkksHalves(model), data.X_test[: config.runs])
    n = len(m["outputs"])
    row["max_abs_error_vs_plaintext"] = (
        float(np.max(np.abs(m["outputs"][:, : plain.shape[1]] - plain[:n]))) if n else None
    )
    row["config"] = {
        "hidden": config.ckks_hidden,
        "poly_modulus": ckks.POLY_MODULUS,
        "coeff_moduli": list(ckks.COEFF_MODULI),
        "scale_bits": ckks.SCALE_BITS,
        "activation": "0.5 + 0.197x - 0.004x^3",
    }
    return _with_runs(row, m)


def _logits(plain: np.ndarray, regression: bool) -> np.ndarray:
    """The CKKS net's outputs as scores `to_predictions` accepts: per-class sigmoid outputs are
    monotone scores for ranking; regression outputs are standardized values."""
    return plain if regression else np.log(np.clip(plain, 1e-6, None))


def bench_random_forest(data: TaskData, config: BenchConfig, say: ProgressFn) -> dict:
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    cls = RandomForestRegressor if data.task.kind == "regression" else RandomForestClassifier
    model = cls(n_estimators=100 if config.quick else 500, random_state=config.seed, n_jobs=2).fit(
        data.X_train, data.y_train
    )
    row = _row(data.name, "random-forest", "plaintext", LABELS["random-forest"])
    row["metrics"] = {"float": _sk_score(data, model)}
    return row


BENCHERS = {
    "molcloak": bench_molcloak,
    "cml-linear": bench_cml_linear,
    "cml-xgb": bench_cml_xgb,
    "ckks": bench_ckks,
    "random-forest": bench_random_forest,
}


def _with_runs(row: dict, m: dict) -> dict:
    row.update(
        {
            k: m[k]
            for k in ("keygen_s", "evaluation_key_bytes", "input_ciphertext_bytes", "output_ciphertext_bytes")
        }
    )
    row["latency"] = m["latency"]
    row["run_s"] = m["run_s"]
    row["load_avg_after"] = os.getloadavg()[0]
    return row


def _speedups(rows: list[dict], task: str) -> None:
    """molcloak's median latency relative to every other encrypted model of the task."""
    by = {r["model"]: r for r in rows if r["task"] == task}
    ours = by.get("molcloak", {}).get("latency", {}).get("median_s")
    if not ours:
        return
    for r in by.values():
        other = r.get("latency", {}).get("median_s")
        if other and r["model"] != "molcloak":
            r["molcloak_speedup"] = other / ours


def _machine() -> dict:
    versions = {}
    for pkg in ("concrete-ml", "concrete-python", "tenseal", "torch", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_at_end": os.getloadavg(),
        "versions": versions,
    }


# ---------------------------------------------------------------- the table


def _fmt_metric(task_kind: str, m: dict | None) -> str:
    if not m:
        return "-"
    if task_kind == "regression":
        return f"{m['rmse']:.3f} ({m['r2']:.3f})"
    return f"{m['roc_auc']:.3f}" if "roc_auc" in m else f"acc {m['accuracy']:.3f}"


def markdown(result: dict) -> str:
    """One markdown table per task."""
    out = []
    for task in dict.fromkeys(r["task"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["task"] == task]
        kind = (
            "regression"
            if any("rmse" in m for r in rows for m in r["metrics"].values())
            else "classification"
        )
        metric = "RMSE (R²)" if kind == "regression" else "ROC-AUC"
        out.append(f"**{task}** ({metric} on {rows[0]['n_test']} test molecules)\n")
        out.append(
            f"| model | {metric} float | FHE-simulated | FHE-executed | median s | p90 s | runs | keygen s | eval keys MB "
            "| ct in kB | ct out kB | PBS | max bits | its latency / molcloak's |"
        )
        out.append("|" + "---|" * 14)
        for r in rows:
            if r.get("skipped"):
                out.append(f"| {r['label']} | skipped: {r['skipped']} |" + " |" * 12)
                continue
            lat, m = r.get("latency") or {}, r["metrics"]
            ex = m.get("fhe_execute")
            exec_cell = _fmt_metric(kind, ex) + (f" (n={ex['n_molecules']})" if ex else "")
            if r["model"] == "ckks" and r.get("max_abs_error_vs_plaintext") is not None:
                exec_cell = f"= float ± {r['max_abs_error_vs_plaintext']:.1e}"
            out.append(
                "| "
                + " | ".join(
                    [
                        r["label"],
                        _fmt_metric(kind, m.get("float")),
                        _fmt_metric(kind, m.get("fhe_simulate")),
                        exec_cell,
                        _num(lat.get("median_s"), 3),
                        _num(lat.get("p90_s"), 3),
                        str(lat.get("n_runs", "-")),
                        _num(r.get("keygen_s"), 2),
                        _num(r.get("evaluation_key_bytes"), 1, 1e6),
                        _num(r.get("input_ciphertext_bytes"), 1, 1e3),
                        _num(r.get("output_ciphertext_bytes"), 1, 1e3),
                        str(r.get("pbs", "-")),
                        str(r.get("max_bits", "-")),
                        f"{r['molcloak_speedup']:.2g}x" if r.get("molcloak_speedup") else "-",
                    ]
                )
                + " |"
            )
        out.append("")
    return "\n".join(out)


def _num(v, digits: int, div: float = 1.0) -> str:
    return "-" if v is None else f"{v / div:.{digits}f}"
