"""Private prediction: input validation, the result records, and ONE prediction-backend interface.

`PredictionBackend` is what predict, screen, audit, explain, the app and the timing code use to
run one model privately. The client half (`backend.client`, a `PrivateClient`: featurizer, task,
manifest, fingerprint, the secret key) always lives in this process; the server half is either in
this process too (`LocalBackend`, from a bundle) or a `molcloak serve` server reached over HTTP
(`serving.http_client.RemoteModel`). Both share one prediction loop (`PredictionBackend.predict`)
and one encrypt -> run -> decrypt step (`run_encrypted_batch`, one row: `run_encrypted`).
`Simulator` is the owner's FHE simulation in the clear (needs the weights; no keys, no ciphertexts).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np

from .bundle import Checkpoint, load_checkpoint, load_manifest
from .compile import CompileConfig
from .errors import ConfigError, DataError, FeaturizerError, InvalidSmilesError, RemoteError
from .fhe_client import KeygenInfo, PrivateClient
from .fhe_server import PrivateServer
from .metrics import to_predictions
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
    key_ids: list[str] = field(default_factory=list)  # the client's key sets used, in order (rotations)

    def to_dict(self) -> dict:
        return {
            **{k: v for k, v in self.__dict__.items() if k != "predictions"},
            "predictions": [p.to_dict() for p in self.predictions],
        }


def validate_inputs(featurizer, inputs: Sequence, skip_invalid: bool) -> list[Prediction]:
    """One `Prediction` per input, numbered from 1, checked with `featurizer.check_input`.

    SMILES for a molecular featurizer (`input_kind == "smiles"`); for a tabular one (`"rows"`) a row
    is a mapping column -> value (a CSV row read as text, say; extra columns are ignored) or a
    sequence of numbers in the model's column order. Invalid inputs raise (`InvalidSmilesError`,
    `DataError`) unless `skip_invalid`; then their `Prediction` carries `error`.
    """
    kind = getattr(featurizer, "input_kind", None)
    if kind not in ("smiles", "rows"):
        raise FeaturizerError(
            f"featurizer {featurizer} takes inputs of kind {kind!r}; prediction reads 'smiles' or 'rows'; "
            "rebuild the bundle with a SMILES or tabular featurizer"
        )
    smiles = kind == "smiles"
    noun, error = ("molecule", InvalidSmilesError) if smiles else ("row", DataError)
    out = []
    for i, item in enumerate(inputs, start=1):
        value, reason = featurizer.check_input(item)
        if value is None:
            msg = f"{noun} {i}: {reason}"
            if not skip_invalid:
                raise error(msg)
            out.append(
                Prediction(i, item, error=msg) if smiles else Prediction(i, "", error=msg, features={})
            )
        elif smiles:
            out.append(Prediction(i, item))  # as given; the featurizer reads it exactly like training did
        else:
            out.append(Prediction(i, "", features=dict(zip(featurizer.columns, value))))
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
# A server half: serialized ciphertexts -> (serialized encrypted outputs, server-side seconds each, or None)
BatchRunner = Callable[[list[bytes]], tuple[list[bytes], list[float] | None]]


# ---------------------------------------------------------------- the encrypt -> run -> decrypt step


@dataclass
class EncryptedRun:
    """One row's trip through both halves."""

    raw: np.ndarray  # decrypted, dequantized model outputs, shape (1, n_outputs)
    ciphertext: bytes  # what the server half received
    output: bytes  # what it answered (encrypted)
    seconds: dict[str, float]  # encrypt, run (server side), decrypt; round_trip when the server is remote


def run_encrypted_batch(
    client, run: BatchRunner, X: np.ndarray, round_trip: bool = False
) -> list[EncryptedRun]:
    """THE encrypt -> run -> decrypt step: the client half encrypts each row of `X`, `run` evaluates the
    batch on the server half (evaluation keys and ciphertexts only), the client half decrypts.

    `client` has `encrypt(x) -> bytes` and `decrypt(bytes) -> (1, n_outputs)`. Per-row seconds: encrypt
    and decrypt are the batch's time divided by its size; run is the server-side time `run` reports (or
    the measured call divided by the batch size); `round_trip` adds the measured call per row.
    """
    n = len(X)
    if n == 0:
        return []
    t0 = time.perf_counter()
    cts = [client.encrypt(x) for x in X]
    t1 = time.perf_counter()
    outs, server_s = run(cts)
    t2 = time.perf_counter()
    if len(outs) != n or (server_s is not None and len(server_s) != n):
        raise RemoteError(
            f"the server half answered {len(outs)} outputs for {n} ciphertexts; expected one per "
            "ciphertext; check that client and server run the same molcloak version"
        )
    raws = [client.decrypt(o) for o in outs]
    t3 = time.perf_counter()
    runs = list(server_s) if server_s is not None else [(t2 - t1) / n] * n
    out = []
    for ct, o, raw, r in zip(cts, outs, raws, runs):
        seconds = {"encrypt": (t1 - t0) / n, "run": float(r), "decrypt": (t3 - t2) / n}
        if round_trip:
            seconds["round_trip"] = (t2 - t1) / n
        out.append(EncryptedRun(raw, ct, o, seconds))
    return out


def run_encrypted(client, server, keys, x: np.ndarray):
    """One row through `run_encrypted_batch` with a server half `server.run(ciphertext, keys)` in this
    process (a `PrivateServer`, or any halves with that interface, e.g. the benchmarks' Concrete ML and
    CKKS halves): (raw outputs, ciphertext, encrypted output, timings)."""
    (r,) = run_encrypted_batch(client, lambda cts: ([server.run(ct, keys) for ct in cts], None), [x])
    return r.raw, r.ciphertext, r.output, r.seconds


# ---------------------------------------------------------------- the prediction backend


class PredictionBackend(abc.ABC):
    """Private prediction with ONE model: the client half here, the server half local or remote.

    Implementations provide `client`, `where`, `keygen` and `run`; everything else is shared:

    - `client`: the `PrivateClient` (featurizer, task, manifest, fingerprint, secret key);
    - `keygen(force=False) -> KeygenInfo`: load or generate the client's keys and give the server
      half the evaluation keys (never the secret key); idempotent;
    - `run(ciphertexts) -> (encrypted outputs, server seconds)`: one batch on the server half;
    - `identity()`: what an audit's resume check compares (source, model name, client fingerprint);
    - `run_rows(X)`: features -> `EncryptedRun`s (the one encrypt -> run -> decrypt step); it rotates
      the client's keys when they are due (`PrivateClient.rotation_due`): a new key set, whose
      evaluation keys the server half gets like any others, so no key set decrypts more results than
      its rotation policy allows;
    - `set_rotation(after_predictions, after_days)`: the client's rotation settings (stored with the keys);
    - `predict(inputs, batch_size, skip_invalid, on_item) -> PredictReport`: validate, featurize,
      encrypt, run, decrypt, fill the predictions.
    """

    mode: ClassVar[str]  # PredictReport.mode: "execute" (both halves here) or "server"
    source: ClassVar[str]  # identity()["source"]: "bundle" or "server"
    client: PrivateClient
    where: str  # the bundle directory or the server URL, for reports

    @abc.abstractmethod
    def keygen(self, force: bool = False) -> KeygenInfo:
        """Load this model's keys from the key directory (or generate them; `force`: always new ones) and
        make sure the server half holds their evaluation keys; returns the client's `KeygenInfo`."""

    @abc.abstractmethod
    def run(self, ciphertexts: list[bytes]) -> tuple[list[bytes], list[float]]:
        """Evaluate one batch of serialized ciphertexts on the server half: (encrypted outputs, server-side
        seconds of each), in order."""

    @property
    def name(self) -> str:
        return self.client.manifest.name

    def identity(self) -> dict:
        """The model this backend runs, for resume checks: the client fingerprint (sha256 of client.zip)
        changes exactly when the model is redeployed; local and remote runs of one bundle share it."""
        return {"source": self.source, "name": self.name, "client_fingerprint": self.client.fingerprint}

    def set_rotation(self, after_predictions: int | None = None, after_days: float | None = None) -> None:
        """Rotate the client's keys after this many decrypted predictions or days (None: unchanged)."""
        self.client.set_rotation(after_predictions, after_days)

    def rotate_if_due(self) -> str:
        """Replace the client's keys (and give the server half the new evaluation keys) when they are
        due; returns why ("" when they were not)."""
        reason = self.client.rotation_due()
        if reason:
            self.keygen(force=True)
        return reason

    def run_rows(self, X: np.ndarray) -> list[EncryptedRun]:
        """Encrypt, run and decrypt the feature rows `X` (keys are set up first if needed): one batch, or
        more when the keys reach their rotation limit within it (new keys are made in between)."""
        out: list[EncryptedRun] = []
        self.keygen()
        while len(out) < len(X):
            self.keygen()
            self.rotate_if_due()
            rows = X[len(out) : len(out) + self.client.predictions_left()]
            with self.client.counting_batch():
                out += run_encrypted_batch(self.client, self.run, rows, round_trip=self.mode == "server")
        return out

    def predict(
        self,
        inputs: Sequence,
        batch_size: int = 8,
        skip_invalid: bool = False,
        on_item: ItemCallback | None = None,
    ) -> PredictReport:
        """Encrypted predictions of SMILES, or of rows for a tabular model (see `validate_inputs`).

        `batch_size` rows are encrypted, run (one request for a remote server) and decrypted together;
        `on_item(prediction)` is called as each one is filled in.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be at least 1")
        preds = validate_inputs(self.client.featurizer, inputs, skip_invalid)
        todo = [p for p in preds if not p.error]
        first = len(self.client.key_ids)
        keyinfo = self.keygen()
        report = PredictReport(
            preds, self.mode, keyinfo.seconds, keyinfo.reused, keyinfo.evaluation_key_bytes
        )
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for pred, r in zip(batch, self.run_rows(self.client.featurize([p.input for p in batch]))):
                fill_prediction(pred, self.client.task, self.client.predictions(r.raw)[0], r.raw)
                pred.seconds = r.seconds
                report.input_ciphertext_bytes, report.output_ciphertext_bytes = (
                    len(r.ciphertext),
                    len(r.output),
                )
                if on_item:
                    on_item(pred)
        report.key_ids = self.client.key_ids[min(first, len(self.client.key_ids) - 1) :]
        return report

    def close(self) -> None:
        """Release connections (nothing to do in this process)."""
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalBackend(PredictionBackend):
    """Both halves in this process, from a bundle: the server half (`PrivateServer`, server/server.zip)
    gets the evaluation keys and ciphertexts only."""

    mode, source = "execute", "bundle"

    def __init__(self, bundle: str | Path, key_dir: str | Path | None = None, rotation: dict | None = None):
        self.client, self.server, self.where = (
            PrivateClient(bundle, key_dir, rotation),
            PrivateServer(bundle),
            str(bundle),
        )
        self._keyinfo: KeygenInfo | None = None
        self._keys = None  # deserialized evaluation keys, held by the server half

    def keygen(self, force: bool = False) -> KeygenInfo:
        info = self.client.keygen(force)
        if info is not self._keyinfo:
            self._keys = self.server.load_keys(self.client.evaluation_keys())  # the only key material it gets
            self._keyinfo = info
        return info

    def run(self, ciphertexts: list[bytes]) -> tuple[list[bytes], list[float]]:
        self.keygen()
        outs, seconds = [], []
        for ct in ciphertexts:
            t0 = time.perf_counter()
            outs.append(self.server.run(ct, self._keys))
            seconds.append(time.perf_counter() - t0)
        return outs, seconds


def predict_local(
    bundle: str | Path,
    inputs: Sequence,
    fhe: str = "execute",
    key_dir: str | Path | None = None,
    skip_invalid: bool = False,
    on_item: ItemCallback | None = None,
) -> PredictReport:
    """Private prediction with both halves in this process (`LocalBackend.predict`).

    `execute`: the client half encrypts, the server half (which gets only evaluation keys and
    ciphertexts) runs the circuit, the client decrypts. `simulate`: the owner's FHE simulation from
    the bundle's owner/ part (no encryption; needs the weights). `inputs`: SMILES, or rows for a
    tabular model (see `validate_inputs`).
    """
    if fhe == "simulate":
        preds = validate_inputs(load_manifest(bundle, check=False).featurizer, inputs, skip_invalid)
        return _predict_simulated(bundle, preds, [p for p in preds if not p.error], on_item)
    if fhe != "execute":
        raise ConfigError(f"unknown --fhe mode {fhe!r}; expected 'execute' or 'simulate'")
    with LocalBackend(bundle, key_dir) as backend:
        return backend.predict(inputs, skip_invalid=skip_invalid, on_item=on_item)


class Simulator:
    """The owner's FHE simulation of a bundle's model, in the clear (needs the owner/ part: weights)."""

    def __init__(self, bundle: str | Path):
        self.checkpoint = load_checkpoint(bundle)
        self.task = self.checkpoint.task
        self.compiled = compile_checkpoint(
            _without_test(self.checkpoint), _bundle_compile_config(bundle), measure_keys=False
        )

    def __call__(self, inputs: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(raw outputs, predictions in task units) for valid inputs (SMILES, or rows of a tabular model)."""
        raw = self.compiled.q_module.forward(
            self.checkpoint.featurizer.transform(list(inputs)), fhe="simulate"
        )
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
