"""Concrete ML compilation of a trained Brevitas model and the circuit's statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import numpy as np
from torch import nn

from .errors import CompilationError, ConfigError
from .output_head import class_circuit, rounded_logits_circuit
from .tasks import TaskSpec

# 1e-6 per PBS: the cheapest crypto parameters this circuit gets (2^-40 costs ~2x the time and ~2x the keys, 1e-7 as
# much as 2^-40), while FHE still equals the simulation except about once in 65,000 molecules (PERFORMANCE.md); the
# key-rotation bound of the security model (README, "Keys") assumes it. Every default p_error derives from this one
DEFAULT_P_ERROR = 1e-6


def check_p_error(value: float | None, name: str = "p_error") -> None:
    """A `ConfigError` naming `name` (a field or a flag) and the value unless it is a probability in (0, 1) or None
    (Concrete's default, 2^-40)."""
    if value is not None and not 0 < value < 1:
        raise ConfigError(
            f"{name} {value:g}: use a probability per bootstrap in (0, 1), e.g. {DEFAULT_P_ERROR:g}"
        )


@dataclass(frozen=True)
class CompileConfig:
    """`rounding_bits`: accumulators are rounded to this many bits before each lookup (None = off).

    `rounding_method` "approximate" is cheaper than "exact"; `p_error` is the error probability
    allowed per programmable bootstrap (default 1e-6; None = Concrete's default, 2^-40).
    `n_bits`: post-training quantization bits of a float model (imported with --torch-model);
    unused for Brevitas QAT models, whose quantizers fix their bits.
    `output`: "logits" (the client decrypts the model's outputs) or "class" (the circuit ends in a
    comparison and the client decrypts the predicted class only; see `output_head`).
    `output_bits`: round each output of a logits circuit to this many bits before it is decrypted (None = exact,
    Concrete ML's own circuit). Concrete must decrypt an unrounded output exactly, and on wide outputs that alone
    can double the cost of every bootstrap (`output_head.rounded_logits_circuit`).
    """

    rounding_bits: int | None = 5
    rounding_method: Literal["exact", "approximate"] = "approximate"
    p_error: float | None = DEFAULT_P_ERROR
    n_bits: int | None = None
    output: Literal["logits", "class"] = "logits"
    output_bits: int | None = None

    def __post_init__(self):
        if self.rounding_bits is not None and not 2 <= self.rounding_bits <= 16:
            raise ConfigError(f"rounding bits {self.rounding_bits} out of range; use 2..16 or none")
        if self.rounding_method not in ("exact", "approximate"):
            raise ConfigError(f"rounding method {self.rounding_method!r}; expected 'exact' or 'approximate'")
        if self.output not in ("logits", "class"):
            raise ConfigError(f"output {self.output!r}; expected 'logits' or 'class'")
        check_p_error(self.p_error)
        if self.output_bits is not None and not 2 <= self.output_bits <= 16:
            raise ConfigError(
                f"output bits {self.output_bits} out of range; use 2..16 or none (exact outputs)"
            )
        if self.output_bits is not None and self.output == "class":
            raise ConfigError(
                "--output-bits rounds the logits a circuit returns; a class-only circuit (--output class) "
                "returns the class, so leave --output-bits unset"
            )
        if self.n_bits is not None and not 2 <= self.n_bits <= 8:
            raise ConfigError(
                f"n_bits {self.n_bits} out of range; post-training quantization needs 2..8 bits (4-6 is typical)"
            )

    def rounding_arg(self):
        if self.rounding_bits is None:
            return None
        return {"n_bits": self.rounding_bits, "method": self.rounding_method}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, **given) -> CompileConfig:
        """The config recorded in a checkpoint or manifest (keys of other versions ignored), with `given`
        values replacing recorded ones."""
        recorded = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        return cls(**{**recorded, **given})


@dataclass(frozen=True)
class CircuitStats:
    pbs_count: int
    key_switch_count: int
    max_bit_width: int
    bootstrap_key_bytes: int
    keyswitch_key_bytes: int
    input_ciphertext_bytes: int
    output_ciphertext_bytes: int
    p_error: float
    global_p_error: float
    complexity: float
    serialized_evaluation_key_bytes: int = 0  # exact size a client uploads (measured with throwaway keys)

    @property
    def evaluation_key_bytes(self) -> int:
        return self.bootstrap_key_bytes + self.keyswitch_key_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "evaluation_key_bytes": self.evaluation_key_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> CircuitStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def of(cls, circuit) -> CircuitStats:
        s = circuit.statistics
        return cls(
            pbs_count=int(s["programmable_bootstrap_count"]),
            key_switch_count=int(s["key_switch_count"]),
            max_bit_width=int(circuit.graph.maximum_integer_bit_width()),
            bootstrap_key_bytes=int(s["size_of_bootstrap_keys"]),
            keyswitch_key_bytes=int(s["size_of_keyswitch_keys"]),
            input_ciphertext_bytes=int(s["size_of_inputs"]),
            output_ciphertext_bytes=int(s["size_of_outputs"]),
            p_error=float(s["p_error"]),
            global_p_error=float(s["global_p_error"]),
            complexity=float(s["complexity"]),
        )


def compile_model(
    model: nn.Module,
    X_calib: np.ndarray,
    config: CompileConfig = CompileConfig(),
    measure_keys: bool = True,
    task: TaskSpec | None = None,
):
    """Compile a trained Brevitas QAT model; returns (QuantizedModule, CircuitStats).

    `X_calib` (the training features) bounds every intermediate value of the circuit.
    `measure_keys` generates throwaway keys to record the exact serialized evaluation-key size
    (the server checks uploads against it); skip it when only simulating.
    `config.output` "class" replaces the logits circuit by a class-only one (`output_head`; needs `task`);
    `config.output_bits` by one whose outputs are rounded before they are decrypted.
    """
    from concrete.ml.torch.compile import (
        compile_brevitas_qat_model,
        compile_torch_model,
        has_any_qnn_layers,
    )

    model.eval()
    qat = has_any_qnn_layers(model)
    if not qat and config.n_bits is None:
        raise CompilationError(
            "the model is a float model (no Brevitas quantizers); post-training quantization needs "
            "--n-bits N (e.g. 4-6)"
        )
    compile_fn = compile_brevitas_qat_model if qat else partial(compile_torch_model, n_bits=config.n_bits)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q_module = compile_fn(
                model,
                np.asarray(X_calib, dtype=np.float32),
                rounding_threshold_bits=config.rounding_arg(),
                p_error=config.p_error,
            )
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise CompilationError(
            f"Concrete ML could not compile the model ({_first_line(exc)}); "
            "lower the weight/activation bits or set --rounding-bits 4-6"
        ) from exc
    if config.output == "class":
        if task is None:
            raise ConfigError("a class-only circuit needs the model's task (binary or multi-label)")
        # the comparison's lookup at the precision of the circuit's other lookups: a wider one picks
        # larger crypto parameters (demo model: 302 MB of keys unrounded, 28 MB rounded to 5 bits)
        target_bits = config.rounding_bits or q_module.fhe_circuit.graph.maximum_integer_bit_width()
        try:
            q_module.fhe_circuit = class_circuit(
                q_module, task, X_calib, target_bits, config.rounding_method, config.p_error
            )
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise CompilationError(
                f"Concrete could not compile the class-only circuit ({_first_line(exc)}); "
                "deploy with --output logits, or train with more activation bits (3 or more)"
            ) from exc
    elif config.output_bits is not None:
        try:
            q_module.fhe_circuit = rounded_logits_circuit(
                q_module, X_calib, config.output_bits, config.rounding_method, config.p_error
            )
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise CompilationError(
                f"Concrete could not compile the circuit with rounded outputs ({_first_line(exc)}); "
                "leave --output-bits unset (exact outputs)"
            ) from exc
    stats = CircuitStats.of(q_module.fhe_circuit)
    if not measure_keys:
        return q_module, stats
    circuit = q_module.fhe_circuit
    circuit.keygen(force=True)  # throwaway keys, only to measure the exact evaluation-key size
    return q_module, dataclasses.replace(
        stats, serialized_evaluation_key_bytes=len(circuit.keys.evaluation.serialize())
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
