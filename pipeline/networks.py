"""The core's door to the network definitions in `molcloak.models`.

`molcloak.models` holds pure Brevitas networks and their registry; it imports nothing from the
core and reports bad options with the built-in `ValueError`. Here those become
`ModelConfigError` (one line in the CLI, a 4xx on a server), and a checkpoint's network is
rebuilt, whether it came from the registry or from an imported PyTorch model.
"""

from __future__ import annotations

import functools

from torch import nn

from molcloak.models import registry

from . import torch_import
from .errors import ModelConfigError


def _model_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from exc

    return wrapper


make_config = _model_errors(registry.make_config)
default_features = _model_errors(registry.default_features)
check_features = _model_errors(registry.check_features)
build_model = _model_errors(registry.build_model)


def build_network(model_name: str, model_config: dict, n_inputs: int, n_outputs: int) -> nn.Module:
    """A checkpoint's network with fresh weights: an imported float nn.Sequential or a registry model."""
    if model_name == torch_import.IMPORTED_MODEL:  # a float nn.Sequential from `compile --torch-model`
        return torch_import.build_sequential(model_config["layers"])
    return build_model(model_name, n_inputs, n_outputs, make_config(model_name, model_config))
