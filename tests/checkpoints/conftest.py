"""Fixtures of the checkpoint tests."""

import json
import shutil

import pytest

from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints import native
from trtcompress.recipe import load_recipe, with_overrides


@pytest.fixture(scope="session")
def small_artifact(tiny_model_dir, tmp_path_factory):
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    recipe = with_overrides(
        load_recipe("int4-g64-rtn"), [("deploy.max_batch_size", 3), ("kv_cache.codec", "kivi-4bit")]
    )
    compress_model(loaded.model, loaded.tokenizer, recipe)
    out = tmp_path_factory.mktemp("small-artifact") / "art"
    with native.atomic_directory(out) as tmp:
        content = native.write_weights(loaded.model, loaded.tokenizer, tmp, 1 << 30)
        manifest = native.new_manifest(
            recipe=recipe.model_dump(mode="json"),
            source={"model": "tiny"},
            model_config=loaded.model.config.to_dict(),
            content=content,
        )
        native.write_manifest(tmp, manifest)
    return out


def edited_copy(artifact, tmp_path, edit):
    """A copy of the artifact whose manifest `edit` changed, its checksum recomputed (what an older
    build or a hand edit leaves: the checksum passes, the content is what the reader must judge)."""
    copy = tmp_path / "edited"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / native.MANIFEST).read_text(encoding="utf-8"))
    edit(manifest)
    manifest["checksum"] = native.manifest_checksum(manifest)
    (copy / native.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return copy
