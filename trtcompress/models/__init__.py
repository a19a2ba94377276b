"""Model resolution (known names, local HF directories) and loading."""

from trtcompress.models.loading import LoadedModel, load_model, resolve_model, validate_model_dir
from trtcompress.models.registry import DEFAULT_MODEL, PACKAGED_MODELS

__all__ = [
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "LoadedModel",
    "load_model",
    "resolve_model",
    "validate_model_dir",
]
