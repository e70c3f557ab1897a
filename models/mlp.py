"""Quantization-aware MLP (Brevitas) that Concrete ML compiles to one TFHE circuit.

Layout per hidden layer: QuantIdentity -> QuantLinear -> [BatchNorm1d] -> ReLU (or Sigmoid).
The input quantizer fixes the input bit width; each activation is re-quantized
by the next layer's QuantIdentity, so Concrete ML fuses BatchNorm + ReLU +
re-quantization into one programmable bootstrap (PBS) per neuron. That lookup is exact for
any activation, so `activation="sigmoid"` costs the same as ReLU: no polynomial approximation.
With no hidden layer (`hidden=()`, `--hidden 0`) the network is linear and its circuit has no PBS at all:
the client decrypts its logits (with random Fourier features as inputs, a kernel machine; `random_features`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import brevitas.nn as qnn
import torch
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class MLPConfig:
    # defaults chosen by the sweep in evaluation/PERFORMANCE.md (sol-low, physchem:scale=quantile features)
    hidden: tuple[int, ...] = (16,)
    weight_bits: int = 3
    act_bits: int = 3
    input_bits: int = 4
    batchnorm: bool = True
    dropout: float = 0.0
    activation: str = "relu"  # relu or sigmoid (evaluated exactly by the lookup table of a PBS)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


@dataclass(frozen=True)
class SigmoidMLPConfig(MLPConfig):
    """The `mlp-sigmoid` entry: the MLP with sigmoid activations (the TenSEAL breast-cancer setting)."""

    activation: str = "sigmoid"
    weight_bits: int = 2  # the bit widths this entry was measured with (MLPConfig's defaults moved to 3/3/4)
    input_bits: int = 3


def _quant_identity(bits: int) -> qnn.QuantIdentity:
    return qnn.QuantIdentity(bit_width=bits, act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)


def _quant_linear(n_in: int, n_out: int, bits: int) -> qnn.QuantLinear:
    return qnn.QuantLinear(
        n_in,
        n_out,
        bias=True,
        weight_bit_width=bits,
        weight_quant=Int8WeightPerTensorFloat,
        bias_quant=None,
        weight_narrow_range=True,
    )


class QuantMLP(nn.Module):
    """Brevitas QAT MLP: `n_in` features -> hidden layers -> `n_out` logits (or 1 regression output)."""

    def __init__(self, n_in: int, n_out: int, config: MLPConfig = MLPConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = n_in
        bits = config.input_bits
        for h in config.hidden:
            layers += [_quant_identity(bits), _quant_linear(width, h, config.weight_bits)]
            if config.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width, bits = h, config.act_bits
        layers += [_quant_identity(bits), _quant_linear(width, n_out, config.weight_bits)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
