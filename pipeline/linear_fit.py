"""A network with no hidden layer (`--hidden 0`, a kernel machine on random features) fitted by a convex solver.

Its loss is convex in its weights, so it has one best fit for each L2 penalty, and a solver finds it. Trained like
the hidden-layer networks instead (Adam on mini-batches, early stopping on the validation loss), it stopped after
1 to 5 epochs on 1,024 minhash features of bace, at 0.75-0.81 test ROC-AUC, where logistic regression on the same
features reached about 0.84 (evaluation/PERFORMANCE.md, session 22).

The fit, in `fit_linear`:
1. the input quantizer's scale is collected on the training rows, in training-mode passes that change no weight
   (Brevitas collects statistics for its first `collect_stats_steps` passes; evaluation uses what it collected);
2. for each penalty in `L2_GRID`, largest first, each fit starting from the last one, L-BFGS minimizes the training
   objective (`train.Objective`: the task's loss, with the teacher's outputs when distilling) plus
   l2 / 2 x |W|² over the full training set, on the quantized inputs the circuit will see;
3. the penalty whose quantized model (weights rounded to their bits) has the lowest validation label loss is kept,
   or the given one (`TrainConfig.l2`: a refit on all the molecules, with no validation rows, reuses the search's);
   with neither, `DEFAULT_L2`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# penalties tried, as l2 / 2 x |W|² added to the mean loss, about threefold apart; features in [-1, 1] (rff, minhash)
# want strong ones: logistic regression chose C = 0.003 on herg's inner validation part (about l2 = 1 for 420
# molecules). Large data wants weak ones: on tox21 (about 5,000 training molecules) 0.003 had the lowest validation
# loss and tested 0.006-0.011 ROC-AUC above 0.01 on seed 0, where the grid once stepped from 0.01 to 0.001 (session 33)
L2_GRID = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
DEFAULT_L2 = 1.0  # kept when there are no validation rows to choose on (and no penalty is given)
LBFGS_STEPS = 100
CALIBRATION_PASSES = 64  # input-quantizer statistics; fewer than Brevitas' 300 collection steps


def is_linear(model: nn.Module) -> bool:
    """Whether `model` is a QuantMLP with no hidden layer: an input quantizer, then one quantized linear layer."""
    from molcloak.models.mlp import QuantMLP

    return isinstance(model, QuantMLP) and not model.config.hidden


def fit_linear(
    model: nn.Module,
    objective: Callable,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    validate: Callable[[nn.Module], dict],
    l2: float | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> tuple[int, list[dict]]:
    """Fit `model` (`is_linear`) in place and return (the kept penalty's 1-based place in the history, the history:
    one row per penalty tried, with the quantized model's training loss (without the penalty) and `validate(model)`'s
    validation loss and metrics).
    `on_step(i, n, row)` after each penalty (a progress bar's epochs)."""
    quantize, layer = model.net[0], model.net[1]
    _calibrate(quantize, Xt)
    with torch.no_grad():
        Xq = _dequantized(quantize(Xt))
    weight = torch.zeros_like(layer.weight, requires_grad=True)
    bias = torch.zeros_like(layer.bias, requires_grad=True)
    history, fits = [], []
    choose = l2 is None and bool(validate(model))  # validation rows to choose on
    penalties = L2_GRID if choose else (DEFAULT_L2 if l2 is None else l2,)
    for i, penalty in enumerate(penalties, 1):
        _solve(objective, Xq, yt, weight, bias, penalty)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            train_loss = float(objective(model.eval()(Xt), yt))
        history.append({"epoch": i, "l2": penalty, "train_loss": train_loss, **validate(model)})
        fits.append((weight.detach().clone(), bias.detach().clone()))
        if on_step:
            on_step(i, len(penalties), history[-1])
    best = min(range(len(history)), key=lambda j: history[j]["valid_loss"]) if choose else 0
    with torch.no_grad():
        layer.weight.copy_(fits[best][0])
        layer.bias.copy_(fits[best][1])
    model.eval()
    return best + 1, history


def _calibrate(quantize: nn.Module, Xt: torch.Tensor) -> None:
    """The input quantizer's statistics, collected on batches of the training rows (training mode, no gradient)."""
    quantize.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(CALIBRATION_PASSES):
            quantize(Xt[torch.randperm(len(Xt), generator=generator)[:256]])
    quantize.eval()


def _dequantized(x) -> torch.Tensor:
    """A Brevitas QuantTensor's values (what the next layer multiplies), or a plain tensor as it is."""
    return x.value if hasattr(x, "value") else x


def _solve(objective: Callable, X: torch.Tensor, y: torch.Tensor, weight, bias, penalty: float) -> None:
    """L-BFGS on the full batch: objective(X W^T + b, y) + penalty / 2 x |W|², from the current W and b."""
    optim = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=LBFGS_STEPS, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optim.zero_grad()
        loss = objective(X @ weight.T + bias, y) + 0.5 * penalty * (weight**2).sum()
        loss.backward()
        return loss

    optim.step(closure)
