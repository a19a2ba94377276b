"""Errors a user can act on.

Every error raised for bad input derives from `TrtcompressError`; the CLI prints its message on one
line and exits with `exit_code`, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line, at most `limit` characters: transformers puts the cause
    on the lines after a heading ("Class validation error for validator 'validate_architecture':\n
    ValueError: ..."), and lists every known model type in an unknown model_type's message."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TrtcompressError(Exception):
    """Base class: the message names the problem and, where possible, the fix."""

    exit_code = 2


class RecipeError(TrtcompressError):
    """A recipe (YAML, preset or CLI override) is invalid."""


class ModelError(TrtcompressError):
    """A model directory or model name cannot be resolved or loaded."""


class ArtifactError(TrtcompressError):
    """An artifact is missing, incomplete, corrupt or of an unsupported format version."""


class CalibrationError(TrtcompressError):
    """Calibration data is unusable (too short, non-finite activations...)."""


class CompressionError(TrtcompressError):
    """A pass cannot compress a layer (non-finite weights, unsupported shape...)."""


class MissingDependencyError(TrtcompressError):
    """An optional dependency is not installed; the message says what to install."""


class GateFailure(TrtcompressError):
    """A build finished but one or more quality gates failed."""

    exit_code = 3
