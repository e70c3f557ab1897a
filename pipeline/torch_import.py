"""Import a float PyTorch `nn.Sequential` and turn it into a normal molcloak checkpoint.

`molcloak compile --torch-model model.pt` (PyCrCNN's "net builder", but in one TFHE circuit):
the model is quantized after training by Concrete ML (`compile_torch_model` with `n_bits`,
calibrated on the dataset's training split), so nothing about it needs Brevitas.

Accepted files (`torch.save`):

- the whole module, ``torch.save(model, "model.pt")``; loading it unpickles Python objects, so
  only import files you made yourself;
- a layer spec and a state dict, ``torch.save({"layers": layer_specs(model), "state_dict":
  model.state_dict()}, "model.pt")``; loaded with ``weights_only=True`` (no code runs).

Either way the model is stored in the checkpoint as that spec plus its state dict and rebuilt
from them (`build_sequential`), so the bundle's owner/ part holds no pickled code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import TorchImportError
from .train import predict_raw

IMPORTED_MODEL = "torch"  # the checkpoint's model name for imported models
DEFAULT_PTQ_BITS = 4  # `compile --torch-model` default n_bits (see the README's measurements)
SUPPORTED_LAYERS = ("Linear", "Conv2d", "ReLU", "Sigmoid", "AvgPool2d", "Flatten", "Dropout")
_NO_ARGS = ("ReLU", "Sigmoid", "Dropout")  # Dropout is the identity at inference


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _layer_spec(i: int, layer: nn.Module) -> dict[str, Any]:
    kind = type(layer).__name__
    if kind not in SUPPORTED_LAYERS or type(layer) is not getattr(nn, kind):
        raise TorchImportError(
            f"layer {i} ({kind}) is not supported; supported: {', '.join(SUPPORTED_LAYERS)} "
            "(in an nn.Sequential); replace it or fold it into a supported layer"
        )
    if kind in _NO_ARGS:
        return {"type": kind}
    if kind == "Linear":
        return {
            "type": kind,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }
    if kind == "Flatten":
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise TorchImportError(
                f"layer {i} (Flatten) flattens dims {layer.start_dim}..{layer.end_dim}; only "
                "Flatten() (start_dim=1, end_dim=-1) is supported"
            )
        return {"type": kind}
    if kind == "Conv2d":
        unsupported = {
            "groups": layer.groups != 1,
            "dilation": _pair(layer.dilation) != [1, 1],
            "padding": isinstance(layer.padding, str),
            "padding_mode": layer.padding_mode != "zeros",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise TorchImportError(
                f"layer {i} (Conv2d) sets {', '.join(bad)}; only groups=1, dilation=1, numeric "
                "zero padding are supported"
            )
        return {
            "type": kind,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": _pair(layer.kernel_size),
            "stride": _pair(layer.stride),
            "padding": _pair(layer.padding),
            "bias": layer.bias is not None,
        }
    # AvgPool2d
    if layer.ceil_mode or not layer.count_include_pad or layer.divisor_override is not None:
        raise TorchImportError(
            f"layer {i} (AvgPool2d) sets ceil_mode/count_include_pad/divisor_override; only the "
            "defaults are supported"
        )
    return {
        "type": kind,
        "kernel_size": _pair(layer.kernel_size),
        "stride": _pair(layer.stride or layer.kernel_size),
        "padding": _pair(layer.padding),
    }


def layer_specs(model: nn.Module) -> list[dict[str, Any]]:
    """JSON description of an `nn.Sequential` of supported layers (raises on the first other layer)."""
    if not isinstance(model, nn.Sequential):
        raise TorchImportError(
            f"expected an nn.Sequential, got {type(model).__name__}; put the layers in nn.Sequential(...)"
        )
    if len(model) == 0:
        raise TorchImportError("the nn.Sequential has no layers")
    return [_layer_spec(i, layer) for i, layer in enumerate(model)]


def build_sequential(layers: list[dict[str, Any]]) -> nn.Sequential:
    """The float `nn.Sequential` described by `layer_specs` (fresh weights)."""
    out = []
    for i, spec in enumerate(layers):
        args = dict(spec)
        kind = args.pop("type", None)
        if kind not in SUPPORTED_LAYERS:
            raise TorchImportError(
                f"layer {i} ({kind}) is not supported; supported: {', '.join(SUPPORTED_LAYERS)}"
            )
        try:
            out.append(getattr(nn, kind)(**args))
        except TypeError as exc:
            raise TorchImportError(f"layer {i} ({kind}) has invalid arguments {args} ({exc})") from exc
    return nn.Sequential(*out)


def load_torch_model(path: str | Path) -> nn.Sequential:
    """Read a whole saved `nn.Sequential` or a {"layers", "state_dict"} file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TorchImportError(
            f"model file {str(path)!r} does not exist; save it with torch.save(model, path)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError):  # a pickled module, not plain tensors
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling can fail in arbitrary ways (missing classes, truncation)
            raise TorchImportError(f"{path} is not a readable torch.save file ({str(exc)[:200]})") from exc
    if isinstance(obj, nn.Module):
        model = build_sequential(layer_specs(obj))
        state = obj.state_dict()
    elif isinstance(obj, dict) and "layers" in obj and "state_dict" in obj:
        model, state = build_sequential(list(obj["layers"])), obj["state_dict"]
    else:
        raise TorchImportError(
            f"{path} holds a {type(obj).__name__}, not a model; save the whole nn.Sequential (torch.save(model, path)) "
            "or {'layers': layer_specs(model), 'state_dict': model.state_dict()}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TorchImportError(
            f"{path}: the weights do not match the layers ({str(exc).splitlines()[0][:200]})"
        ) from exc
    return model.eval()


def _first_layer_expects(model: nn.Sequential) -> str:
    for layer in model:
        if isinstance(layer, nn.Linear):
            return f"its first Linear layer takes {layer.in_features} values"
        if isinstance(layer, nn.Conv2d):
            return f"its first Conv2d takes images with {layer.in_channels} channel(s) (use --features grid:r=2,size=32)"
    return "it has no Linear or Conv2d layer"


def check_fits(model: nn.Sequential, spec, task, x: np.ndarray) -> None:
    """Fail clearly when the model does not take the featurizer's output or gives the wrong number of outputs."""
    try:
        out = predict_raw(model, x)
    except RuntimeError as exc:
        raise TorchImportError(
            f"the model does not take the features {str(spec)!r} (per molecule: shape {list(spec.shape)}, "
            f"{spec.width} values); {_first_layer_expects(model)}; choose --features to match or change the model"
        ) from exc
    if out.ndim != 2 or out.shape[1] != task.n_outputs:
        what = (
            "one logit per class" if task.is_classification else "one value per target, in the target's units"
        )
        raise TorchImportError(
            f"the model outputs shape {list(out.shape[1:])} per molecule; task {task.name!r} ({task.kind}) needs "
            f"{task.n_outputs} ({what})"
        )
