import pytest
import yaml

from trtcompress.errors import RecipeError
from trtcompress.recipe import (
    CLI_FLAG_PATHS,
    Recipe,
    list_presets,
    load_recipe,
    parse_assignment,
    parse_recipe,
    with_overrides,
)


def test_required_presets_exist_and_validate():
    presets = list_presets()
    assert {"int8-rtn", "int4-g128-rtn", "baseline"} <= set(presets)
    int4 = presets["int4-g128-rtn"].passes[0]
    assert (int4.method, int4.bits, int4.group_size, int4.symmetric) == ("gsq", 4, 128, True)
    int8 = presets["int8-rtn"].passes[0]
    assert (int8.bits, int8.group_size) == (8, 0)


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_presets_round_trip_through_yaml(name):
    recipe = load_recipe(name)
    assert parse_recipe(yaml.safe_load(recipe.to_yaml()), "round trip") == recipe


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"passes": [{"method": "gsq", "group_sise": 64}]}, "my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: passes[0].group_sise: unknown key")
    assert "did you mean 'group_size'" in message
    assert "allowed keys: bits, exclude, group_size, method, symmetric, targets" in message
    assert "\n" not in message


def test_unknown_top_level_and_nested_keys():
    with pytest.raises(RecipeError, match=r"evall: unknown key \(did you mean 'eval'\?\)"):
        parse_recipe({"evall": {}}, "r")
    with pytest.raises(RecipeError, match=r"eval\.ppl_token: unknown key"):
        parse_recipe({"eval": {"ppl_token": 3}}, "r")


def test_unknown_pass_method():
    with pytest.raises(
        RecipeError, match=r"passes\[0\]\.method 'gsqq' is not a known pass \(did you mean 'gsq'"
    ):
        parse_recipe({"passes": [{"method": "gsqq"}]}, "r")
    with pytest.raises(RecipeError, match="has no 'method'"):
        parse_recipe({"passes": [{"bits": 4}]}, "r")


def test_bad_values_and_shapes():
    with pytest.raises(RecipeError, match=r"passes\[0\]\.bits"):
        parse_recipe({"passes": [{"method": "gsq", "bits": 12}]}, "r")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        parse_recipe(["not", "a", "mapping"], "r")
    with pytest.raises(RecipeError, match="ppl_tokens"):
        parse_recipe({"eval": {"ppl_tokens": 100, "context": 1024}}, "r")


def test_gates_parse_and_reject_typos():
    recipe = parse_recipe({"gates": ["ppl_ratio <= 1.05", "gsm8k_top1>=0.9"]}, "r")
    assert [str(g) for g in recipe.gates] == ["ppl_ratio <= 1.05", "gsm8k_top1 >= 0.9"]
    with pytest.raises(RecipeError, match="did you mean 'ppl_ratio'"):
        parse_recipe({"gates": ["ppl_ration <= 1"]}, "r")
    with pytest.raises(RecipeError, match="not of the form"):
        parse_recipe({"gates": ["ppl_ratio => 1"]}, "r")


def test_load_recipe_file_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\npasses:\n  - method: gsq\n    bits: 3\n")
    assert load_recipe(str(path)).passes[0].bits == 3
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="did you mean 'int4-g128-rtn'"):
        load_recipe("int4-g128-rt")


def test_overrides_reach_every_pass_and_revalidate():
    recipe = load_recipe("int4-g128-rtn")
    out = with_overrides(recipe, [("passes.*.group_size", 64), ("eval.gsm8k_problems", 8)])
    assert out.passes[0].group_size == 64
    assert out.eval.gsm8k_problems == 8
    with pytest.raises(RecipeError, match="group_size must be one of"):
        with_overrides(recipe, [("passes.0.group_size", 100)])
    with pytest.raises(RecipeError, match="no entry of this recipe has a field 'bits'"):
        with_overrides(load_recipe("baseline"), [("passes.*.bits", 4)])
    with pytest.raises(RecipeError, match="not a valid index"):
        with_overrides(recipe, [("passes.3.bits", 4)])
    with pytest.raises(RecipeError, match=r"eval\.nope: unknown key"):
        with_overrides(recipe, [("eval.nope", 1)])


def test_every_build_flag_maps_onto_a_recipe_field():
    recipe = load_recipe("int4-g128-rtn")
    values = {
        "exclude": ["lm_head"],
        "gate": ["ppl_ratio <= 2"],
        "dtype": "bfloat16",
        "name": "x",
        "eval": True,
        "reference": True,
        "symmetric": False,
        "group_size": 64,
        "bits": 3,
        "calib_samples": 8,
        "calib_seq_len": 256,
        "ppl_tokens": 8192,
        "gsm8k_problems": 8,
        "gsm8k_generate": 2,
        "kv": "gear-2bit",
        "export": ["native", "trtllm", "hf"],
        "tp_size": 2,
        "pp_size": 2,
        "engine": True,
    }
    assert set(values) == set(CLI_FLAG_PATHS)
    for flag, path in CLI_FLAG_PATHS.items():
        out = with_overrides(recipe, [(path, values[flag])]).model_dump(mode="json")  # raises on a bad path
        node = out
        for key in path.split("."):
            node = node[0] if key == "*" else node[key]
        assert node == values[flag], flag


def test_parse_assignment():
    assert parse_assignment("eval.context=512") == ("eval.context", 512)
    assert parse_assignment("passes.0.exclude=[lm_head, down_proj]") == (
        "passes.0.exclude",
        ["lm_head", "down_proj"],
    )
    with pytest.raises(RecipeError, match="expected PATH=VALUE"):
        parse_assignment("eval.context")


def test_defaults_follow_the_reference_protocol():
    recipe = Recipe()
    assert (recipe.eval.ppl_tokens, recipe.eval.context, recipe.eval.gsm8k_problems) == (4096, 1024, 64)
    assert (recipe.calibration.num_samples, recipe.calibration.seq_len) == (128, 512)
