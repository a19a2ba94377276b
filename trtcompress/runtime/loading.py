"""Load what the runtime serves: a native artifact (compressed model + resolved recipe) or a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trtcompress.checkpoints.native import MANIFEST


def is_artifact(path: Path | str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_for_runtime(path: Path | str) -> tuple[Any, Any, dict | None]:
    """(model, tokenizer, recipe dict or None). Artifacts are verified (checksums) before loading."""
    if is_artifact(path):
        from trtcompress.checkpoints.native import load_artifact

        loaded = load_artifact(path)
        return loaded.model, loaded.tokenizer, loaded.manifest.get("recipe")
    from trtcompress.models import load_model

    loaded = load_model(str(path), log=lambda m: None)
    return loaded.model, loaded.tokenizer, None
