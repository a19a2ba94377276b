"""Load what the runtime serves: a native artifact (compressed model + resolved recipe) or a model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtcompress.checkpoints.native import MANIFEST

if TYPE_CHECKING:
    from trtcompress.recipe import Recipe


def is_artifact(path: Path | str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_for_runtime(path: Path | str) -> tuple[Any, Any, Recipe | None]:
    """(model, tokenizer, recipe or None). Artifacts are verified (checksums) before loading, and
    their recorded recipe is read as `eval` reads it (a recipe this version refuses is named)."""
    if is_artifact(path):
        from trtcompress.checkpoints.native import load_artifact, read_manifest
        from trtcompress.recipe import recorded_recipe

        # the recipe first: a refusal must not come after minutes of hashing and loading a large model
        recipe, _ = recorded_recipe(read_manifest(Path(path))["recipe"], f"{path}/{MANIFEST}")
        loaded = load_artifact(path)
        return loaded.model, loaded.tokenizer, recipe
    from trtcompress.models import load_model

    loaded = load_model(str(path), log=lambda m: None)
    return loaded.model, loaded.tokenizer, None
