"""Seeded quantization-aware training with a validation split and early stopping."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import ModelConfigError
from .metrics import TargetScaler, score, to_predictions
from .tasks import TaskSpec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 50  # epochs without validation-loss improvement before stopping
    # the patience in optimizer steps as well (None: in epochs only): on large data an epoch is many steps, and
    # the validation loss settles in fewer epochs (ames, 4,600 training molecules: best epoch 2 of 32 run)
    patience_steps: int | None = None
    seed: int = 0
    teacher: str | None = None  # "rf": also learn a plaintext teacher's out-of-bag outputs (teacher.py)
    distill: float = 0.5  # with a teacher: the weight of its outputs in the loss (the labels get 1 - distill)
    # a network with no hidden layer is fitted by a convex solver (`linear_fit`) with this L2 penalty on its
    # weights; None: chosen on the validation rows (a refit without them passes the search's choice)
    l2: float | None = None

    def __post_init__(self):
        if not 0 <= self.distill < 1:
            raise ModelConfigError(
                f"distill weight {self.distill} out of range; use 0 <= distill < 1 (e.g. 0.5)"
            )
        if self.l2 is not None and not self.l2 > 0:
            raise ModelConfigError(
                f"L2 penalty {self.l2} out of range; use a positive number (e.g. 0.1) or None"
            )
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.patience < 1:
            raise ModelConfigError(
                f"invalid training options {asdict(self)}; need epochs >= 1, batch_size >= 2, lr > 0, patience >= 1"
            )

        if self.patience_steps is not None and self.patience_steps < 1:
            raise ModelConfigError(
                f"--patience-steps {self.patience_steps}: use a positive count of optimizer steps, or leave it out"
            )

    def effective_patience(self, n_train: int) -> int:
        """Epochs without improvement before stopping: `patience`, or, with `patience_steps`, as many epochs as
        hold that many optimizer steps on `n_train` molecules when that is fewer (but at least MIN_PATIENCE)."""
        if self.patience_steps is None:
            return self.patience
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        by_steps = max(MIN_PATIENCE, math.ceil(self.patience_steps / steps_per_epoch))
        return min(self.patience, by_steps)

    def to_dict(self) -> dict:
        return asdict(self)


MIN_PATIENCE = 5  # epochs: the fewest `patience_steps` leaves


@dataclass
class TrainResult:
    model: nn.Module  # weights of the best validation epoch, in eval mode
    scaler: TargetScaler | None
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


EpochCallback = Callable[[int, int, dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled mini-batches; a final batch of one is merged into the previous (BatchNorm needs >= 2)."""
    perm = rng.permutation(n)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < 2:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out


class MaskedLoss(nn.Module):
    """Multi-task loss over the labels present: NaN targets (missing labels) are left out."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        have = ~torch.isnan(target)
        if not bool(have.any()):
            return out.sum() * 0.0  # a batch without any label: no gradient
        return self.loss(out[have], target[have])


def make_loss(task: TaskSpec) -> nn.Module:
    """Cross-entropy (classes), MSE (standardized values), masked BCE / MSE per task (multi-task)."""
    if task.kind == "multilabel":
        return MaskedLoss(nn.BCEWithLogitsLoss())
    if task.kind == "multitarget":
        return MaskedLoss(nn.MSELoss())
    return nn.MSELoss() if task.kind == "regression" else nn.CrossEntropyLoss()


def target_tensor(task: TaskSpec, y: np.ndarray, scaler: TargetScaler | None) -> torch.Tensor:
    if task.kind in ("binary", "multiclass"):
        return torch.as_tensor(y, dtype=torch.long)
    t = torch.as_tensor(y if scaler is None else scaler.transform(y), dtype=torch.float32)
    return t.unsqueeze(1) if task.kind == "regression" else t


def _check_task_labels(task: TaskSpec, y_train: np.ndarray) -> None:
    if not task.is_multitask:
        return
    counts = (~np.isnan(y_train)).sum(axis=0)
    empty = [name for name, c in zip(task.tasks, counts) if c == 0]
    if empty:
        raise ModelConfigError(
            f"task {empty[0]!r} has no label in the training split ({len(y_train)} rows); "
            "add labelled rows for it, drop the column, or change --seed / --split"
        )


def _soft_target(task: TaskSpec, soft: np.ndarray, scaler: TargetScaler | None) -> torch.Tensor:
    """A teacher's outputs in the space of the network's raw outputs' targets."""
    if task.kind in ("regression", "multitarget"):
        soft = scaler.transform(soft) if scaler is not None else soft
        t = torch.as_tensor(soft, dtype=torch.float32)
        return t.unsqueeze(1) if task.kind == "regression" else t
    return torch.as_tensor(soft, dtype=torch.float32)  # probabilities


def _soft_loss(task: TaskSpec, out: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's class probabilities, BCE per task, or squared error to its values."""
    if task.kind in ("binary", "multiclass"):
        return -(soft * torch.log_softmax(out, dim=1)).sum(dim=1).mean()
    if task.kind == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(out, soft)
    return nn.functional.mse_loss(out, soft)


@dataclass
class Objective:
    """The training loss of a batch: the labels' loss, mixed with a teacher's (`distill`) when `soft` is given."""

    task: TaskSpec
    loss_fn: nn.Module
    distill: float
    soft: torch.Tensor | None = None

    def __call__(self, out: torch.Tensor, target: torch.Tensor, idx=None) -> torch.Tensor:
        loss = self.loss_fn(out, target)
        if self.soft is None:
            return loss
        soft = self.soft if idx is None else self.soft[idx]
        return (1 - self.distill) * loss + self.distill * _soft_loss(self.task, out, soft)


def predict_raw(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Raw outputs (logits or standardized values) of the float/QAT torch model."""
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(X, dtype=torch.float32)).detach().numpy().astype(np.float64)


def train_model(
    model: nn.Module,
    task: TaskSpec,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_valid: np.ndarray,
    y_valid: np.ndarray,
    config: TrainConfig = TrainConfig(),
    on_epoch: EpochCallback | None = None,
    soft_train: np.ndarray | None = None,
) -> TrainResult:
    """Train `model` in place and return it with the best validation epoch's weights restored.

    `soft_train`: a teacher's outputs on the training rows (`teacher.teacher_outputs`: probabilities
    or values in task units); the loss is then (1 - distill) x label loss + distill x teacher loss.
    Early stopping always watches the label loss on the validation rows. A network with no hidden layer (a linear
    model: `linear_fit.is_linear`) is fitted by a convex solver instead, with an L2 penalty chosen on the
    validation rows; its `best_epoch` is the chosen penalty's place in `linear_fit.L2_GRID`."""
    from .linear_fit import fit_linear, is_linear

    if len(X_train) < 2:
        raise ModelConfigError(f"need at least 2 training molecules, got {len(X_train)}")
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    _check_task_labels(task, y_train)
    scaler = TargetScaler.fit(y_train) if task.kind in ("regression", "multitarget") else None
    loss_fn = make_loss(task)
    yt, yv = target_tensor(task, y_train, scaler), target_tensor(task, y_valid, scaler)
    soft = None if soft_train is None or not config.distill else _soft_target(task, soft_train, scaler)
    Xt = torch.as_tensor(X_train, dtype=torch.float32)
    Xv = torch.as_tensor(X_valid, dtype=torch.float32)
    objective = Objective(task, loss_fn, config.distill, soft)
    has_valid = len(X_valid) >= 2

    def validate(m: nn.Module) -> dict:  # the validation rows' label loss and metrics (none without rows)
        if not has_valid:
            return {}
        m.eval()
        with torch.no_grad():
            out = m(Xv)
        preds = to_predictions(task, out.numpy(), scaler)
        return {"valid_loss": float(loss_fn(out, yv))} | {
            f"valid_{k}": v for k, v in score(task, y_valid, preds).items()
        }

    if is_linear(model):
        best, history = fit_linear(model, objective, Xt, yt, validate, config.l2, on_epoch)
        return TrainResult(model, scaler, best, len(history), history)
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history: list[dict] = []
    epoch, patience = 0, config.effective_patience(len(Xt))
    for epoch in range(1, config.epochs + 1):
        model.train()
        total = 0.0
        for idx in batches(len(Xt), config.batch_size, rng):
            optim.zero_grad()
            loss = objective(model(Xt[idx]), yt[idx], idx)
            loss.backward()
            optim.step()
            total += float(loss) * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(Xt), **validate(model)}
        history.append(row)
        if on_epoch:
            on_epoch(epoch, config.epochs, row)
        monitor = row.get("valid_loss", row["train_loss"])
        if monitor < best[0]:
            best = (monitor, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, scaler, best[1], epoch, history)
