"""Class-only circuits: the encrypted answer is the predicted class, not the logits.

A model owner who worries about model extraction (a client fitting a copy of the model on the
decrypted logits of chosen inputs) deploys with ``--output class``: the circuit ends in a comparison,
so a client decrypts the decision only, never how confident the model is. The price is the ranking:
ROC-AUC is then computed from hard labels (README, "Model extraction"), and the circuit has one more
table lookup per task.

The circuit is Concrete ML's own integer forward pass (``QuantizedModule._clear_forward``, which
Concrete ML compiles for the logits circuit) followed by, per task, the sign of the score in the output
quantizer's integers: binary ``q[1] - q[0]``, multi-label ``q[t] - zero_point``. The score is rounded
(``fhe.round_bit_pattern``) to the circuit's rounding bits first, so the comparison is a lookup as narrow
as the network's own (a wider one would pick larger crypto parameters: 10x the keys on the demo model).
The answer is written back in the output quantizer's integers as ``zero_point ± 1``, so the unchanged
client part dequantizes it to logits ``±scale`` whose sign (or argmax) is the class;
`class_predictions` turns them into 0/1 "probabilities".

Rounded logits (``--output-bits N``): Concrete ML returns the last layer's integer accumulators unrounded,
so Concrete must decrypt them exactly, and a bootstrap's output noise times the output layer's weights then
has to stay below one unit of that integer (7 bits wide on the lipophilicity network below). On wide outputs
that alone picks crypto parameters with twice the bootstrap work (a lipophilicity network: 54 MB of keys and
298 ms; rounded to 5 bits, 28 MB and 215 ms; PERFORMANCE.md, session 17). ``rounded_logits_circuit`` rounds
each output to N bits first, in the same integers, so the client part dequantizes it unchanged; the outputs
then carry the rounding's error of about one unit in N bits.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .tasks import TaskSpec

OUTPUTS = ("logits", "class")


def check_output(output: str, task: TaskSpec) -> None:
    if output not in OUTPUTS:
        raise ConfigError(f"output {output!r}; expected one of {', '.join(OUTPUTS)}")
    if output == "class" and task.kind not in ("binary", "multilabel"):
        raise ConfigError(
            f"--output class needs a binary or multi-label classifier; this model is a {task.kind} model "
            "(deploy it with --output logits and limit extraction with --max-predictions-per-key)"
        )


def score_offsets(output_quantizer, pairwise: bool) -> np.ndarray:
    """Integer offsets that make `score > 0` the class: the output quantizer holds each output's float
    zero point (the final layer's bias) and one scale, so logit[1] > logit[0] iff q1 - q0 > zp1 - zp0,
    and logit[t] > 0 iff q[t] > zp[t]; for integers, s > z iff s - floor(z) > 0."""
    zp = np.asarray(output_quantizer.zero_point, dtype=np.float64).reshape(1, -1)
    if np.ndim(output_quantizer.scale) or float(output_quantizer.scale) <= 0:
        raise ConfigError(
            "--output class needs one positive output scale (a per-channel output quantizer was found)"
        )
    z = zp[:, 1:2] - zp[:, 0:1] if pairwise else zp
    return np.floor(z).astype(np.int64)


def class_scores(q, pairwise: bool, offsets: np.ndarray):
    """Integer scores whose sign is the class: (n, 1) for a binary model, (n, tasks) for multi-label."""
    return (q[:, 1:2] - q[:, 0:1] if pairwise else q) - offsets


def lsbs_to_fit(scores: np.ndarray, target_bits: int) -> int:
    """Least-significant bits to drop so the signed scores fit in `target_bits` bits."""
    largest = int(np.abs(scores).max(initial=0))
    width = largest.bit_length() + 1  # sign bit
    return max(0, width - target_bits)


def needs_overflow_protection(values: np.ndarray, lsbs: int) -> bool:
    """Whether rounding `values` (the calibration molecules') by `lsbs` bits needs Concrete's overflow
    protection: only when the rounded values need more bits than the values (the largest rounds up past
    its width). Concrete 2.10 turns the protection on whenever the two widths differ, also when rounding
    makes the range narrower (-18 -> -16: 6 bits -> 5); it then removes one bit fewer in the circuit than
    in its own clear evaluation (`Circuit.graph`), so FHE decided `round(s / 2)` where the clear pass
    decided `round(s / 4)`, and near-ties differed (concrete/fhe/mlir/processors/process_rounding.py)."""
    from concrete import fhe

    values = np.asarray(values, dtype=np.int64)
    if not lsbs or not values.size:
        return False
    rounded = fhe.round_bit_pattern(values, lsbs_to_remove=lsbs)
    width = fhe.Integer.that_can_represent(values).bit_width
    return fhe.Integer.that_can_represent(np.asarray(rounded)).bit_width > width


def _sign(v):
    return np.where(v > 0, 1, -1)


def class_circuit(
    q_module, task: TaskSpec, X_calib: np.ndarray, target_bits: int, rounding_method: str, p_error
):
    """Compile the class-only circuit of a compiled QuantizedModule and make its output quantizer the
    identity (scale 1, zero point 0), so the client part no longer carries the final layer's biases."""
    from concrete import fhe

    check_output("class", task)
    pairwise = task.kind == "binary"
    out_q = q_module.output_quantizers[0]
    offsets = score_offsets(out_q, pairwise)
    q_calib = q_module.quantize_input(np.asarray(X_calib, dtype=np.float32))
    calib_scores = class_scores(q_module._clear_forward(q_calib), pairwise, offsets)
    lsbs = lsbs_to_fit(calib_scores, target_bits)
    protect = needs_overflow_protection(calib_scores, lsbs)
    exactness = fhe.Exactness.EXACT if rounding_method == "exact" else fhe.Exactness.APPROXIMATE

    def forward(q_x):
        s = class_scores(q_module._clear_forward(q_x), pairwise, offsets)
        if lsbs:
            s = fhe.round_bit_pattern(
                s, lsbs_to_remove=lsbs, exactness=exactness, overflow_protection=protect
            )
        sign = fhe.univariate(_sign)(s)  # one table lookup per task: +1 for class 1, -1 for class 0
        return sign * np.array([[-1, 1]]) if pairwise else sign

    circuit = _compile(forward, q_calib, p_error)
    n_out = 2 if pairwise else task.n_outputs
    out_q.scale, out_q.zero_point = 1.0, np.zeros((1, n_out))
    out_q.rmin, out_q.rmax = -1.0, 1.0
    return circuit


def rounded_logits_circuit(q_module, X_calib: np.ndarray, output_bits: int, rounding_method: str, p_error):
    """The logits circuit of a compiled QuantizedModule with each output rounded to `output_bits` bits (the
    calibration molecules' widest output sets how many bits are dropped); the module's own circuit when the
    outputs already fit."""
    from concrete import fhe

    q_calib = q_module.quantize_input(np.asarray(X_calib, dtype=np.float32))
    calib_outputs = q_module._clear_forward(q_calib)
    lsbs = lsbs_to_fit(calib_outputs, output_bits)
    if not lsbs:
        return q_module.fhe_circuit
    protect = needs_overflow_protection(calib_outputs, lsbs)
    exactness = fhe.Exactness.EXACT if rounding_method == "exact" else fhe.Exactness.APPROXIMATE

    def forward(q_x):
        return fhe.round_bit_pattern(
            q_module._clear_forward(q_x),
            lsbs_to_remove=lsbs,
            exactness=exactness,
            overflow_protection=protect,
        )

    return _compile(forward, q_calib, p_error)


def clear_outputs(q_module, X: np.ndarray) -> np.ndarray:
    """The compiled circuit's outputs on `X` without FHE noise, dequantized: for a circuit this module built,
    what Concrete ML's ``forward(X, fhe="disable")`` is for its own (which runs the network's integer forward
    pass, not the circuit, and so misses the output rounding and the class comparison's offsets)."""
    q_x = q_module.quantize_input(np.asarray(X, dtype=np.float32))
    graph = q_module.fhe_circuit.graph
    q_y = np.vstack([np.asarray(graph(q_x[i : i + 1])).reshape(1, -1) for i in range(len(q_x))])
    return q_module.dequantize_output(q_y)


def _compile(forward, q_calib: np.ndarray, p_error):
    """Compile `forward` on the quantized calibration rows with the settings of Concrete ML's own circuits."""
    from concrete import fhe

    return fhe.Compiler(forward, {"q_x": "encrypted"}).compile(
        [q_calib[i : i + 1] for i in range(len(q_calib))],
        p_error=p_error,
        single_precision=False,
        compress_input_ciphertexts=True,
        compress_evaluation_keys=True,
    )


def class_predictions(task: TaskSpec, raw: np.ndarray) -> np.ndarray:
    """Outputs of a class-only circuit (or logits) -> the shape `metrics.to_predictions` gives, with 0/1
    values: one-hot (n, 2) for a binary model, (n, n_tasks) for a multi-label one."""
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float64))
    if task.kind == "binary":
        c = (raw[:, 1] > raw[:, 0]).astype(np.float64)
        return np.stack([1.0 - c, c], axis=1)
    return (raw > 0).astype(np.float64)
