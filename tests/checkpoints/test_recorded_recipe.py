"""Every command that acts on an artifact reads its recorded recipe as `eval` does: a recipe this
version refuses (an older build's, or an edited manifest with a recomputed checksum) is one named error
from `inspect`, `repo` and the runtime, not a pydantic traceback or a repository the server then fails on."""

import pytest

from tests.checkpoints.conftest import edited_copy
from tests.conftest import run_cli
from trtcompress.checkpoints.inspect import inspect_artifact
from trtcompress.errors import RecipeError
from trtcompress.runtime.loading import load_for_runtime
from trtcompress.triton_models.native import deploy_from_artifact
from trtcompress.ui import UI


def test_a_valid_recorded_recipe_reaches_repo_and_runtime(small_artifact):
    assert deploy_from_artifact(small_artifact).max_batch_size == 3
    _, _, recipe = load_for_runtime(small_artifact)
    assert recipe.kv_cache.codec == "kivi-4bit" and recipe.deploy.max_batch_size == 3
    inspect_artifact(small_artifact, verify=True, as_json=True, ui=UI(quiet=True))


EDITS = {
    "deploy out of range": (lambda r: r["deploy"].update(max_batch_size=-1), "deploy.max_batch_size"),
    "deploy not a mapping": (lambda r: r.update(deploy="x"), "deploy"),
    "unknown KV codec": (lambda r: r["kv_cache"].update(codec="gear-9bit"), "unknown KV codec 'gear-9bit'"),
    "unknown key": (lambda r: r.update(bogus=1), "bogus: unknown key"),
}


@pytest.mark.parametrize("edit, named", EDITS.values(), ids=list(EDITS))
def test_a_recorded_recipe_this_version_refuses_is_named_everywhere(small_artifact, tmp_path, edit, named):
    artifact = edited_copy(small_artifact, tmp_path, lambda m: edit(m["recipe"]))
    for action in (
        lambda: inspect_artifact(artifact, verify=True, as_json=False, ui=UI(quiet=True)),
        lambda: deploy_from_artifact(artifact),
        lambda: load_for_runtime(artifact),
    ):
        with pytest.raises(RecipeError, match="recorded at build time") as info:
            action()
        assert str(info.value).startswith(f"{artifact}/manifest.json: ") and named in str(info.value)


def test_inspect_shows_the_artifact_before_refusing_its_recipe(small_artifact, tmp_path, capsys):
    """inspect is where a user looks into an artifact that eval / repo / serve refuse: it prints what it
    holds, then names the recipe problem (exit status 2)."""

    def unreadable(manifest):
        del manifest["recipe"]["name"]  # (the title reads it: "?")
        manifest["recipe"]["x"] = 1

    artifact = edited_copy(small_artifact, tmp_path, unreadable)
    with pytest.raises(RecipeError, match="x: unknown key"):
        inspect_artifact(artifact, verify=False, as_json=False, ui=UI())
    assert "compressed layers" in capsys.readouterr().out


def test_repo_names_the_recorded_recipe_in_one_line(small_artifact, tmp_path):
    artifact = edited_copy(small_artifact, tmp_path, lambda m: EDITS["unknown KV codec"][0](m["recipe"]))
    out = run_cli("repo", str(artifact), "-o", str(tmp_path / "repo"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "kv_cache.codec: unknown KV codec" in out.stderr
    assert not (tmp_path / "repo").exists()
