import re

import pytest

from trtcompress.builders.gates import FINITE_GATE, Gate, check_gates
from trtcompress.eval.harness import EvalReport


def _report(**values):
    base = dict(
        model="m",
        recipe="r",
        ppl=20.0,
        weight_bytes=1,
        bits_per_param=4.0,
        eval_seconds=1.0,
        protocol={},
        details={},
    )
    return EvalReport(**(base | values))


@pytest.mark.parametrize(
    ("gate", "passed"),
    [
        ("ppl_ratio <= 1.05", True),
        ("ppl_ratio < 1.04", False),
        ("gsm8k_top1 >= 0.9", True),
        ("gsm8k_kl > 0.1", False),
    ],
)
def test_gate_verdicts(gate, passed):
    report = _report(ppl_ratio=1.04, gsm8k_top1=0.95, gsm8k_kl=0.05)
    [result] = check_gates([Gate.model_validate(gate)], report)
    assert result.passed is passed


def test_unmeasured_metric_fails_with_a_reason():
    [result] = check_gates([Gate.model_validate("gsm8k_kl <= 0.1")], _report())
    assert not result.passed and "not measured" in result.reason


def test_gate_serialises_as_its_string():
    gate = Gate.model_validate("ppl_ratio<=1.5")
    assert gate.model_dump() == "ppl_ratio <= 1.5"
    assert Gate.model_validate({"metric": "ppl", "op": ">", "value": 2}).metric == "ppl"


@pytest.mark.parametrize(
    "gate",
    [
        "ppl_ratio <= 1e999",  # inf: a gate that can never fail
        {"metric": "ppl_ratio", "op": "<=", "value": float("nan")},  # YAML `.nan`: can never pass
        {"metric": "ppl_ratio", "op": ">=", "value": "-inf"},
        {"metric": "gsm8k_top1", "op": ">=", "value": True},  # not the threshold 1.0
    ],
)
def test_gate_thresholds_must_be_finite_numbers(gate):
    with pytest.raises(ValueError, match=r"finite number|must be a number"):
        Gate.model_validate(gate)


def test_nan_metric_fails_with_a_reason():
    result, finite = check_gates([Gate.model_validate("ppl_ratio <= 1.05")], _report(ppl_ratio=float("nan")))
    assert not result.passed and "NaN" in result.reason
    assert finite.gate == FINITE_GATE and not finite.passed


@pytest.mark.parametrize("metric", ["ppl", "gsm8k_kl"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_broken_model_fails_even_without_gates(metric, value):
    """With no gate on it (the default preset declares none), a NaN or infinite perplexity or KL was
    written as a good artifact (status ok, exit 0)."""
    assert check_gates([], _report()) == []  # finite metrics: nothing to add
    [result] = check_gates([], _report(**{metric: value}))
    assert result.gate == FINITE_GATE and not result.passed and metric in result.reason


@pytest.mark.parametrize(
    "text", ["weight_bytes <= 70123456", "gsm8k_kl <= 1.234567e-07", "ppl_ratio <= 1.05"]
)
def test_gate_string_keeps_its_threshold(text):
    """The string is how a gate is stored (manifest, YAML) and re-read (`--gate` appends to the recipe's
    gates through it): it must parse back to the same threshold, not a 6-digit rounding of it."""
    from trtcompress.recipe import load_recipe, with_overrides

    gate = Gate.model_validate(text)
    assert Gate.model_validate(str(gate)).value == gate.value
    recipe = with_overrides(load_recipe("int8-rtn"), [("gates", [text])])
    appended = with_overrides(recipe, [("gates", [*(str(g) for g in recipe.gates), "ppl_ratio <= 2"])])
    assert appended.gates[0].value == gate.value


def test_gate_table_shows_the_measured_value_that_got_the_verdict():
    """ppl_ratio 1.05004 fails `<= 1.05`: the table must not show it as "1.05" (4 digits), nor a byte
    count as 7.012e+07."""
    from rich.console import Console

    from trtcompress.eval.report import gates_table

    report = _report(ppl_ratio=1.05004, gsm8k_top1=0.912345, weight_bytes=70123480)
    gates = ["ppl_ratio <= 1.05", "gsm8k_top1 >= 0.9", "weight_bytes <= 70123456"]
    console = Console(width=200, record=True)
    console.print(gates_table(check_gates([Gate.model_validate(g) for g in gates], report)))
    text = console.export_text()
    assert "1.05004" in text and "0.9123 " in text and "70123480" in text


def test_a_recorded_gate_reads_as_in_the_build_table():
    """`inspect` and the failed-gates refusal of serve / repo printed a manifest's gate value in full
    (1.001275630308855); they use the table's rule, and a gate that no longer parses is shown, not judged."""
    from trtcompress.eval.report import measured_text

    assert measured_text(1.001275630308855, "ppl_ratio <= 1.01", True) == "1.001"
    assert measured_text(1.0500400001, "ppl_ratio <= 1.05", False) == "1.05004"
    assert measured_text(1.5734923018454836, "ppl_ratio <= 1.2", False) == "1.573"
    assert measured_text(1.5734923018454836, "not a gate", False) == "1.57349"
    assert measured_text(None, "ppl_ratio <= 1.2", False) == "-"
    assert measured_text(0.99998, "ppl_ratio <= 1.01", True) == "1.000"  # not "1", which reads as exact
    assert measured_text(float("inf"), "ppl_ratio <= 1.01", False) == "inf"


def test_a_recorded_gate_value_that_is_not_a_number_is_shown_not_a_traceback():
    """`inspect` (and serve / repo's failed-gates refusal) of a manifest whose gate value is text: a
    ValueError traceback from float('abc') once the value went through the table's rule."""
    from trtcompress.eval.report import measured_text

    assert measured_text("abc", "ppl_ratio <= 1.05", False) == "abc"
    assert measured_text([1], "ppl_ratio <= 1.05", False) == "[1]"
    assert measured_text(True, "ppl_ratio <= 1.05", True) == "True"


@pytest.mark.parametrize(
    "gate, needs",
    [
        ("kv_bytes_per_token <= 5000", "a KV-cache codec"),
        ("gsm8k_kl <= 0.1", "eval.gsm8k_problems > 0 and the reference model"),
        ("gsm_symbolic_top1 >= 0.5", "eval.gsm_symbolic_problems > 0 and the reference model"),
        ("gsm8k_exact_match >= 0.1", "eval.gsm8k_generate > 0"),
        ("ppl_ratio <= 1.1", "the reference model"),
    ],
)
def test_an_unmeasured_metric_names_the_setting_that_measures_it(gate, needs):
    """A gate on kv_bytes_per_token without a codec used to ask whether the reference was disabled."""
    [result] = check_gates([Gate.model_validate(gate)], _report())
    assert not result.passed and needs in result.reason


def test_report_and_gate_tables_print_names_as_typed():
    """A recipe name or model path with brackets was read as rich markup: `[/v2]` raised MarkupError after
    the artifact was written (a traceback instead of exit 3 for a failed gate), `[red]` vanished."""
    from rich.console import Console

    from trtcompress.eval.report import gates_table, report_table

    report = _report(model="m[/x]", recipe="int4 [/v2] [red]y", ppl_ratio=1.2)
    console = Console(width=200, record=True)
    console.print(report_table(report))
    console.print(gates_table(check_gates([Gate.model_validate("ppl_ratio <= 1.05")], report)))
    text = console.export_text()
    assert "m[/x] · int4 [/v2] [red]y" in text and "FAIL" in text


@pytest.mark.parametrize(
    "text, match",
    [
        ("ppl_ratio <= 1.2.3", r"threshold '1\.2\.3' is not a number"),
        ("ppl_ratio <= abc", r"threshold 'abc' is not a number"),
        ("ppl_ratio <= 1,05", r"threshold '1,05' is not a number"),
        ("PPL_ratio <= 1", r"unknown gate metric 'PPL_ratio' \(did you mean 'ppl_ratio'\?\)"),
        ("ppl-ratio <= 1", r"unknown gate metric 'ppl-ratio' \(did you mean 'ppl_ratio'\?\)"),
        ("ppl_ratio <= nan", r"finite number"),
    ],
)
def test_a_bad_gate_string_says_what_is_wrong_with_it(text, match):
    """A non-numeric threshold used to read "could not convert string to float: '1.2.3'" (naming
    neither the gate nor the rule) or "not of the form 'metric <= value'" (for `abc`), and a metric in
    the wrong case or with a hyphen "not of the form" instead of the unknown-metric hint."""
    with pytest.raises(ValueError, match=match):
        Gate.model_validate(text)


@pytest.mark.parametrize(
    "gate, settings, needs",
    [
        ("gsm8k_exact_match >= 0.1", {}, "eval.gsm8k_generate > 0"),
        ("ppl_ratio <= 1.1", {"reference": False}, "the reference model"),
        ("gsm8k_kl <= 0.1", {"gsm8k_problems": 0}, "eval.gsm8k_problems > 0"),
        ("kv_bytes_per_token_ref >= 1", {}, "a KV-cache codec"),
    ],
)
def test_a_gate_the_evaluation_cannot_measure_is_refused_up_front(gate, settings, needs):
    """Such a gate could only fail, and failed the build after the whole compression had run."""
    from trtcompress.builders.gates import check_measurable
    from trtcompress.errors import RecipeError
    from trtcompress.eval.config import EvalConfig

    gates = [Gate.model_validate("ppl <= 100"), Gate.model_validate(gate)]
    with pytest.raises(RecipeError, match=rf"could only fail: {re.escape(gate)} \(.*{re.escape(needs)}"):
        check_measurable(gates, EvalConfig(**settings), kv_codec=False)
    # measured with the setting that measures it (the defaults, a codec for kv_*): no error
    fixed = {"gsm8k_generate": 1} if "exact" in gate else {}
    check_measurable(gates, EvalConfig(**fixed), kv_codec="kv_" in gate)


def test_the_report_title_names_the_kv_codec_it_was_decoded_with():
    """`eval MODEL --kv gear-2bit` titled its table "MODEL · baseline", as if nothing was compressed."""
    from trtcompress.eval.report import report_title

    assert report_title(_report(recipe="baseline")) == "m · baseline"
    kv = {"kv_cache": {"codec": "gear-2bit", "options": {"rank": 4}, "block_size": 64}}
    assert (
        report_title(_report(recipe="baseline", protocol=kv)) == "m · baseline · KV cache gear-2bit (rank=4)"
    )
    no_kv = {"kv_cache": {"codec": None, "options": {}}}
    assert report_title(_report(protocol=no_kv)) == "m · r"


@pytest.mark.parametrize(
    "gate, settings, needs, not_named",
    [
        ("gsm8k_exact_match_ref >= 0", {"reference": False, "gsm8k_generate": 2}, "reference", "generate"),
        ("gsm8k_kl <= 0.1", {"reference": False}, "the reference model", "gsm8k_problems"),
        ("gsm_symbolic_top1 >= 0.5", {"gsm_symbolic_problems": 0}, "gsm_symbolic_problems > 0", "reference"),
    ],
)
def test_a_refused_gate_names_only_the_settings_it_lacks(gate, settings, needs, not_named):
    """`gsm8k_exact_match_ref` with eval.gsm8k_generate 2 and no reference asked for
    "eval.gsm8k_generate > 0 and the reference model": the user had set the first already."""
    from trtcompress.builders.gates import check_measurable
    from trtcompress.errors import RecipeError
    from trtcompress.eval.config import EvalConfig

    with pytest.raises(RecipeError) as error:
        check_measurable([Gate.model_validate(gate)], EvalConfig(**settings), kv_codec=False)
    assert needs in str(error.value) and not_named not in str(error.value).split("it needs")[1]
