"""Instruct models: short names, GGUF import, cached bf16 checkpoints."""

from quantsafe.models.loading import ResolvedModel, load_model, resolve_model
from quantsafe.models.registry import DEFAULT_MODEL, KNOWN_MODELS, ModelSpec

__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "ModelSpec", "ResolvedModel", "load_model", "resolve_model"]
