"""Aggregate-only audits: the auditor learns the score of a model on its secret test set, not the predictions.

In a normal private audit the auditor decrypts every prediction; an auditor who is also a competitor could
use audits to collect the model's outputs on chosen molecules (model extraction). The aggregate program
takes a chunk of `rows` encrypted molecules *and their encrypted labels* and returns only a histogram:
for each label (0, 1) the number of molecules whose score falls in each of `thresholds + 1` score buckets
(FHAUC-style, arXiv 2403.14428). The auditor decrypts these counts only and computes ROC-AUC, accuracy and
the confusion matrix at the model's own decision from them (ties within a bucket count one half).

The circuit is Concrete ML's own integer forward pass (`QuantizedModule._clear_forward`, which Concrete ML
compiles for the normal circuit) over the whole chunk, the class score of `output_head` (q1 - q0 minus the
bias threshold) rounded to the circuit's rounding bits, one lookup for the bucket, one comparison per counter
for the one-hot (label, bucket) and a sum over the rows. Thresholds are fixed when the owner builds the
program (quantiles of the training scores, on the rounded score's grid, plus the decision boundary); they stay
on the server. A padded row carries label `PAD_LABEL`, which falls outside every counter.

The server adds noise it draws itself (a clear input of the circuit the auditor never sets): two-sided
geometric noise of parameter exp(-epsilon / 2) per counter (the histogram's L1 sensitivity is 2: replacing
one molecule moves two counts), clipped at +-`NOISE_OFFSET`, plus `NOISE_OFFSET` so that counts stay
non-negative; the auditor subtracts the offset. With epsilon 0 (the default) the noise is 0.

Binary classifiers only: AUC is the score a binary audit needs; other kinds keep the normal audit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BundleError, CiphertextError, ConfigError
from .output_head import class_scores, lsbs_to_fit, score_offsets
from .tasks import TaskSpec

SPEC_FILE = "aggregate.json"
FORMAT = 1
PAD_LABEL = 2
NOISE_OFFSET = 31  # noise is clipped at +-31 counts (5.5 standard deviations at epsilon 0.5)
MIN_EPSILON = 0.5  # below it, clipping would distort the noise distribution noticeably
MAGIC = b"MCAG1"


@dataclass(frozen=True)
class AggregateSpec:
    """What the auditor and the server know of an aggregate program (`aggregate.json`); no thresholds."""

    model: str  # the bundle's model name; the program is served as `<model>:aggregate`
    rows: int  # molecules per chunk (the circuit's batch); a chunk is padded up to it
    input_shape: list[int]  # one molecule's model input
    thresholds: int  # score thresholds; buckets = thresholds + 1
    decision_bucket: int  # buckets >= it are predicted class 1 (the model's own decision)
    client_fingerprint: str  # the model's client part it was built for (the auditor quantizes with it)
    circuit: dict = field(default_factory=dict)  # CircuitStats of the program
    noise_offset: int = NOISE_OFFSET
    format: int = FORMAT

    @property
    def buckets(self) -> int:
        return self.thresholds + 1

    @property
    def counters(self) -> int:
        return 2 * self.buckets

    @property
    def program(self) -> str:
        return program_name(self.model)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, directory: str | Path) -> AggregateSpec:
        path = Path(directory) / SPEC_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(
                f"{path} is missing or unreadable; add the aggregate program with `molcloak aggregate BUNDLE`"
            ) from exc
        if data.get("format") != FORMAT:
            raise BundleError(
                f"{path}: aggregate format {data.get('format')!r}, expected {FORMAT}; rebuild it with "
                "`molcloak aggregate BUNDLE --force`"
            )
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def program_name(model: str) -> str:
    """The name under which a model's aggregate program is served (and its keys are registered)."""
    return f"{model}:aggregate"


def check_task(task: TaskSpec) -> None:
    if task.kind != "binary":
        raise ConfigError(
            f"an aggregate-only audit needs a binary classifier (its score is ROC-AUC); this model is a "
            f"{task.kind} model: audit it with the normal `molcloak audit`"
        )


# ---------------------------------------------------------------- building the program (owner)


def bucket_thresholds(scores: np.ndarray, lsbs: int, thresholds: int) -> tuple[np.ndarray, int]:
    """Thresholds on the grid of the rounded score (multiples of 2**lsbs): training-score quantiles and the
    decision boundary (the class is 1 iff the rounded score > 0, i.e. >= one grid step). Returns the sorted
    thresholds and the first bucket of class 1."""
    step = 2**lsbs
    levels = np.arange(1, thresholds + 1) / (thresholds + 1)
    grid = np.round(np.quantile(scores, levels) / step) * step
    thr = np.unique(np.append(grid, step).astype(np.int64))
    return thr, int(np.searchsorted(thr, step, side="right"))


def rounded(scores: np.ndarray, lsbs: int) -> np.ndarray:
    """What `fhe.round_bit_pattern` makes of integer scores: the nearest multiple of 2**lsbs (ties up)."""
    if not lsbs:
        return scores
    return ((scores + 2 ** (lsbs - 1)) >> lsbs) << lsbs


def build_program(q_module, task: TaskSpec, X_calib, rows: int, thresholds: int, target_bits: int, config):
    """Compile the aggregate program of a compiled (logits) QuantizedModule; returns (circuit, owner,
    decision bucket). The thresholds (`owner`: thresholds, rounding, score offsets) stay with the owner.
    `config` is the model's CompileConfig (rounding method, p_error)."""
    from concrete import fhe

    check_task(task)
    if not 1 <= rows <= 4096 or not 1 <= thresholds <= 62:
        raise ConfigError(
            f"--rows {rows} / --thresholds {thresholds}: rows must be 1..4096 and thresholds 1..62 "
            "(defaults 128 and 8)"
        )
    offsets = score_offsets(q_module.output_quantizers[0], pairwise=True)
    qcal = q_module.quantize_input(np.asarray(X_calib, dtype=np.float32))
    s_cal = class_scores(q_module._clear_forward(qcal), True, offsets)[:, 0]
    lsbs = lsbs_to_fit(s_cal, target_bits)
    thr, decision = bucket_thresholds(rounded(s_cal, lsbs), lsbs, thresholds)
    n_buckets = len(thr) + 1
    counters = np.arange(2 * n_buckets).reshape((1, -1))
    exactness = fhe.Exactness.EXACT if config.rounding_method == "exact" else fhe.Exactness.APPROXIMATE

    def audit(q_x, label, noise):
        s = class_scores(q_module._clear_forward(q_x), True, offsets)
        if lsbs:
            s = fhe.round_bit_pattern(s, lsbs_to_remove=lsbs, exactness=exactness)
        bucket = fhe.univariate(lambda v: np.searchsorted(thr, v, side="right"))(s)  # (rows, 1)
        cell = bucket + n_buckets * label.reshape((-1, 1))  # label 2 (padding) is past every counter
        return np.sum(cell == counters, axis=0) + noise

    compiler = fhe.Compiler(audit, {"q_x": "encrypted", "label": "encrypted", "noise": "clear"})
    circuit = compiler.compile(
        _inputset(qcal, rows, 2 * n_buckets),
        p_error=config.p_error,
        single_precision=False,
        compress_input_ciphertexts=True,
        compress_evaluation_keys=True,
    )
    return circuit, {"thresholds": thr.tolist(), "lsbs": lsbs, "offsets": offsets.tolist()}, decision


def expected_counts(q_module, owner: dict, qx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The counts the program computes, in the clear (the owner's check; exact with exact rounding): (2, buckets)."""
    thr = np.asarray(owner["thresholds"])
    s = class_scores(q_module._clear_forward(qx), True, np.asarray(owner["offsets"]))[:, 0]
    bucket = np.searchsorted(thr, rounded(s, owner["lsbs"]), side="right")
    out = np.zeros((2, len(thr) + 1), dtype=np.int64)
    np.add.at(out, (np.asarray(labels, dtype=np.int64), bucket), 1)
    return out


def _inputset(qcal: np.ndarray, rows: int, counters: int) -> list:
    """Chunks that cover the calibration rows (the model's value ranges), every label including padding,
    and the worst case of every counter: all rows in one cell, with the largest noise (Concrete sizes each
    counter from the input set; a narrower counter would overflow silently)."""
    rng = np.random.default_rng(0)
    n = len(qcal)
    chunks = [rng.permutation(n)[i : i + rows] for i in range(0, n, rows)]
    chunks = [np.resize(c, rows) for c in chunks if len(c)]
    top = np.full(counters, 2 * NOISE_OFFSET, dtype=np.int64)
    zero = np.zeros(counters, dtype=np.int64)
    out = [(qcal[c], rng.integers(0, PAD_LABEL + 1, rows), zero) for c in chunks]
    same = np.repeat(qcal[:1], rows, axis=0)
    for label in (0, 1, PAD_LABEL):
        out.append((same, np.full(rows, label, dtype=np.int64), top))
    return out


# ---------------------------------------------------------------- jobs (server)


def pack_job(rows: bytes, labels: bytes, noise: np.ndarray) -> bytes:
    """One chunk's job for an FHE worker: the auditor's two ciphertexts and the server's noise."""
    noise = np.asarray(noise, dtype="<i8")
    return b"".join(
        (MAGIC, struct.pack("<QQI", len(rows), len(labels), len(noise)), rows, labels, noise.tobytes())
    )


def unpack_job(payload: bytes) -> tuple[bytes, bytes, np.ndarray]:
    head = len(MAGIC) + struct.calcsize("<QQI")
    if len(payload) < head or not payload.startswith(MAGIC):
        raise CiphertextError("the aggregate job is malformed; send the chunk's two ciphertexts again")
    n_rows, n_labels, n_noise = struct.unpack("<QQI", payload[len(MAGIC) : head])
    if head + n_rows + n_labels + 8 * n_noise != len(payload):
        raise CiphertextError("the aggregate job is malformed; send the chunk's two ciphertexts again")
    rows = payload[head : head + n_rows]
    labels = payload[head + n_rows : head + n_rows + n_labels]
    noise = np.frombuffer(payload[head + n_rows + n_labels :], dtype="<i8").astype(np.int64)
    return rows, labels, noise


def draw_noise(counters: int, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """The clear noise input of one chunk: two-sided geometric noise (discrete Laplace) of scale 2/epsilon
    per counter, clipped at +-NOISE_OFFSET, plus NOISE_OFFSET; epsilon 0: no noise (the offset only)."""
    if not epsilon:
        return np.full(counters, NOISE_OFFSET, dtype=np.int64)
    check_epsilon(epsilon)
    import secrets

    rng = rng or np.random.default_rng(secrets.randbits(128))
    p = 1.0 - np.exp(-epsilon / 2.0)
    noise = rng.geometric(p, counters) - rng.geometric(p, counters)
    return np.clip(noise, -NOISE_OFFSET, NOISE_OFFSET).astype(np.int64) + NOISE_OFFSET


def check_epsilon(epsilon: float) -> None:
    if not (epsilon == 0 or MIN_EPSILON <= epsilon <= 100):
        raise ConfigError(
            f"--aggregate-epsilon {epsilon:g}: give 0 (no noise) or a value from {MIN_EPSILON} to 100 "
            "(smaller is more private and noisier; 1-2 is a common choice)"
        )


# ---------------------------------------------------------------- adding the program to a bundle (owner)


def add_aggregate(
    bundle: str | Path, rows: int = 128, thresholds: int = 8, force: bool = False
) -> AggregateSpec:
    """Build the aggregate program of a deployed bundle from its owner part and write `<bundle>/aggregate/`.

    The model is compiled again from the owner's checkpoint with the bundle's compile settings (logits
    output), and its input quantization is checked against the bundle's client part, which auditors
    quantize with. Throwaway keys measure the evaluation-key size the server checks uploads against."""
    import dataclasses

    from .bundle import client_fingerprint, load_checkpoint, load_manifest, write_aggregate_part
    from .compile import CircuitStats, CompileConfig, compile_model
    from .errors import CompilationError

    root = Path(bundle)
    manifest = load_manifest(root, "client")
    check_task(manifest.task)
    if (root / "aggregate").exists() and not force:
        raise BundleError(f"{root / 'aggregate'} already exists; pass --force to rebuild it")
    ckpt = load_checkpoint(root)
    config = CompileConfig.from_dict(manifest.data.get("compile"), output="logits")
    q_module, _ = compile_model(ckpt.build_model(), ckpt.X_calib, config, measure_keys=False, task=ckpt.task)
    _check_quantization(q_module, root, ckpt.X_calib)
    target_bits = config.rounding_bits or q_module.fhe_circuit.graph.maximum_integer_bit_width()
    try:
        circuit, owner, decision = build_program(
            q_module, ckpt.task, ckpt.X_calib, rows, thresholds, target_bits, config
        )
    except (RuntimeError, ValueError, AssertionError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise CompilationError(
            f"Concrete could not compile the aggregate program ({str(exc).strip()[:200]}); try fewer "
            "--thresholds, or a model with 3+ activation bits"
        ) from exc
    circuit.keygen(force=True)  # throwaway keys, to record the exact evaluation-key size
    stats = dataclasses.replace(
        CircuitStats.of(circuit), serialized_evaluation_key_bytes=len(circuit.keys.evaluation.serialize())
    )
    spec = AggregateSpec(
        model=manifest.name,
        rows=rows,
        input_shape=list(ckpt.featurizer.shape),
        thresholds=len(owner["thresholds"]),
        decision_bucket=decision,
        client_fingerprint=client_fingerprint(root),
        circuit=stats.to_dict(),
    )
    write_aggregate_part(root, circuit, spec.to_json(), json.dumps(owner), force=force)
    return spec


def _check_quantization(q_module, bundle: Path, X: np.ndarray) -> None:
    """The recompiled model must quantize inputs exactly as the deployed client part does."""
    from concrete.ml.deployment import FHEModelClient

    from .bundle import part_dir
    from .errors import CompilationError

    X = np.asarray(X[:256], dtype=np.float32)
    deployed = FHEModelClient(str(part_dir(bundle, "client"))).model.quantize_input(X)
    if not np.array_equal(np.asarray(deployed), np.asarray(q_module.quantize_input(X))):
        raise CompilationError(
            f"the owner's checkpoint in {bundle} does not compile to the deployed client part's input "
            "quantization; redeploy the bundle (`molcloak deploy`) and add the aggregate program again"
        )
