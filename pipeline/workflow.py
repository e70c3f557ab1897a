"""The owner's and user's jobs, composed from the pure steps: train, compile, deploy, predict."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import networks, torch_import
from .bundle import Checkpoint, Manifest, write_bundle
from .compile import CircuitStats, CompileConfig, compile_model
from .data import Dataset
from .errors import DataError
from .featurize import Featurizer, FeaturizerSpec
from .metrics import score, to_predictions
from .output_head import clear_outputs
from .runconfig import DEFAULT_FEATURES, DEFAULT_MODEL, RunConfig
from .splits import Split, split_dataset
from .tabular import tabular_featurizer
from .teacher import teacher_outputs
from .train import EpochCallback, TrainConfig, predict_raw, seed_everything, train_model

__all__ = [
    "DEFAULT_FEATURES",
    "DEFAULT_MODEL",
    "Compiled",
    "compile_checkpoint",
    "deploy",
    "featurized",
    "import_checkpoint",
    "recorded_compile_config",
    "train_checkpoint",
    "train_on_features",
    "train_run",
    "unfitted_featurizer",
]


def unfitted_featurizer(ds: Dataset, features: str | None, default: str = DEFAULT_FEATURES):
    """The featurizer `features` names for `ds` (a tabular dataset's columns when it has no SMILES)."""
    return tabular_featurizer(ds, features) or FeaturizerSpec.parse(features or default)


def featurized(
    ds: Dataset,
    features=None,
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    valid_fraction: float = 0.1,
    valid_method: str = "random",
) -> tuple[Featurizer, np.ndarray, Split]:
    """(fitted featurizer, features of every row, split): the scaler is fitted on the training split only.

    `train_checkpoint` and `import_checkpoint` featurize through here, so a float model trained
    outside molcloak on ``X[split.train]`` sees exactly the features the client will compute.
    """
    parsed = unfitted_featurizer(ds, features) if features is None or isinstance(features, str) else features
    sp = split_dataset(
        ds,
        split,
        test_fraction=test_fraction,
        valid_fraction=valid_fraction,
        seed=seed,
        valid_method=valid_method,
    )
    spec = parsed.fit(ds.inputs(sp.train), ds.y[sp.train])  # labels: for a supervised `select` only
    return spec, spec.transform(ds.inputs()), sp


def train_checkpoint(
    ds: Dataset,
    features: str | None = None,  # None: the model's default (physchem for mlp, a 32x32 grid for the CNNs)
    model_name: str = DEFAULT_MODEL,
    model_options: dict | None = None,
    train_config: TrainConfig = TrainConfig(),
    split: str | None = None,
    test_fraction: float = 0.2,
    on_epoch: EpochCallback | None = None,
) -> Checkpoint:
    """Split, featurize (scaler fitted on train only), train, and score the float model on test."""
    networks.make_config(model_name, model_options)  # bad options fail before featurizing
    parsed = unfitted_featurizer(ds, features, networks.default_features(model_name) or DEFAULT_FEATURES)
    networks.check_features(model_name, parsed)
    spec, X, sp = featurized(ds, parsed, split, test_fraction, train_config.seed)
    return train_on_features(ds, spec, X, sp, model_name, model_options, train_config, on_epoch)


def train_on_features(
    ds: Dataset,
    spec: Featurizer,
    X: np.ndarray,
    sp: Split,
    model_name: str = DEFAULT_MODEL,
    model_options: dict | None = None,
    train_config: TrainConfig = TrainConfig(),
    on_epoch: EpochCallback | None = None,
    soft_train: np.ndarray | None = None,
) -> Checkpoint:
    """Train on features already computed by `featurized` (a search trains many models on one featurization).

    With `train_config.teacher`, the student also learns the teacher's out-of-bag outputs on the training
    rows (`soft_train`, computed here when not given; a search computes them once)."""
    config = networks.make_config(model_name, model_options)
    if train_config.teacher and soft_train is None:
        soft_train = teacher_outputs(ds, sp.train, train_config.teacher, train_config.seed)
    seed_everything(train_config.seed)  # weight initialization is part of the seeded run
    model = networks.build_model(model_name, spec.width, ds.task.n_outputs, config)
    result = train_model(
        model,
        ds.task,
        X[sp.train],
        ds.y[sp.train],
        X[sp.valid],
        ds.y[sp.valid],
        train_config,
        on_epoch,
        soft_train=soft_train if train_config.teacher else None,
    )
    float_preds = to_predictions(ds.task, predict_raw(result.model, X[sp.test]), result.scaler)
    return Checkpoint(
        task=ds.task,
        featurizer=spec,
        model_name=model_name,
        model_config=config.to_dict(),
        n_inputs=spec.width,
        train_info={
            "config": train_config.to_dict(),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "split": sp.method,
            "n_train": int(len(sp.train)),
            "n_valid": int(len(sp.valid)),
            "n_test": int(len(sp.test)),
            "final": result.history[result.best_epoch - 1],
        },
        metrics={"float": score(ds.task, ds.y[sp.test], float_preds) if len(sp.test) else {}},
        state_dict=result.model.state_dict(),
        X_calib=X[sp.train],
        X_test=X[sp.test],
        y_test=ds.y[sp.test],
        smiles_test=[ds.smiles[i] for i in sp.test] if ds.smiles else [],  # tabular data: no molecules
        scaler=result.scaler,
    )


@dataclass
class Compiled:
    q_module: object
    stats: CircuitStats
    config: CompileConfig
    metrics: dict  # {"float": ..., "quantized": ..., "fhe_simulate": ...} on the test split
    seconds: float
    # the predictions those metrics score ({"quantized": ..., "fhe_simulate": ...}, `to_predictions`' form)
    test_predictions: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {
            "compile": self.config.to_dict(),
            "circuit": self.stats.to_dict(),
            "compile_seconds": self.seconds,
        }


def compile_checkpoint(
    ckpt: Checkpoint,
    config: CompileConfig = CompileConfig(),
    measure_keys: bool = True,
    simulate: bool = True,
) -> Compiled:
    """Compile to a TFHE circuit and score it on the test split: Concrete ML's clear integer pass
    ("quantized": deterministic) and, with `simulate`, Concrete's FHE simulation ("fhe_simulate": its
    approximate-rounding and PBS errors are drawn from a generator seeded by the system, not repeatable)."""
    start = time.perf_counter()
    q_module, stats = compile_model(ckpt.build_model(), ckpt.X_calib, config, measure_keys, ckpt.task)
    seconds = time.perf_counter() - start
    metrics, predictions = dict(ckpt.metrics), {}
    if len(ckpt.X_test):
        own_circuit = config.output == "logits" and config.output_bits is None
        modes = (("disable", "quantized"), ("simulate", "fhe_simulate"))[: 2 if simulate else 1]
        for mode, key in modes:
            with seeded_numpy(0):  # NumPy's global generator, for any Concrete ML code drawing from it
                if mode == "disable" and not own_circuit:  # Concrete ML's clear pass runs its own circuit
                    raw = clear_outputs(q_module, ckpt.X_test)
                else:
                    raw = q_module.forward(ckpt.X_test, fhe=mode)
            predictions[key] = to_predictions(ckpt.task, raw, ckpt.scaler, config.output)
            metrics[key] = score(ckpt.task, ckpt.y_test, predictions[key])
    return Compiled(q_module, stats, config, metrics, seconds, predictions)


@contextlib.contextmanager
def seeded_numpy(seed: int):
    """NumPy's global generator seeded for the block, and restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def deploy(ckpt: Checkpoint, compiled: Compiled, out: str | Path, name: str, force: bool = False) -> Manifest:
    return write_bundle(out, name, ckpt, compiled.q_module, compiled.info(), compiled.metrics, force=force)


def train_run(
    ds: Dataset,
    run: RunConfig,
    split: str | None = None,
    test_fraction: float = 0.2,
    on_epoch: EpochCallback | None = None,
) -> Checkpoint:
    """`train_checkpoint` with a run configuration; its compile settings are recorded in the checkpoint
    (`train_info["compile"]`), where `molcloak compile` and `deploy` read them."""
    ckpt = train_checkpoint(
        ds, run.features, run.model, run.model_options, run.train, split, test_fraction, on_epoch
    )
    ckpt.train_info["compile"] = run.compile.to_dict()
    return ckpt


def recorded_compile_config(ckpt: Checkpoint, **given) -> CompileConfig:
    """The compile settings recorded at training time (defaults when none), with the `given` values
    (e.g. from the command line) replacing them."""
    return CompileConfig.from_dict(ckpt.train_info.get("compile"), **given)


def import_checkpoint(
    ds: Dataset,
    model_path: str | Path,
    features: str | None = None,
    calib_size: int | None = None,
    seed: int = 0,
    split: str | None = None,
    test_fraction: float = 0.2,
) -> Checkpoint:
    """A checkpoint for a float model: featurizer fitted on the training split, calibration rows, float test metrics.

    `calib_size` limits the calibration set to a seeded random subset of the training split
    (None = all of it). Post-training quantization happens at compile time (`CompileConfig.n_bits`).
    """
    model = torch_import.load_torch_model(model_path)
    spec, X, sp = featurized(ds, features, split, test_fraction, seed)
    torch_import.check_fits(model, spec, ds.task, X[sp.train[:2]])
    if calib_size is not None and calib_size < 1:
        raise DataError(f"--calib-size {calib_size}: the calibration set needs at least 1 row (e.g. 200)")
    rng = np.random.default_rng(seed)
    calib = (
        sp.train
        if calib_size is None or calib_size >= len(sp.train)
        else np.sort(rng.choice(sp.train, calib_size, replace=False))
    )
    float_preds = to_predictions(ds.task, predict_raw(model, X[sp.test]))
    return Checkpoint(
        task=ds.task,
        featurizer=spec,
        model_name=torch_import.IMPORTED_MODEL,
        model_config={"layers": torch_import.layer_specs(model)},
        n_inputs=spec.width,
        train_info={
            "imported_from": Path(model_path).name,
            "split": sp.method,
            "n_train": len(sp.train),
            "n_calibration": len(calib),
            "n_test": len(sp.test),
            "seed": seed,
        },
        metrics={"float": score(ds.task, ds.y[sp.test], float_preds)},
        state_dict=model.state_dict(),
        X_calib=X[calib],
        X_test=X[sp.test],
        y_test=ds.y[sp.test],
        smiles_test=[ds.smiles[i] for i in sp.test] if ds.smiles else [],
    )
