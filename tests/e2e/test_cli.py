"""The real `trtcompress` command in a subprocess, on the tiny model: what a user sees."""

import json

import pytest

from tests.conftest import TINY_EVAL_FLAGS, run_cli


def _one_line_error(result, fragment):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "int4"
    result = run_cli(
        "build", str(tiny_model_dir), "--recipe", "int4-g128-rtn", "-o", str(out), "--json", *TINY_EVAL_FLAGS
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_build_json_has_the_stable_keys(built):
    out, data = built
    for key in (
        "model",
        "recipe",
        "ppl",
        "ppl_ref",
        "ppl_ratio",
        "gsm8k_kl",
        "gsm8k_top1",
        "gsm8k_bpb",
        "weight_bytes",
        "weight_bytes_ref",
        "bits_per_param",
        "artifact",
        "status",
    ):
        assert key in data, key
    assert (data["status"] == "ok" and data["artifact"] == str(out.resolve())) or data["artifact"] == str(out)
    assert data["weight_bytes"] < data["weight_bytes_ref"]


def test_eval_json_reproduces_the_build(built):
    out, data = built
    result = run_cli("eval", str(out), "--json", *TINY_EVAL_FLAGS)
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["ppl"] == pytest.approx(data["ppl"], rel=1e-6)
    assert again["gsm8k_kl"] == pytest.approx(data["gsm8k_kl"], rel=1e-5)


def test_inspect_prints_the_layer_table(built):
    out, _ = built
    result = run_cli("inspect", str(out))
    assert result.returncode == 0, result.stderr
    assert (
        "model.layers.1.mlp.down_proj" in result.stdout.replace("\n", "") or "int4_g128_sym" in result.stdout
    )
    assert "checksums verified" in result.stdout


def test_recipes_lists_presets_and_prints_yaml():
    listed = run_cli("recipes")
    assert listed.returncode == 0 and "int4-g128-rtn" in listed.stdout and "int8-rtn" in listed.stdout
    shown = run_cli("recipes", "int8-rtn")
    assert "method: gsq" in shown.stdout and "bits: 8" in shown.stdout


def test_build_and_eval_help_names_the_recipe_field_of_each_eval_flag():
    """`eval -q` had no help text, `--ppl-tokens` read "[recipe eval.ppl_tokens]" where every other flag
    names its field alone, and `--reference` named none (the README maps it to `eval.*`)."""
    from trtcompress.cli import build, eval_cmd

    fields = {"--ppl-tokens": "[eval.ppl_tokens]", "--reference": "[eval.reference]"}
    for command in (build, eval_cmd):
        options = {opt.opts[0]: opt for opt in command.params if opt.opts[0].startswith("-")}
        assert options["--quiet"].help, command.name
        for flag, field in fields.items():
            assert options[flag].help.endswith(" " + field), (command.name, flag, options[flag].help)


def test_unknown_recipe_key(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - method: gsq\n    bitz: 4\n")
    result = run_cli("build", str(tiny_model_dir), "--recipe", str(recipe), "-o", str(tmp_path / "o"))
    _one_line_error(result, "passes[0].bitz: unknown key (did you mean 'bits'?)")
    assert not (tmp_path / "o").exists()


def test_missing_model_dir(tmp_path):
    result = run_cli("build", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    _one_line_error(result, "no such model directory")


def test_truncated_safetensors(built, tmp_path):
    import shutil

    out, _ = built
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(run_cli("inspect", str(copy)), "truncated or modified")
    _one_line_error(run_cli("eval", str(copy)), "truncated or modified")
    # --no-verify skips the sha256 only: a truncated or missing file is still an error
    _one_line_error(run_cli("inspect", str(copy), "--no-verify"), "truncated or modified")
    weights.unlink()
    _one_line_error(run_cli("inspect", str(copy), "--no-verify"), "model.safetensors: missing artifact file")


def test_tampered_manifest(built, tmp_path):
    import shutil

    out, _ = built
    copy = shutil.copytree(out, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["recipe"]["passes"][0]["bits"] = 8
    (copy / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(run_cli("eval", str(copy)), "manifest was modified after the build")


def test_failed_gate_exits_3_and_keeps_the_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "gated"
    result = run_cli(
        "build",
        str(tiny_model_dir),
        "--recipe",
        "int3-g128-rtn",
        "-o",
        str(out),
        "--gate",
        "gsm8k_kl <= 0.000001",
        "--quiet",
        *TINY_EVAL_FLAGS,
    )
    assert result.returncode == 3
    assert "FAIL" in result.stdout
    assert "gate(s) failed: gsm8k_kl <= 1e-06" in result.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed_gates"


def test_cli_flags_land_in_the_saved_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "flags"
    result = run_cli(
        "build",
        str(tiny_model_dir),
        "--recipe",
        "int4-g128-rtn",
        "-o",
        str(out),
        "--bits",
        "3",
        "--group-size",
        "32",
        "--asymmetric",
        "--no-eval",
        "--name",
        "mine",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    assert recipe["name"] == "mine"
    assert recipe["passes"][0] | {"bits": 3, "group_size": 32, "symmetric": False} == recipe["passes"][0]
    assert recipe["eval"]["enabled"] is False


def test_an_nm_pattern_survives_overrides_and_the_manifest(tiny_model_dir, tmp_path):
    """A 1:4 recipe built with a CLI override (which dumps and re-validates the recipe) and then
    evaluated (which validates the manifest's recipe): the unset `sparsity` used to dump as 0.5 and
    contradict the pattern."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text('passes:\n  - method: magnitude\n    pattern: "1:4"\neval: {enabled: false}\n')
    out = tmp_path / "nm"
    result = run_cli("build", str(tiny_model_dir), "--recipe", str(recipe), "-o", str(out), "--name", "x")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "manifest.json").read_text())["recipe"]["passes"][0]["sparsity"] is None
    result = run_cli("eval", str(out), "--no-reference", "--json", *TINY_EVAL_FLAGS)
    assert result.returncode == 0, result.stderr


def test_an_invalid_target_regex_fails_the_recipe(tiny_model_dir, tmp_path):
    result = run_cli(
        "build",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "o"),
        "--no-eval",
        "--set",
        'passes.0.targets=["re:["]',
    )
    _one_line_error(result, "invalid regular expression 're:['")


@pytest.mark.parametrize("damage", ["missing", "nan", "shape"])
def test_a_damaged_checkpoint_is_refused_by_tensor(tiny_model_dir, tmp_path, damage):
    """A checkpoint lacking a tensor (which would load randomly initialised), holding NaN, or a tensor
    of the wrong shape: one error line naming the tensor, no artifact."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if damage == "missing":
        del tensors[name]
    elif damage == "nan":
        tensors["model.layers.0.input_layernorm.weight"][3] = float("nan")
        name = "model.layers.0.input_layernorm.weight"
    else:
        tensors[name] = tensors[name][:, :-8].contiguous()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("build", str(model), "-o", str(tmp_path / "o"), "--no-eval", "--quiet")
    _one_line_error(result, name)
    assert not (tmp_path / "o").exists()


def test_eval_output_dir_is_checked_before_evaluating(built, tmp_path):
    out, _ = built
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("eval", str(out), "--no-reference", "--output-dir", str(blocker), *TINY_EVAL_FLAGS)
    _one_line_error(result, "cannot create the directory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "passes.0.bits=3"], "eval cannot change passes.0.bits"),
        (["--set", "calibration.num_samples=4"], "eval cannot change calibration.num_samples"),
        (["--set", "dtype=bfloat16"], "eval cannot change dtype"),
        (["--recipe", "int8-rtn"], "--recipe applies to models only"),
        (["--set", "eval.nope=1"], "eval.nope: unknown key"),
    ],
)
def test_eval_of_an_artifact_refuses_build_settings_and_writes_nothing(built, tmp_path, args, fragment):
    """`eval ARTIFACT --set passes.0.bits=3` (or calibration, dtype) was accepted and ignored: the report
    looked like the measurement of a 3-bit build. A refused command created its --output-dir anyway."""
    out, _ = built
    result = run_cli("eval", str(out), *args, "--output-dir", str(tmp_path / "e" / "x"), *TINY_EVAL_FLAGS)
    _one_line_error(result, fragment)
    assert result.returncode == 2
    assert not (tmp_path / "e").exists()


def test_repo_refuses_a_tampered_artifact_and_a_path_as_model_name(built, tmp_path):
    import shutil

    out, _ = built
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    _one_line_error(run_cli("repo", str(copy), "-o", str(tmp_path / "r")), "model.safetensors")
    result = run_cli("repo", str(out), "-o", str(tmp_path / "r2"), "--deploy", "model_name=..")
    assert result.returncode == 2 and "names a directory" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # nothing written beside it


def test_inspect_and_repo_refuse_damaged_weights_behind_recomputed_checksums(built, tmp_path):
    """A truncated model.safetensors whose manifest records were recomputed passed `inspect` and `repo`
    (they load no weight); only `eval` refused it."""
    import hashlib
    import shutil

    from trtcompress.checkpoints.native import manifest_checksum

    out, _ = built
    copy = shutil.copytree(out, tmp_path / "copy")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"]["model.safetensors"] = {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "bytes": 1000,
    }
    manifest["checksum"] = manifest_checksum(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    fragment = "model.safetensors: unreadable safetensors file"
    _one_line_error(run_cli("inspect", str(copy)), fragment)
    _one_line_error(run_cli("repo", str(copy), "-o", str(tmp_path / "r"), "--kind", "native"), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no repository written


def test_force_replaces_artifacts_only(tiny_model_dir, tmp_path):
    """--force must not delete a directory that is not an artifact (a parent of artifacts, a model)."""
    keep = tmp_path / "keep"
    (keep / "sub").mkdir(parents=True)
    (keep / "sub" / "data").write_text("precious")
    result = run_cli("build", str(tiny_model_dir), "-o", str(keep), "--force", "--no-eval", "--quiet")
    _one_line_error(result, "is not an artifact")
    assert (keep / "sub" / "data").read_text() == "precious"


def test_json_output_stays_strict_json_when_a_metric_is_infinite(tiny_model_dir, tmp_path):
    """A model broken enough that its ppl overflows to inf: `--json` names the value ("Infinity")
    instead of printing Python's bare Infinity, which is not JSON (jq refuses the whole document)."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for path in broken.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: v * 1e6 if "embed_tokens" in k or "lm_head" in k else v for k, v in tensors.items()},
                  path, metadata={"format": "pt"})  # fmt: skip
    result = run_cli("eval", str(broken), "--json", *TINY_EVAL_FLAGS)
    assert result.returncode == 0, result.stderr

    def refuse(constant: str):
        raise AssertionError(f"non-JSON constant {constant} in --json output")

    data = json.loads(result.stdout, parse_constant=refuse)
    assert data["ppl"] == "Infinity"


def test_paths_and_names_are_printed_as_typed_not_as_rich_markup(tiny_model_dir, tmp_path):
    """Brackets in a model path, OUT or recipe name used to be read as rich markup: `[red]` vanished
    and a closing tag such as `[/v2]` raised MarkupError (a traceback after the artifact was written,
    and `inspect` could not show the artifact at all)."""
    import shutil

    def shown(text: str) -> str:  # the consoles wrap long lines (inside a path too): compare without blanks
        return "".join(text.split())

    model = tmp_path / "m[" / "x]"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "o[" / "v1]"
    name = "int4 [/v2] [red]x"
    result = run_cli("build", str(model), "-o", str(out), "--no-eval", "--name", name)
    assert result.returncode == 0, result.stderr
    assert shown(f"loading {model}") in shown(result.stderr)
    assert shown(f"artifact: {out}") in shown(result.stdout)
    result = run_cli("inspect", str(out))
    assert result.returncode == 0, result.stderr
    assert shown(f"{out} · recipe {name} ·") in shown(result.stdout)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--groups", "16,abc"], "--groups '16,abc': expected group sizes"),
        (["--groups", "100"], "group_size must be one of"),
        (["--bits", "9"], "--bits 9: Input should be less than or equal to 8"),
        (["--gsm8k-problems", "-1"], "--gsm8k-problems -1"),
        (["--groups", ",", "--no-int8"], "nothing to measure"),
        (["-o", "FILE"], "cannot create the directory"),
    ],
)
def test_bench_groupsize_refuses_bad_input_before_the_model_loads(tmp_path, args, fragment):
    """A bad --groups, --bits or --gsm8k-problems was a traceback (after the model loaded), an empty
    sweep printed an empty table, and an -o blocked by a file failed with a traceback after the sweep."""
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    # no such model: the input is refused before the model is looked up
    result = run_cli("bench", "groupsize", str(tmp_path / "no-model"), "-o", str(tmp_path / "o"), *args)
    _one_line_error(result, fragment)
    assert result.returncode == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--calib-samples", "4"], "--calib-samples: recipe 'int4-g128-rtn' has no calibrated pass"),
        (["-r", "baseline", "--calib-seq-len", "64"], "--calib-seq-len: recipe 'baseline' has no calibrated"),
        (["--tp-size", "2"], "--tp-size sets up the trtllm export"),
        (["--pp-size", "2", "--export", "hf"], "--pp-size sets up the trtllm export"),
    ],
)
def test_build_refuses_flags_the_recipe_has_no_use_for(tiny_model_dir, tmp_path, args, fragment):
    """`--calib-samples` on a data-free recipe and `--tp-size` without the trtllm export were accepted
    and silently had no effect (as `--bits` on a recipe without bits is refused)."""
    result = run_cli("build", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--no-eval", *args)
    _one_line_error(result, fragment)
    assert result.returncode == 2
    assert not (tmp_path / "o").exists()


def test_an_output_path_that_is_not_utf8_is_refused_before_the_build(tiny_model_dir, tmp_path):
    """`-o $'out\\xff'` built the whole model and then died in the tokenizer's save (a UnicodeEncodeError
    traceback: the Rust writers take UTF-8 paths; the byte arrives as a lone surrogate). `--name $'\\xff'`:
    test_recipe.py::test_text_that_utf8_cannot_encode_is_refused_with_its_path."""
    out = tmp_path / "out\udcff"
    result = run_cli("build", str(tiny_model_dir), "-o", str(out), "--no-eval")
    _one_line_error(result, "the output path is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []
