"""Private prediction: input validation, the result records, and the local backend (both halves in
this process) with the owner's FHE simulation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .bundle import Checkpoint, load_checkpoint, load_manifest
from .compile import CompileConfig
from .errors import DataError, InvalidSmilesError, MolcloakError
from .featurize import canonical_smiles, featurize
from .fhe_client import PrivateClient
from .fhe_server import PrivateServer
from .metrics import to_predictions
from .tabular import TabularSpec
from .workflow import compile_checkpoint


@dataclass
class Prediction:
    index: int  # 1-based position in the input (the data row of an input CSV)
    smiles: str  # the molecule; "" for a tabular row
    error: str = ""
    raw: list[float] = field(default_factory=list)  # dequantized model outputs
    # class probabilities, a value in task units, or for multi-task models {task: probability of 1 or value}
    value: list[float] | float | dict[str, float] | None = None
    label: str = ""  # predicted class name (single-task classification)
    seconds: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] | None = None  # a tabular row's values by column; None for molecules

    @property
    def input(self) -> str | dict[str, float]:
        """What the client featurizes: the SMILES, or the tabular row."""
        return self.smiles if self.features is None else self.features

    def to_dict(self) -> dict:
        drop = "features" if self.features is None else "smiles"
        return {k: v for k, v in self.__dict__.items() if k != drop}


@dataclass
class PredictReport:
    predictions: list[Prediction]
    mode: str
    keygen_seconds: float = 0.0
    keys_reused: bool = False
    evaluation_key_bytes: int = 0
    input_ciphertext_bytes: int = 0
    output_ciphertext_bytes: int = 0

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "predictions"},
                "predictions": [p.to_dict() for p in self.predictions]}


def validate_smiles(smiles: Sequence[str], skip_invalid: bool) -> list[Prediction]:
    """One `Prediction` per input; invalid SMILES raise unless `skip_invalid` (then they carry `error`)."""
    out = []
    for i, smi in enumerate(smiles, start=1):
        if canonical_smiles(smi) is None:
            msg = f"molecule {i}: SMILES {smi!r} could not be parsed by RDKit; fix it or pass --skip-invalid"
            if not skip_invalid:
                raise InvalidSmilesError(msg)
            out.append(Prediction(i, smi, error=msg))
        else:
            out.append(Prediction(i, smi))
    return out


def validate_inputs(featurizer, inputs, skip_invalid: bool) -> list[Prediction]:
    """Like `validate_smiles`, for the model's input kind: SMILES, or rows for a tabular model.

    A row is a mapping column -> value (a CSV row read as text, say; extra columns are ignored)
    or a sequence of numbers in the model's column order; rows are numbered from 1.
    """
    if not isinstance(featurizer, TabularSpec):
        return validate_smiles(inputs, skip_invalid)
    out = []
    for i, record in enumerate(inputs, start=1):
        values, reason = featurizer.parse(record)
        if reason:
            if not skip_invalid:
                raise DataError(f"row {i}: {reason}")
            out.append(Prediction(i, "", error=f"row {i}: {reason}", features={}))
        else:
            out.append(Prediction(i, "", features=dict(zip(featurizer.columns, values))))
    return out


def fill_prediction(pred: Prediction, task, values: np.ndarray, raw: np.ndarray) -> None:
    pred.raw = [float(v) for v in np.ravel(raw)]
    if task.is_multitask:
        pred.value = {name: float(v) for name, v in zip(task.tasks, np.ravel(values))}
    elif task.is_classification:
        pred.value = [float(v) for v in values]
        pred.label = task.labels[int(np.argmax(values))]
    else:
        pred.value = float(values)


ItemCallback = Callable[[Prediction], None]


def run_encrypted(client: PrivateClient, server: PrivateServer, keys, x: np.ndarray):
    """One private prediction through both halves: (raw outputs, ciphertext, encrypted output, timings)."""
    t0 = time.perf_counter()
    ct = client.encrypt(x)
    t1 = time.perf_counter()
    out = server.run(ct, keys)
    t2 = time.perf_counter()
    raw = client.decrypt(out)
    return raw, ct, out, {"encrypt": t1 - t0, "run": t2 - t1, "decrypt": time.perf_counter() - t2}


def predict_local(
    bundle: str | Path,
    inputs: Sequence,
    fhe: str = "execute",
    key_dir: str | Path | None = None,
    skip_invalid: bool = False,
    on_item: ItemCallback | None = None,
) -> PredictReport:
    """Private prediction with both halves in this process.

    `execute`: the client half encrypts, the server half (which gets only evaluation keys and
    ciphertexts) runs the circuit, the client decrypts. `simulate`: the owner's FHE simulation from
    the bundle's owner/ part (no encryption; needs the weights). `inputs`: SMILES, or rows for a
    tabular model (see `validate_inputs`).
    """
    preds = validate_inputs(load_manifest(bundle, check=False).featurizer, inputs, skip_invalid)
    todo = [p for p in preds if not p.error]
    if fhe == "simulate":
        return _predict_simulated(bundle, preds, todo, on_item)
    if fhe != "execute":
        raise MolcloakError(f"unknown --fhe mode {fhe!r}; expected 'execute' or 'simulate'")
    client = PrivateClient(bundle, key_dir)
    server = PrivateServer(bundle)
    keyinfo = client.keygen()
    keys = server.load_keys(client.evaluation_keys())  # the only key material the server gets
    report = PredictReport(preds, "execute", keyinfo.seconds, keyinfo.reused, keyinfo.evaluation_key_bytes)
    X = client.featurize([p.input for p in todo]) if todo else np.zeros((0, 0))
    for pred, x in zip(todo, X):
        raw, ct, out, pred.seconds = run_encrypted(client, server, keys, x)
        fill_prediction(pred, client.task, client.predictions(raw)[0], raw)
        report.input_ciphertext_bytes, report.output_ciphertext_bytes = len(ct), len(out)
        if on_item:
            on_item(pred)
    return report


class Simulator:
    """The owner's FHE simulation of a bundle's model, in the clear (needs the owner/ part: weights)."""

    def __init__(self, bundle: str | Path):
        self.checkpoint = load_checkpoint(bundle)
        self.task = self.checkpoint.task
        self.compiled = compile_checkpoint(_without_test(self.checkpoint), _bundle_compile_config(bundle),
                                           measure_keys=False)

    def __call__(self, smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(raw outputs, predictions in task units) for valid SMILES."""
        raw = self.compiled.q_module.forward(featurize(self.checkpoint.featurizer, list(smiles)), fhe="simulate")
        return raw, to_predictions(self.task, raw, self.checkpoint.scaler)


def _predict_simulated(bundle, preds, todo, on_item) -> PredictReport:
    sim = Simulator(bundle)
    if todo:
        raw, values = sim([p.input for p in todo])
        for pred, r, v in zip(todo, raw, values):
            fill_prediction(pred, sim.task, v, r)
            if on_item:
                on_item(pred)
    return PredictReport(preds, "simulate")


def _without_test(ckpt: Checkpoint) -> Checkpoint:
    return dataclasses.replace(ckpt, X_test=ckpt.X_test[:0], y_test=ckpt.y_test[:0], smiles_test=[])


def _bundle_compile_config(bundle) -> CompileConfig:
    return CompileConfig(**load_manifest(bundle).data["compile"])
