"""Every command that acts on an artifact reads its recorded recipe as `eval` does: a recipe this
version refuses (an older build's, or an edited manifest with a recomputed checksum) is one named error
from `inspect`, `repo` and the runtime, not a pydantic traceback or a repository the server then fails on."""

import json

import pytest

from tests.conftest import run_cli
from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints import native
from trtcompress.checkpoints.inspect import inspect_artifact
from trtcompress.errors import RecipeError
from trtcompress.recipe import load_recipe, with_overrides
from trtcompress.runtime.loading import load_for_runtime
from trtcompress.triton_models.native import deploy_from_artifact
from trtcompress.ui import UI


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    recipe = with_overrides(
        load_recipe("int4-g64-rtn"), [("deploy.max_batch_size", 3), ("kv_cache.codec", "kivi-4bit")]
    )
    compress_model(loaded.model, loaded.tokenizer, recipe)
    out = tmp_path_factory.mktemp("recorded") / "art"
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


def _edited(artifact, tmp_path, edit):
    """A copy of the artifact whose recorded recipe `edit` changed, the manifest's checksum recomputed."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / native.MANIFEST).read_text(encoding="utf-8"))
    edit(manifest["recipe"])
    manifest["checksum"] = native.manifest_checksum(manifest)
    (copy / native.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return copy


def test_a_valid_recorded_recipe_reaches_repo_and_runtime(recorded):
    assert deploy_from_artifact(recorded).max_batch_size == 3
    _, _, recipe = load_for_runtime(recorded)
    assert recipe["kv_cache"]["codec"] == "kivi-4bit" and recipe["deploy"]["max_batch_size"] == 3
    inspect_artifact(recorded, verify=True, as_json=True, ui=UI(quiet=True))


EDITS = {
    "deploy out of range": (lambda r: r["deploy"].update(max_batch_size=-1), "deploy.max_batch_size"),
    "deploy not a mapping": (lambda r: r.update(deploy="x"), "deploy"),
    "unknown KV codec": (lambda r: r["kv_cache"].update(codec="gear-9bit"), "unknown KV codec 'gear-9bit'"),
    "unknown key": (lambda r: r.update(bogus=1), "bogus: unknown key"),
}


@pytest.mark.parametrize("edit, named", EDITS.values(), ids=list(EDITS))
def test_a_recorded_recipe_this_version_refuses_is_named_everywhere(recorded, tmp_path, edit, named):
    artifact = _edited(recorded, tmp_path, edit)
    for action in (
        lambda: inspect_artifact(artifact, verify=True, as_json=False, ui=UI(quiet=True)),
        lambda: deploy_from_artifact(artifact),
        lambda: load_for_runtime(artifact),
    ):
        with pytest.raises(RecipeError, match="recorded at build time") as info:
            action()
        assert str(info.value).startswith(f"{artifact}/manifest.json: ") and named in str(info.value)


def test_repo_names_the_recorded_recipe_in_one_line(recorded, tmp_path):
    artifact = _edited(recorded, tmp_path, EDITS["unknown KV codec"][0])
    out = run_cli("repo", str(artifact), "-o", str(tmp_path / "repo"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "kv_cache.codec: unknown KV codec" in out.stderr
    assert not (tmp_path / "repo").exists()
