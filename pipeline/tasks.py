"""What a model predicts: the kind of task, its target(s), class labels and units (`TaskSpec`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["binary", "multiclass", "regression", "multilabel", "multitarget"]
MULTITASK_KINDS = ("multilabel", "multitarget")
MULTILABEL_LABELS = ("0", "1")  # per-task classes of a multi-label task: 0 negative, 1 positive


@dataclass(frozen=True)
class TaskSpec:
    """What the model predicts: the kind of task, its target(s) and class labels.

    Multi-task kinds predict several targets at once, one output per task: "multilabel" (one
    binary label per task, sigmoid per output, Tox21-style) and "multitarget" (one regression
    value per task). Their targets may be missing (NaN) per molecule; `tasks` names the target
    columns (`target` is them joined by ",") and `task_units` gives each task's units.
    """

    name: str
    kind: TaskKind
    target: str
    labels: tuple[str, ...] = ()  # class names, index = class id; empty for regression
    units: str = ""  # regression units shown to users (e.g. "logS")
    tasks: tuple[str, ...] = ()  # multi-task: one name per output
    task_units: tuple[str, ...] = ()  # multitarget: units per task

    @property
    def is_classification(self) -> bool:
        return self.kind in ("binary", "multiclass", "multilabel")

    @property
    def is_multitask(self) -> bool:
        return self.kind in MULTITASK_KINDS

    @property
    def n_outputs(self) -> int:
        if self.is_multitask:
            return len(self.tasks)
        return len(self.labels) if self.is_classification else 1

    def unit_of(self, i: int) -> str:
        return self.task_units[i] if i < len(self.task_units) else ""

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "labels": list(self.labels),
            "tasks": list(self.tasks),
            "task_units": list(self.task_units),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        return cls(**{**d, **{k: tuple(d.get(k, ())) for k in ("labels", "tasks", "task_units")}})
