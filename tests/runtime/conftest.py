"""Runtime fixtures: native artifacts of the tiny model written the way `trtcompress build` writes them."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_artifact(
    model_dir: Path, out: Path, recipe_name: str = "baseline", calibration: dict | None = None
) -> Path:
    """`calibration`: fields of the recipe's calibration section to override (small samples: fast)."""
    from trtcompress.builders.compress import compress_model
    from trtcompress.checkpoints import native
    from trtcompress.models import load_model
    from trtcompress.recipe import load_recipe

    loaded = load_model(str(model_dir), log=lambda m: None)
    recipe = load_recipe(recipe_name)
    if calibration:
        recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update=calibration)})
    compress_model(loaded.model, loaded.tokenizer, recipe)
    with native.atomic_directory(out) as tmp:
        content = native.write_weights(loaded.model, loaded.tokenizer, tmp, 1 << 30)
        manifest = native.new_manifest(
            recipe=recipe.model_dump(mode="json"),
            source={"model": str(model_dir)},
            model_config=loaded.model.config.to_dict(),
            content=content,
        )
        native.write_manifest(tmp, manifest)
    return out


@pytest.fixture(scope="session")
def tiny_int4_artifact(tiny_loud_dir, tmp_path_factory) -> Path:
    return write_artifact(tiny_loud_dir, tmp_path_factory.mktemp("rt") / "int4", "int4-g64-rtn")
