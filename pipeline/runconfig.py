"""One run configuration: what to train and how to compile it.

`molcloak tune --write-config FILE` writes it, `molcloak train --config FILE` reads it, and the
checkpoint records its compile settings so that `molcloak deploy` compiles the model the way it
was tuned. Values given on the command line override the file (`RunConfig.override`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compile import CompileConfig
from .errors import ConfigError
from .train import TrainConfig

CONFIG_FORMAT = 1
DEFAULT_FEATURES = (
    "physchem:scale=quantile"  # 10 descriptors, each mapped to [-1, 1] by training quantiles (PERFORMANCE.md)
)
DEFAULT_MODEL = "mlp"


def int_list(text: str, flag: str) -> list[int]:
    """`text` ("32,16") as integers; a `ConfigError` naming `flag` and the value otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers; write e.g. 3,4")
    return values


def p_error_list(text: str, flag: str = "--p-error") -> list[float | None]:
    """`text` ("0.05,1e-6,default") as error probabilities per PBS, "default" meaning Concrete's 2^-40 (None);
    a `ConfigError` naming `flag` and the word otherwise."""
    values: list[float | None] = []
    for word in (w.strip() for w in text.split(",") if w.strip()):
        try:
            value = None if word == "default" else float(word)
        except ValueError:
            value = -1.0
        if value is not None and not 0 < value < 1:
            raise ConfigError(
                f"{flag} {word!r} is neither a probability in (0, 1) nor 'default'; write e.g. 0.05,1e-6"
            )
        values.append(value)
    if not values:
        raise ConfigError(f"{flag} needs at least one value, e.g. 0.05")
    return list(dict.fromkeys(values))  # 0.05,5e-2: one value, tried once


@dataclass(frozen=True)
class RunConfig:
    """`features` None means the model's default (physchem for the MLPs, a 32x32 grid for the CNNs);
    `model_options` left out take the model's defaults (see `molcloak models`)."""

    features: str | None = None
    model: str = DEFAULT_MODEL
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    compile: CompileConfig = CompileConfig()
    dataset: str | None = None  # what it was tuned on (information only)
    tuned: dict | None = None  # the tune result that chose it (information only)

    def override(
        self,
        features: str | None = None,
        model: str | None = None,
        model_options: dict | None = None,
        train: dict | None = None,
        compile: dict | None = None,
    ) -> RunConfig:
        """A copy with the given values replacing the file's (options and settings merged key by key)."""
        return dataclasses.replace(
            self,
            features=features if features is not None else self.features,
            model=model if model is not None else self.model,
            model_options={**self.model_options, **(model_options or {})},
            train=dataclasses.replace(self.train, **(train or {})),
            compile=dataclasses.replace(self.compile, **(compile or {})),
        )

    def to_dict(self) -> dict:
        return {
            "molcloak_config": CONFIG_FORMAT,
            "dataset": self.dataset,
            "features": self.features,
            "model": self.model,
            "model_options": self.model_options,
            "train": self.train.to_dict(),
            "compile": self.compile.to_dict(),
            "tuned": self.tuned,
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "configuration") -> RunConfig:
        if not isinstance(d, dict) or not isinstance(d.get("model_options"), dict):
            raise ConfigError(
                f"{source} is not a molcloak configuration (JSON with 'model_options'); "
                "write one with `molcloak tune --write-config FILE`"
            )
        train_fields = set(TrainConfig.__dataclass_fields__)
        compile_fields = set(CompileConfig.__dataclass_fields__)
        try:
            return cls(
                features=d.get("features"),
                model=d.get("model") or DEFAULT_MODEL,
                model_options=dict(d["model_options"]),
                train=TrainConfig(**{k: v for k, v in (d.get("train") or {}).items() if k in train_fields}),
                compile=CompileConfig(
                    **{k: v for k, v in (d.get("compile") or {}).items() if k in compile_fields}
                ),
                dataset=d.get("dataset"),
                tuned=d.get("tuned"),
            )
        except TypeError as exc:
            raise ConfigError(
                f"{source} has a setting of the wrong type ({exc}); rewrite it with `molcloak tune --write-config`"
            ) from exc

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"--config {str(path)!r} is not a molcloak configuration (JSON with 'model_options'); "
                "write one with `molcloak tune --write-config FILE`"
            ) from None
        return cls.from_dict(data, f"--config {str(path)!r}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def parse_model_options(items: list[str]) -> dict:
    """`["channels=8,16", "batchnorm=false"]` (the CLI's `--set`) -> {"channels": [8, 16], "batchnorm": False}."""
    options: dict = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set channels=8,16")
        values = [_scalar(w.strip()) for w in val.split(",")]
        options[key.strip()] = values if "," in val else values[0]
    return options


def _scalar(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
