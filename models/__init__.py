"""molcloak.models: Brevitas QAT network definitions and their registry."""

from .registry import MODELS, build_model, model_names

__all__ = ["MODELS", "build_model", "model_names"]
