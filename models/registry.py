"""Model registry: a name -> (config class, constructor). `molcloak train --model NAME` uses it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from torch import nn

from molcloak.pipeline.errors import ModelConfigError

from .mlp import MLPConfig, QuantMLP, SigmoidMLPConfig


class ModelEntry(NamedTuple):
    config_cls: type
    build: Callable[[int, int, Any], nn.Module]
    description: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLPConfig, QuantMLP, "Brevitas QAT MLP (hidden widths, weight/activation/input bits)"),
    "mlp-sigmoid": ModelEntry(SigmoidMLPConfig, QuantMLP, "the MLP with sigmoid activations, each evaluated exactly by one PBS "
                              "(tabular data, e.g. breast-cancer)"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def make_config(name: str, options: dict[str, Any] | None = None):
    """Build the config of model `name` from a dict, rejecting unknown keys with the valid ones."""
    entry = _entry(name)
    options = dict(options or {})
    valid = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ModelConfigError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(valid))}"
        )
    if "hidden" in options:
        options["hidden"] = tuple(int(h) for h in options["hidden"])
    config = entry.config_cls(**options)
    _check_bits(config)
    return config


def _check_bits(config) -> None:
    for key in ("weight_bits", "act_bits", "input_bits"):
        bits = getattr(config, key, None)
        if bits is not None and not 1 <= bits <= 8:
            raise ModelConfigError(f"{key}={bits} is out of range; TFHE circuits need 1..8 bits (2-4 is typical)")
    if any(h < 1 for h in getattr(config, "hidden", ())):
        raise ModelConfigError(f"hidden widths {config.hidden} must be positive integers")


def build_model(name: str, n_in: int, n_out: int, config=None) -> nn.Module:
    entry = _entry(name)
    return entry.build(n_in, n_out, config if config is not None else entry.config_cls())


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return MODELS[name]
