import re

import pytest
import yaml

from trtcompress.errors import RecipeError
from trtcompress.recipe import (
    CLI_FLAG_PATHS,
    Recipe,
    list_presets,
    load_recipe,
    load_recipe_file,
    parse_assignment,
    parse_recipe,
    with_overrides,
    yaml_load,
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
    assert "\\x" not in recipe.to_yaml()  # `trtcompress recipes NAME` printed "·" as "\xB7"


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
    with pytest.raises(RecipeError, match="a directory, not a recipe file"):  # was "no such recipe file"
        load_recipe_file(tmp_path)
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


def test_gate_appends_to_the_gates_as_set():
    """`--gate` appends after `--set gates=...`: with both, the --set list was prefixed with the recipe's
    gates (a replacement became an append) and the --gate itself was lost; a --set text was split
    into one gate per character."""
    from trtcompress.cli import _resolved_recipe

    def gates(flags, sets=()):
        return [str(g) for g in _resolved_recipe("int8-rtn", flags, tuple(sets)).gates]

    preset = ["ppl_ratio <= 1.01", "gsm8k_kl <= 0.01"]
    assert gates({"gate": ("ppl_ratio <= 2",)}) == [*preset, "ppl_ratio <= 2"]
    assert gates({"gate": ("ppl_ratio <= 2",)}, ["gates=[gsm8k_kl <= 1]"]) == [
        "gsm8k_kl <= 1",
        "ppl_ratio <= 2",
    ]
    assert gates({"gate": ("ppl_ratio <= 2",)}, ["gates=[]"]) == ["ppl_ratio <= 2"]
    assert gates({}, ["gates=[]"]) == []
    with pytest.raises(RecipeError, match="gates: Input should be a valid list"):
        gates({"gate": ("ppl_ratio <= 2",)}, ["gates=gsm8k_kl <= 1"])


def test_calibration_flags_apply_where_something_calibrates():
    """`--calib-samples` / `--calib-seq-len` are refused where nothing reads calibration data, but not
    where a data-free recipe calibrates static int8 / fp8 KV-cache scales for the trtllm / hf export
    (nor where a calibrated pass comes after a data-free one), and `--tp-size` goes with `--engine`."""
    from trtcompress.cli import _check_flags_apply, _resolved_recipe

    def check(recipe, *sets, **flags):
        _check_flags_apply(_resolved_recipe(recipe, flags, sets), flags)

    check("int8-rtn", kv="fp8", export=("trtllm",), calib_samples=4, calib_seq_len=64)
    check("int8-rtn", kv="int8", export=("hf",), calib_seq_len=64)
    check("int8-rtn", "passes=[{method: gsq}, {method: gptq}]", calib_samples=4)
    check("int4-g128-rtn", engine=True, tp_size=2)
    with pytest.raises(RecipeError, match="--calib-samples: recipe 'int8-rtn' has no calibrated pass"):
        check("int8-rtn", kv="fp8", calib_samples=4)  # no export: the KV scales are not calibrated
    with pytest.raises(RecipeError, match="--calib-seq-len: recipe 'int8-rtn' has no calibrated pass"):
        check("int8-rtn", kv="kivi-4bit", export=("trtllm",), calib_seq_len=64)


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


def test_recipe_files_refuse_duplicate_keys_and_bad_encodings_in_one_line(tmp_path):
    """A key given twice was silently the last one (a second `passes:` dropped the first); a file that
    is not UTF-8 was a UnicodeDecodeError traceback; a YAML error said neither line nor column."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\npasses: [{method: gsq, bits: 3}]\npasses: []\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'passes' \(line 3, column 1\)"):
        load_recipe(str(dup))
    nested = tmp_path / "nested.yaml"
    nested.write_text("eval: {ppl_tokens: 2048, ppl_tokens: 4096}\n")
    with pytest.raises(RecipeError, match="duplicate key 'ppl_tokens'"):
        load_recipe(str(nested))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(str(latin))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffname: caf\xe9\n".encode())
    assert load_recipe(str(bom)).name == "caf\xe9"
    tab = tmp_path / "tab.yaml"
    tab.write_text("name: a\n\tdescription: x\n")
    with pytest.raises(RecipeError, match=r"invalid YAML \(found character .* \(line 2, column 1\)\)"):
        load_recipe(str(tab))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="got nothing"):
        load_recipe(str(empty))


def test_exponent_floats_are_floats_in_files_and_in_set(tmp_path):
    """YAML 1.1 reads `1e-2` as a string: a codec option given so failed with "'<=' not supported
    between instances of 'int' and 'str'"."""
    path = tmp_path / "r.yaml"
    path.write_text("kv_cache: {codec: gear-2bit, options: {outlier_ratio: 1e-2}}\n")
    assert load_recipe(str(path)).kv_cache.options == {"outlier_ratio": 0.01}
    assert parse_assignment("kv_cache.options.outlier_ratio=1e-2") == ("kv_cache.options.outlier_ratio", 0.01)
    recipe = with_overrides(
        load_recipe("int4-g128-rtn"),
        [("kv_cache.codec", "gear-2bit"), parse_assignment("kv_cache.options={outlier_ratio: 2E-2}")],
    )
    assert recipe.kv_cache.options == {"outlier_ratio": 0.02}


def test_set_takes_text_fields_verbatim_and_star_needs_a_field():
    """`--set name=no` was False ("Input should be a valid string"), `--set 'description=INT4 # 2'`
    was cut to "INT4" at the YAML comment; `--set passes.*=...` was an IndexError traceback."""
    recipe = load_recipe("int4-g128-rtn")
    cases = [("name=no", "no"), ("name=1.0", "1.0"), ("description=INT4 # 2, a: b", "INT4 # 2, a: b"),
             ("name='yes'", "yes"), ('name= "a # b" ', "a # b")]  # fmt: skip
    for text, value in cases:
        assignment = parse_assignment(text)
        assert assignment[1] == value
        assert getattr(with_overrides(recipe, [assignment]), text.partition("=")[0]) == value
    assert parse_assignment("kv_cache.codec=null") == ("kv_cache.codec", None)  # str | None: null is None
    # `str | None` fields are text too: `--set model=123` was the int 123 ("Input should be a valid string")
    optional = [("model=123", "123"), ("model=1.0", "1.0"), ("model='null'", "null"), ("model=~", None)]
    for text, value in optional:
        assert parse_assignment(text)[1] == value
        assert with_overrides(recipe, [parse_assignment(text)]).model == value
    # YAML's other null forms, the empty value included, still clear one (`--set kv_cache.codec=` was
    # a codec named '' once optional text fields took the text as typed)
    codec = with_overrides(recipe, [("kv_cache.codec", "int8")])
    for text in ("kv_cache.codec=", "kv_cache.codec= ", "kv_cache.codec=NULL", "kv_cache.codec=Null"):
        assert with_overrides(codec, [parse_assignment(text)]).kv_cache.codec is None, text
    assert parse_assignment("eval.context=512") == ("eval.context", 512)
    for path in ("passes.*", "gates.*"):
        with pytest.raises(RecipeError, match=r"'\*' selects entries by a field"):
            with_overrides(recipe, [(path, [])])


def test_nm_patterns_are_text_and_sparsity_given_as_a_pattern_is_explained(tmp_path):
    """YAML 1.1 reads `2:4` as the base-60 int 124: an unquoted `pattern: 4:8` failed as "Input should
    be a valid string", and `sparsity: 2:4` as "Input should be less than 1", neither naming the slip."""
    path = tmp_path / "nm.yaml"
    path.write_text("passes:\n  - method: wanda\n    pattern: 4:8\n")
    assert load_recipe_file(path).passes[0].pattern == "4:8"
    assert parse_assignment("passes.0.pattern=2:4") == ("passes.0.pattern", "2:4")
    path.write_text("passes:\n  - method: sparsegpt\n    sparsity: 2:4\n")
    with pytest.raises(RecipeError, match=r"sparsity is the fraction pruned.*for 2:4 use pattern: '2:4'"):
        load_recipe_file(path)


def test_yaml_merge_keys_share_pass_options_and_may_be_overridden(tmp_path):
    """`<<: *anchor` (YAML's merge key, which yaml.safe_load reads) was refused as invalid YAML by the
    duplicate-key check; a key of the mapping itself overrides a merged one, which is no duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "passes:\n"
        "  - &int4 {method: gsq, bits: 4, group_size: 64, exclude: [lm_head]}\n"
        "  - <<: *int4\n"
        "    bits: 8\n"
        "    targets: [down_proj]\n"
    )
    first, second = load_recipe(str(path)).passes
    assert (first.bits, second.bits, second.group_size, second.exclude) == (4, 8, 64, ["lm_head"])
    path.write_text("passes:\n  - &p {method: gsq}\n  - <<: *p\n    bits: 4\n    bits: 8\n")
    with pytest.raises(RecipeError, match="duplicate key 'bits'"):
        load_recipe(str(path))


def test_an_invalid_export_format_is_named_by_its_index_as_written():
    """`formats` is reordered with `native` first: an error used to name the entry's shifted index
    (`[trtllm, foo]` -> `export.formats[2]`)."""
    recipe = load_recipe("int4-g128-rtn")
    with pytest.raises(RecipeError, match=r"export\.formats\[1\]: Input should be"):
        with_overrides(recipe, [("export.formats", ["trtllm", "foo"])])
    fixed = with_overrides(recipe, [("export.formats", ["hf", "native", "hf"])])
    assert fixed.export.formats == ["native", "hf"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1: x\n", "r.yaml: recipe: key 1 is not text"),
        ("yes: x\n", "r.yaml: recipe: key True is not text"),
        ("calibration: {2: 3}\n", "r.yaml: calibration: key 2 is not text"),
        ("passes: [{method: gsq, 4: x}]\n", "r.yaml: passes[0]: key 4 is not text"),
    ],
)
def test_a_key_that_is_not_text_is_named(text, message):
    """YAML reads `1:` / `yes:` as an int / bool key: at the top level that was an IndexError traceback,
    nested it read `calibration[2]` as if the section were a list."""
    from trtcompress.recipe import yaml_load

    with pytest.raises(RecipeError) as err:
        parse_recipe(yaml_load(text), "r.yaml")
    assert str(err.value).startswith(message)
    assert "allowed keys:" in str(err.value)


@pytest.mark.parametrize("text", ["1e3", "1.5e3", "-2e-5", "1_0e2"])
def test_text_that_reads_as_a_number_round_trips(text):
    """to_yaml wrote `name: 1e3` unquoted (a string to YAML 1.1's dumper), which a recipe reads back as a
    float: the recipe it printed did not load."""
    from trtcompress.recipe import yaml_load

    recipe = Recipe(name=text, description=text, model=text)
    assert parse_recipe(yaml_load(recipe.to_yaml()), "round trip") == recipe


@pytest.mark.parametrize(
    ("text", "value"), [("1.5e1", 15.0), ("1.0e5", 1e5), (".5e3", 500.0), ("1e2", 100.0)]
)
def test_exponent_floats_with_a_dot_read_as_in_yaml_1_2(text, value):
    """YAML 1.1 needs a signed exponent after a dot: `num_samples: 1.28e2` was the text '1.28e2' ("unable
    to parse string as an integer") while `1e2` was 100."""
    from trtcompress.recipe import yaml_load

    assert yaml_load(f"x: {text}")["x"] == value
    recipe = parse_recipe(yaml_load(f"calibration: {{num_samples: {text}}}"), "r.yaml")
    assert recipe.calibration.num_samples == int(value)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("calibration: {num_samples: yes}", "calibration.num_samples"),
        ("export: {tp_size: true}", "export.tp_size"),
        ("passes: [{method: gptq, damp: on}]", "passes[0].damp"),
    ],
)
def test_a_boolean_is_not_a_number(text, path):
    """pydantic's lax mode read `num_samples: yes` as 1 sample and `damp: on` as 1.0, silently."""
    from trtcompress.recipe import yaml_load

    with pytest.raises(RecipeError, match=rf"r\.yaml: {re.escape(path)}: expected a number, not the boolean"):
        parse_recipe(yaml_load(text), "r.yaml")
    with pytest.raises(RecipeError, match="expected a number, not the boolean True"):
        with_overrides(load_recipe("int4-g128-rtn"), [parse_assignment("calibration.num_samples=on")])
    # a quoted number stays a number, as before
    assert parse_recipe({"calibration": {"num_samples": "12"}}, "r.yaml").calibration.num_samples == 12


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("passes: [{method: gsq, bits: yes}]", "passes[0].bits"),  # read as 1 bit: below the minimum 2
        ("eval: {context: no}", "eval.context"),  # read as 0 tokens
    ],
)
def test_a_boolean_that_lax_mode_refuses_as_a_number_is_named_as_a_boolean(text, path):
    """`bits: yes` was refused as "greater than or equal to 2", naming a number the user never wrote."""
    from trtcompress.recipe import yaml_load

    with pytest.raises(RecipeError, match=rf"r\.yaml: {re.escape(path)}: expected a number, not the boolean"):
        parse_recipe(yaml_load(text), "r.yaml")


def test_a_recipe_name_too_long_for_the_file_system_is_a_recipe_error():
    """pathlib's is_file() raises ENAMETOOLONG instead of answering False: an OSError traceback."""
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe("r" * 300)
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe("r" * 300 + ".yaml")


@pytest.mark.parametrize(
    "method, field",
    [("eora", "damp"), ("kd", "lr"), ("kd", "alpha"), ("regional", "lr"), ("wanda", "gradient_scale")],
)
def test_pass_settings_must_be_finite(method, field):
    """An infinite learning rate, damping or gradient scale passed `gt=0` and turned the weights into
    NaN minutes later (NaN was refused only by the bounds that happened to exist)."""
    for value in (".inf", ".nan"):
        with pytest.raises(RecipeError, match=rf"passes\[0\]\.{field}: Input should be a finite number"):
            parse_recipe(yaml_load(f"passes: [{{method: {method}, {field}: {value}}}]"), "test")


@pytest.mark.parametrize("method", ["[gsq]", "{gsq: 1}"])
def test_a_pass_method_that_is_not_text_is_named(method):
    """`method: [gsq]` was a TypeError traceback (an unhashable list looked up in the pass registry)."""
    with pytest.raises(RecipeError, match=r"passes\[0\]\.method .* is not a known pass; known: awq"):
        parse_recipe(yaml_load(f"passes: [{{method: {method}}}]"), "r.yaml")
    with pytest.raises(RecipeError, match=r"passes\[0\]\.method .* is not a known pass"):
        with_overrides(load_recipe("int4-g128-rtn"), [parse_assignment(f"passes.0.method={method}")])


def test_a_complex_yaml_key_is_a_yaml_error(tmp_path):
    """`? [a, b]` (a list as a key) was a TypeError traceback from the duplicate-key check."""
    path = tmp_path / "r.yaml"
    path.write_text("? [a, b]\n: 1\n", encoding="utf-8")
    with pytest.raises(
        RecipeError, match=r"r\.yaml: invalid YAML \(found unhashable key \(line 1, column 3\)\)"
    ):
        load_recipe(str(path))
    # in --set, a value YAML cannot read is text, which the field then refuses
    path_, value = parse_assignment("passes.0.bits=? [a]\n: 1")
    with pytest.raises(RecipeError, match=r"passes\[0\]\.bits: Input should be a valid integer"):
        with_overrides(load_recipe("int4-g128-rtn"), [(path_, value)])


def test_text_that_utf8_cannot_encode_is_refused_with_its_path(tmp_path):
    """A byte that is not UTF-8 on the command line (`--name $'\\xff'`) reaches Python as a lone surrogate;
    the build wrote it into the manifest, and `eval` then crashed drawing eval.png's title. A YAML
    `"\\udcff"` escape is the same text."""
    recipe = load_recipe("int4-g128-rtn")
    with pytest.raises(RecipeError, match=r"^recipe overrides: name: text that is not valid Unicode"):
        with_overrides(recipe, [parse_assignment("name=a\udcffb")])
    with pytest.raises(RecipeError, match=r"passes\[0\]\.exclude\[1\]: text that is not valid Unicode"):
        with_overrides(recipe, [("passes.0.exclude", ["lm_head", "\udcff"])])
    path = tmp_path / "r.yaml"
    path.write_text('description: "\\udcff"\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml: description: text that is not valid Unicode"):
        load_recipe(str(path))
    path.write_text('eval: {"\\udcff": 1}\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=r"r\.yaml: eval: text that is not valid Unicode"):
        load_recipe(str(path))
    path.write_text("a: &a [*a]\n", encoding="utf-8")  # a self-referencing alias: no endless walk
    with pytest.raises(RecipeError, match="a: unknown key"):
        load_recipe(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        # torch.Generator().manual_seed: ValueError Overflow when the KD pass started
        ("passes: [{method: kd, seed: 1%s}]" % ("0" * 29), r"passes\[0\]\.seed: Input should be less"),
        ("passes: [{method: kd, seed: -9223372036854775809}]", r"passes\[0\]\.seed: Input should be greater"),
        # llmfp4's coarse-to-fine search: ValueError Overflow in torch mid-build
        ("passes: [{method: llmfp4, stride: 1%s}]" % ("0" * 29), r"passes\[0\]\.stride: Input should be"),
        # reasoning-gym: OverflowError when the evaluation started
        ("eval: {gsm_symbolic_problems: 1%s}" % ("0" * 29), r"eval\.gsm_symbolic_problems: Input should be"),
    ],
)  # fmt: skip
def test_integers_a_later_step_cannot_take_are_refused_naming_the_field(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(yaml_load(text), "r.yaml")


def test_the_extreme_kd_seeds_torch_takes_are_accepted():
    import torch

    for seed in (-(2**63), 2**64 - 1):
        recipe = parse_recipe(yaml_load(f"passes: [{{method: kd, seed: {seed}}}]"), "r.yaml")
        torch.Generator().manual_seed(recipe.passes[0].seed)
