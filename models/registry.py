"""Model registry: a name -> (config class, constructor). `molcloak train --model NAME` uses it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

from torch import nn

from .cnn import CNN1Config, CNN2Config, QuantCNN
from .mlp import MLPConfig, QuantMLP, SigmoidMLPConfig


class ModelEntry(NamedTuple):
    config_cls: type
    build: Callable[[int, int, Any], nn.Module]
    description: str
    features: str | None = None  # default feature spec (None = the workflow's default)
    image_input: bool = False  # takes (n, 1, size, size) molecule images (grid features)


GRID_FEATURES = "grid:r=2,size=32"
MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLPConfig, QuantMLP, "Brevitas QAT MLP (hidden widths, weight/activation/input bits)"),
    "mlp-sigmoid": ModelEntry(
        SigmoidMLPConfig,
        QuantMLP,
        "the MLP with sigmoid activations, each evaluated exactly by one PBS "
        "(tabular data, e.g. breast-cancer)",
    ),
    "cnn1": ModelEntry(
        CNN1Config,
        QuantCNN,
        "Brevitas QAT CNN, one convolution (4 ch, 4x4 stride 4) on 32x32 molecule images",
        GRID_FEATURES,
        image_input=True,
    ),
    "cnn2": ModelEntry(
        CNN2Config,
        QuantCNN,
        "Brevitas QAT CNN, two convolutions (4 and 8 ch) on 32x32 molecule images",
        GRID_FEATURES,
        image_input=True,
    ),
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
        raise ValueError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(valid))}"
        )
    for key in ("hidden", "channels", "kernels", "strides"):
        if key in options:
            values = options[key] if isinstance(options[key], (list, tuple)) else [options[key]]
            options[key] = tuple(int(h) for h in values)
    if options.get("hidden") == (0,):  # --hidden 0: no hidden layer, a linear model
        options["hidden"] = ()
    config = entry.config_cls(**options)
    _check_bits(config)
    return config


def _check_bits(config) -> None:
    for key in ("weight_bits", "act_bits", "input_bits"):
        bits = getattr(config, key, None)
        if bits is not None and not 1 <= bits <= 8:
            raise ValueError(f"{key}={bits} is out of range; TFHE circuits need 1..8 bits (2-4 is typical)")
    if any(h < 1 for h in getattr(config, "hidden", ())):
        raise ValueError(
            f"hidden widths {config.hidden} must be positive integers (or 0 alone: no hidden layer, a linear model)"
        )


def default_features(name: str) -> str | None:
    return _entry(name).features


def check_features(name: str, spec) -> None:
    """Image models need grid features and vector models vector features; say which to use."""
    image = len(spec.shape) == 3
    if _entry(name).image_input and not image:
        raise ValueError(
            f"model {name!r} takes molecule images, not {str(spec)!r}; use --features {GRID_FEATURES}"
        )
    if image and not _entry(name).image_input:
        images = ", ".join(k for k, v in MODELS.items() if v.image_input)
        raise ValueError(
            f"features {str(spec)!r} are images for the CNN models ({images}); model {name!r} needs "
            "vector features such as physchem or morgan_count:r=2,n=256"
        )


def build_model(name: str, n_in: int, n_out: int, config=None) -> nn.Module:
    entry = _entry(name)
    return entry.build(n_in, n_out, config if config is not None else entry.config_cls())


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(model_names())}")
    return MODELS[name]
