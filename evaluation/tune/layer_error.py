"""Per-layer error between the float, quantized and FHE (simulated) forward passes of one model.

For each layer boundary of the MLP (after every hidden layer's activation quantizer, and the
output), the prefix of the network up to that point is compiled on its own with the same
compile settings, then run three ways on the test features:
- float: the Brevitas QAT model in PyTorch (float arithmetic, fake quantization);
- quantized: Concrete ML's integer forward pass in the clear (`fhe="disable"`);
- FHE: Concrete's FHE simulation (`fhe="simulate"`), which includes the errors `p_error` allows.
Errors are absolute differences in the layer's real-valued units, max and mean over all
molecules and neurons, plus how many values differ between quantized and FHE.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from molcloak.pipeline.bundle import Checkpoint
from molcloak.pipeline.compile import CompileConfig, compile_model


class _Prefix(nn.Module):
    """The first `k` modules of the MLP's `net`; a trailing Brevitas QuantTensor is unwrapped."""

    def __init__(self, net: nn.Sequential, k: int):
        super().__init__()
        self.body = net[:k]

    def forward(self, x):
        y = self.body(x)
        return y.value if hasattr(y, "value") else y


def boundaries(net: nn.Sequential) -> list[tuple[str, int]]:
    """(name, prefix length): after each activation quantizer that follows a hidden layer, and the whole net."""
    out, hidden = [], 0
    for k, module in enumerate(net):
        if isinstance(module, nn.ReLU):
            hidden += 1
            # the next QuantIdentity quantizes this layer's activations
            q = next((j for j in range(k + 1, len(net)) if type(net[j]).__name__ == "QuantIdentity"), None)
            if q is not None:
                out.append((f"hidden {hidden}", q + 1))
    out.append(("output", len(net)))
    return out


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"max": float(d.max()) if d.size else 0.0, "mean": float(d.mean()) if d.size else 0.0}


def layer_errors(ckpt: Checkpoint, config: CompileConfig, n: int | None = None) -> list[dict]:
    """Rows per layer boundary: max/mean |float - quantized|, |quantized - FHE|, |float - FHE| and the
    share of values where FHE differs from the quantized clear computation."""
    model = ckpt.build_model()
    net = getattr(model, "net", None)
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"per-layer errors need a model with a Sequential `net`, got {type(model).__name__}")
    X = ckpt.X_test if n is None else ckpt.X_test[:n]
    rows = []
    for name, k in boundaries(net):
        prefix = _Prefix(net, k).eval()
        with torch.no_grad():
            flt = prefix(torch.as_tensor(X, dtype=torch.float32)).numpy()
        q_module, stats = compile_model(prefix, ckpt.X_calib, config, measure_keys=False)
        quant = q_module.forward(X, fhe="disable")
        fhe = q_module.forward(X, fhe="simulate")
        rows.append(
            {
                "layer": name,
                "values": int(np.prod(flt.shape)),
                "pbs": stats.pbs_count,
                "max_bits": stats.max_bit_width,
                "float_vs_quantized": _stats(flt, quant),
                "quantized_vs_fhe": _stats(quant, fhe),
                "float_vs_fhe": _stats(flt, fhe),
                "fhe_differs_share": float(np.mean(~np.isclose(quant, fhe))),
            }
        )
    return rows
