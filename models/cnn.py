"""Quantization-aware CNNs (Brevitas) on molecule images, compiled to ONE TFHE circuit.

ChemXor's CNNs on 32x32 Morgan-count images had to be cut into partitions with client
re-encryption in between; here every layer runs in one circuit, with the nonlinearities
evaluated exactly by programmable bootstrapping (PBS). Keeping that affordable decides the
layout:

- convolutions downsample by their stride (kernel = stride = 4 on 32x32 -> 8x8), because every
  activation of a feature map costs one PBS: a 32x32x4 map would be 4,096 lookups;
- per convolution: QuantIdentity (unsigned: pixels and ReLU outputs are >= 0) ->
  QuantConv2d -> [BatchNorm2d] -> ReLU; Concrete ML fuses BatchNorm + ReLU + the next
  quantizer into one lookup per activation;
- an optional AvgPool2d after the last convolution (`pool`), then the next quantizer;
- head: Flatten -> [QuantLinear -> BatchNorm1d -> ReLU]* -> QuantLinear to the outputs.

Low bit widths (2-bit weights, 3-bit activations) plus the compiler's rounding keep every
lookup at a few bits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import brevitas.nn as qnn
import torch
from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    """One entry of `channels`, `kernels` and `strides` per convolution; `hidden` = linear head widths."""

    channels: tuple[int, ...] = (4,)
    kernels: tuple[int, ...] = (4,)
    strides: tuple[int, ...] = (4,)
    pool: int = 1  # AvgPool2d kernel (and stride) after the last convolution; 1 = no pooling
    hidden: tuple[int, ...] = ()
    weight_bits: int = 2
    act_bits: int = 3
    input_bits: int = 3
    batchnorm: bool = True

    def __post_init__(self):
        for f in ("channels", "kernels", "strides", "hidden"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        n = len(self.channels)
        if n == 0 or len(self.kernels) != n or len(self.strides) != n:
            raise ValueError(
                f"channels {list(self.channels)}, kernels {list(self.kernels)} and strides {list(self.strides)} "
                "need one entry per convolution (at least one), e.g. channels 4,8 kernels 4,2 strides 4,2"
            )
        if min(self.channels + self.kernels + self.strides) < 1 or self.pool < 1:
            raise ValueError(f"CNN sizes must be positive integers; got {self.to_dict()}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class CNN1Config(CNNConfig):
    """`cnn1`: one convolution 1 -> 4 channels, 4x4 kernel, stride 4 (32x32 -> 8x8), linear head."""


@dataclass(frozen=True)
class CNN2Config(CNNConfig):
    """`cnn2`: two convolutions, 1 -> 4 (4x4, stride 4) and 4 -> 8 (2x2, stride 2): 32x32 -> 8x8 -> 4x4."""

    channels: tuple[int, ...] = (4, 8)
    kernels: tuple[int, ...] = (4, 2)
    strides: tuple[int, ...] = (4, 2)


def _unsigned_quant(bits: int) -> qnn.QuantIdentity:
    return qnn.QuantIdentity(bit_width=bits, act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)


def _weight_kw(bits: int) -> dict:
    return {
        "bias": True,
        "weight_bit_width": bits,
        "weight_quant": Int8WeightPerTensorFloat,
        "bias_quant": None,
        "weight_narrow_range": True,
    }


def image_side(n_in: int, name: str = "CNN") -> int:
    """Side of the square single-channel image with `n_in` pixels."""
    side = math.isqrt(n_in)
    if side * side != n_in:
        raise ValueError(
            f"{name} needs a square molecule image, got {n_in} input features; train it with --features grid:r=2,size=32"
        )
    return side


class QuantCNN(nn.Module):
    """Brevitas QAT CNN: (n, 1, side, side) images, side*side = `n_in` -> `n_out` logits (or 1 value)."""

    def __init__(self, n_in: int, n_out: int, config: CNNConfig = CNN1Config()):
        super().__init__()
        self.config = config
        side = image_side(n_in)
        layers: list[nn.Module] = []
        c_in, bits = 1, config.input_bits
        for c_out, k, s in zip(config.channels, config.kernels, config.strides):
            if side < k:
                raise ValueError(
                    f"kernel {k} does not fit the {side}x{side} feature map; use smaller kernels/strides or a larger grid"
                )
            layers += [
                _unsigned_quant(bits),
                qnn.QuantConv2d(c_in, c_out, k, stride=s, **_weight_kw(config.weight_bits)),
            ]
            if config.batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            side, c_in, bits = (side - k) // s + 1, c_out, config.act_bits
        if config.pool > 1:
            layers += [_unsigned_quant(bits), nn.AvgPool2d(config.pool)]
            side //= config.pool
            if side < 1:
                raise ValueError(f"pool {config.pool} leaves an empty feature map; lower it")
        width = c_in * side * side
        layers += [_unsigned_quant(bits), nn.Flatten()]
        for h in config.hidden:
            layers += [qnn.QuantLinear(width, h, **_weight_kw(config.weight_bits))]
            if config.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers += [nn.ReLU(), _unsigned_quant(config.act_bits)]
            width = h
        layers.append(qnn.QuantLinear(width, n_out, **_weight_kw(config.weight_bits)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
