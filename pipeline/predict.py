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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from .bundle import Checkpoint, load_checkpoint, load_manifest
from .compile import CompileConfig
from .errors import ConfigError, DataError, FeaturizerError, InvalidSmilesError, MolcloakError, RemoteError
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
    """THE encrypt -> run -> decrypt step: the client half encrypts each row of `X` (`encrypt_rows`), `run`
    evaluates the batch on the server half (evaluation keys and ciphertexts only), the client half
    decrypts (`decrypt_rows`). `client` has `encrypt(x) -> bytes` and `decrypt(bytes) -> (1, n_outputs)`.
    Per-row seconds: encrypt and decrypt are the batch's time divided by its size; run is the server-side
    time `run` reports (or the call divided by the batch size); `round_trip` adds the call per row."""
    if len(X) == 0:
        return []
    cts, encrypt_s = encrypt_rows(client, X)
    return decrypt_rows(client, cts, *timed(run, cts), encrypt_s, round_trip)


def encrypt_rows(client, X: np.ndarray) -> tuple[list[bytes], float]:
    """The first half of the step: (ciphertexts, seconds spent encrypting)."""
    t0 = time.perf_counter()
    return [client.encrypt(x) for x in X], time.perf_counter() - t0


def timed(run: BatchRunner, cts: list[bytes]) -> tuple[list[bytes], list[float] | None, float]:
    """`run(cts)` and the seconds it took: (outputs, server seconds, call seconds)."""
    t0 = time.perf_counter()
    outs, server_s = run(cts)
    return outs, server_s, time.perf_counter() - t0


def decrypt_rows(client, cts, outs, server_s, call_s: float, encrypt_s: float, round_trip: bool):
    """The second half of the step: decrypt the server half's answers into `EncryptedRun`s."""
    n = len(cts)
    if len(outs) != n or (server_s is not None and len(server_s) != n):
        raise RemoteError(
            f"the server half answered {len(outs)} outputs for {n} ciphertexts; expected one per "
            "ciphertext; check that client and server run the same molcloak version"
        )
    t2 = time.perf_counter()
    raws = [client.decrypt(o) for o in outs]
    decrypt_s = time.perf_counter() - t2
    runs = list(server_s) if server_s is not None else [call_s / n] * n
    out = []
    for ct, o, raw, r in zip(cts, outs, raws, runs):
        seconds = {"encrypt": encrypt_s / n, "run": float(r), "decrypt": decrypt_s / n}
        if round_trip:
            seconds["round_trip"] = call_s / n
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
    - `run_batches(batches, concurrency)`: `run_rows` over a stream of batches, several in flight;
    - `predict(inputs, batch_size, skip_invalid, on_item, concurrency) -> PredictReport`: validate,
      featurize, encrypt, run, decrypt, fill the predictions.
    """

    mode: ClassVar[str]  # PredictReport.mode: "execute" (both halves here) or "server"
    concurrent: ClassVar[bool] = False  # may `run` be called from several threads at once?
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

    def default_concurrency(self, batch_size: int) -> int:
        return 1  # batches kept on the server half at once when the caller does not say

    def run_rows(self, X: np.ndarray) -> list[EncryptedRun]:
        """Encrypt, run and decrypt the feature rows `X` (keys are set up first if needed): one batch, or
        more when the keys reach their rotation limit within it (new keys are made in between)."""
        return [r for _, runs in self.run_batches([(None, X)]) for r in runs]

    def run_batches(
        self, batches: Iterable[tuple[Any, np.ndarray]], concurrency: int = 1, label=None
    ) -> Iterator[tuple[Any, list[EncryptedRun]]]:
        """`run_rows` over a stream of `(tag, feature rows)` batches, with up to `concurrency` requests on
        the server half at once (threads calling `run`; this thread featurizes, encrypts and decrypts):
        yields `(tag, runs)` in input order, each batch as soon as it and all before it are decrypted.

        Key rotation stays exact: no more rows are encrypted under a key set than it may still decrypt,
        and before new keys are made every batch in flight is decrypted with the old ones. A batch that
        fails for good (after the client's retries) raises its error, prefixed with `label(tag)`."""
        jobs: deque[list] = deque()  # [tag, rows, runs decrypted so far], in input order
        flights: deque[_Flight] = deque()
        concurrency = concurrency if self.concurrent else 1
        pool = ThreadPoolExecutor(concurrency, "molcloak-batch") if concurrency > 1 else None
        self.keygen()
        try:
            for tag, X in batches:
                jobs.append(job := [tag, len(X), []])
                pos = 0
                while pos < len(X):
                    left = self.client.predictions_left() - sum(len(f.cts) for f in flights)
                    if left <= 0 or (self.client.rotation_due() and flights):
                        yield from self._land(flights, jobs, label, 0)  # then rotate with nothing in flight
                        self.rotate_if_due()
                        continue
                    self.rotate_if_due()
                    cts, encrypt_s = encrypt_rows(self.client, X[pos : pos + left])  # while others fly
                    yield from self._land(flights, jobs, label, concurrency - 1)
                    flights.append(_Flight(job, cts, encrypt_s, _submit(pool, self.run, cts)))
                    pos += len(cts)
                yield from _ready(jobs)
            yield from self._land(flights, jobs, label, 0)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _land(self, flights: deque, jobs: deque, label, keep: int):
        """Decrypt the oldest batches in flight until at most `keep` are left; yield the finished jobs."""
        while len(flights) > keep:
            f = flights.popleft()
            try:
                outs, server_s, call_s = f.answer.result()
            except MolcloakError as exc:
                if label is None:
                    raise
                raise type(exc)(f"{label(f.job[0])}: {exc}") from exc
            with self.client.counting_batch():
                f.job[2] += decrypt_rows(
                    self.client, f.cts, outs, server_s, call_s, f.encrypt_s, self.mode == "server"
                )
            yield from _ready(jobs)

    def predict(
        self,
        inputs: Sequence,
        batch_size: int = 8,
        skip_invalid: bool = False,
        on_item: ItemCallback | None = None,
        concurrency: int | None = None,
    ) -> PredictReport:
        """Encrypted predictions of SMILES, or of rows for a tabular model (see `validate_inputs`).

        `batch_size` rows are encrypted, run (one request for a remote server) and decrypted together,
        `concurrency` batches at once (default `default_concurrency`); `on_item(prediction)` is called as
        each one is filled in, in input order. A batch that fails for good raises, naming its rows.
        """
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be at least 1")
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency {concurrency} must be at least 1 batch in flight")
        preds = validate_inputs(self.client.featurizer, inputs, skip_invalid)
        todo = [p for p in preds if not p.error]
        first = len(self.client.key_ids)
        keyinfo = self.keygen()
        report = PredictReport(
            preds, self.mode, keyinfo.seconds, keyinfo.reused, keyinfo.evaluation_key_bytes
        )
        batches = (
            (batch, self.client.featurize([p.input for p in batch]))
            for batch in (todo[s : s + batch_size] for s in range(0, len(todo), batch_size))
        )
        concurrency = concurrency or self.default_concurrency(batch_size)
        labelled = lambda batch: rows_label([p.index for p in batch])  # noqa: E731
        for batch, runs in self.run_batches(batches, concurrency, labelled):
            for pred, r in zip(batch, runs):
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


@dataclass
class _Flight:  # rows of one batch on their way through the server half; `answer`: `timed(run, cts)`
    job: list
    cts: list[bytes]
    encrypt_s: float
    answer: Future


def _submit(pool: ThreadPoolExecutor | None, run: BatchRunner, cts: list[bytes]) -> Future:
    """`timed(run, cts)` on the pool, or at once in this thread without one."""
    if pool is not None:
        return pool.submit(timed, run, cts)
    answer: Future = Future()
    try:
        answer.set_result(timed(run, cts))
    except Exception as exc:  # raised where the answer is read, like a pool's
        answer.set_exception(exc)
    return answer


def _ready(jobs: deque):
    """Pop and yield `(tag, runs)` of the leading jobs whose rows are all decrypted."""
    while jobs and len(jobs[0][2]) == jobs[0][1]:
        yield jobs.popleft()[::2]


def rows_label(rows: Sequence[int]) -> str:
    """'row 7', 'rows 9-16' or 'rows 3, 5, 8': the input rows of a batch, for error messages."""
    if len(rows) == 1:
        return f"row {rows[0]}"
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return f"rows {rows[0]}-{rows[-1]}"
    return "rows " + ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")


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
    return CompileConfig.from_dict(load_manifest(bundle).data["compile"])
