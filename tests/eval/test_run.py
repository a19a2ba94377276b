import pytest

from tests.conftest import TINY_EVAL, make_tiny_model_dir
from trtcompress.eval.run import evaluate_target

TINY_OVERRIDES = [(f"eval.{k}", v) for k, v in TINY_EVAL.model_dump().items()]


def _table_text(report) -> str:
    import io

    from rich.console import Console

    from trtcompress.eval.report import report_table

    console = Console(width=200, file=io.StringIO())
    console.print(report_table(report))
    return console.file.getvalue()


def test_plain_model_is_compared_with_the_reference_model_given(tiny_model_dir, tmp_path):
    """`eval MODEL --reference-model OTHER` without a recipe measures the model against OTHER; it must not
    report the model as its own reference (ppl_ratio 1, KL 0) as if OTHER had not been named."""
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    report = evaluate_target(str(tiny_model_dir), reference_spec=str(other), overrides=TINY_OVERRIDES)
    alone = evaluate_target(str(other), overrides=TINY_OVERRIDES)
    assert report.ppl_ref == pytest.approx(alone.ppl, rel=1e-5)
    assert report.ppl_ratio != pytest.approx(1.0) and report.gsm8k_kl > 0
    assert report.gsm8k_bpb_ref == pytest.approx(alone.gsm8k_bpb, rel=1e-5)
    # which model the reference figures came from is in the report (and under its table)
    assert report.protocol["reference_model"] == str(other) and alone.protocol["reference_model"] == "itself"
    assert f"reference:{other}" in "".join(_table_text(report).split())  # (the caption wraps a long path)


def test_plain_model_without_a_reference_model_is_its_own_reference(tiny_model_dir):
    report = evaluate_target(str(tiny_model_dir), overrides=TINY_OVERRIDES)
    assert report.ppl_ratio == 1.0 and report.gsm8k_kl == 0.0 and report.gsm8k_top1 == 1.0
    # --no-reference: no reference figures, as after compression (they were copied from the model)
    alone = evaluate_target(str(tiny_model_dir), overrides=[*TINY_OVERRIDES, ("eval.reference", False)])
    assert alone.ppl == report.ppl and alone.ppl_ref is None and alone.gsm8k_kl is None
    assert alone.protocol["reference_model"] is None and "reference:" not in _table_text(alone)
    assert alone.protocol["reference"] is False and report.protocol["reference"] is True  # (the setting)


def test_artifact_eval_refuses_a_window_over_its_calibration_text(tiny_model_dir, tmp_path):
    """A calibrated artifact saw the BoolQ tokens right after its build's perplexity window; `eval
    ARTIFACT --ppl-tokens` wider than that scored the model on its own calibration text (optimistic ppl)."""
    from trtcompress.builders.pipeline import build
    from trtcompress.errors import RecipeError
    from trtcompress.recipe import load_recipe, with_overrides

    recipe = with_overrides(
        load_recipe("w4a16-gptq").model_copy(update={"eval": TINY_EVAL}),
        [("calibration.num_samples", 2), ("calibration.seq_len", 64), ("eval.enabled", False)],
    )
    build(str(tiny_model_dir), recipe, tmp_path / "a")  # calibrated on tokens 256-383
    with pytest.raises(RecipeError, match="which this artifact was calibrated on"):
        evaluate_target(str(tmp_path / "a"), overrides=[*TINY_OVERRIDES, ("eval.ppl_tokens", 512)])
    # the build's own window, or a narrower one, stays allowed
    report = evaluate_target(
        str(tmp_path / "a"), overrides=[*TINY_OVERRIDES, ("eval.reference", False)], output_dir=tmp_path / "e"
    )
    assert report.protocol["ppl_tokens"] == 256


def test_an_artifact_built_before_whole_windows_were_required_is_still_evaluated(tiny_model_dir, tmp_path):
    """eval.ppl_tokens must now be whole windows of eval.context; an artifact built before with 300 in
    windows of 128 (valid then: it scored 2 windows) was refused by `eval ARTIFACT` whatever was passed,
    as its own manifest no longer parsed. It is evaluated on the windows its build scored, and its
    calibration text still starts after all 300 tokens."""
    import json

    from trtcompress.builders.pipeline import build
    from trtcompress.checkpoints import native
    from trtcompress.errors import RecipeError
    from trtcompress.recipe import load_recipe, with_overrides

    recipe = with_overrides(
        load_recipe("w4a16-gptq").model_copy(update={"eval": TINY_EVAL}),
        [("calibration.num_samples", 2), ("calibration.seq_len", 64), ("eval.enabled", False)],
    )
    build(str(tiny_model_dir), recipe, tmp_path / "a")
    path = tmp_path / "a" / native.MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["recipe"]["eval"].update(ppl_tokens=300, context=128)  # as an earlier build wrote it
    manifest["checksum"] = native.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    no_ref = [("eval.reference", False), ("eval.gsm8k_problems", 2), ("eval.gsm_symbolic_problems", 0)]
    report = evaluate_target(str(tmp_path / "a"), overrides=no_ref, output_dir=tmp_path / "e")
    assert report.protocol["ppl_tokens"] == 256 and report.protocol["context"] == 128
    wider = [*no_ref, ("eval.context", 100), ("eval.ppl_tokens", 300)]  # up to its calibration text
    assert evaluate_target(str(tmp_path / "a"), overrides=wider, output_dir=tmp_path / "e").ppl > 0
    with pytest.raises(RecipeError, match="which this artifact was calibrated on"):
        evaluate_target(str(tmp_path / "a"), overrides=[*no_ref, ("eval.ppl_tokens", 384)])


def test_artifact_eval_finds_a_relative_source_model_from_another_directory(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The reference model was reloaded from `source.model` as typed at build time: an artifact built
    from `./model` and evaluated from another directory could not find it (or found another model)."""
    import os

    from trtcompress.builders.pipeline import build
    from trtcompress.recipe import load_recipe

    monkeypatch.chdir(tiny_model_dir.parent)
    recipe = load_recipe("int4-g64-rtn").model_copy(
        update={"eval": TINY_EVAL.model_copy(update={"enabled": False})}
    )
    build(os.path.join(".", tiny_model_dir.name), recipe, tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    report = evaluate_target(str(tmp_path / "a"), overrides=TINY_OVERRIDES)
    direct = evaluate_target(str(tiny_model_dir), overrides=TINY_OVERRIDES)
    assert report.ppl_ref == pytest.approx(direct.ppl, rel=1e-5)
    assert report.protocol["reference_model"] == str(tiny_model_dir)


def test_artifact_reference_is_the_local_directory_that_shared_a_known_name(tmp_path):
    """A local directory wins over the known name it shares (`build SmolLM2-135M` with a SmolLM2-135M/
    there loads that directory), so the reference of its artifact is that directory: the name, from
    another directory, would load the packaged model and compare the artifact with another model."""
    from trtcompress.eval.run import _reference_of
    from trtcompress.models.gguf_convert import COMPLETE_MARKER

    local = tmp_path / "SmolLM2-135M"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert _reference_of({"model": "SmolLM2-135M", "path": str(local)}) == str(local)
    # the packaged model's converted copy (here or on another machine): the name
    (local / COMPLETE_MARKER).write_text("{}")
    assert _reference_of({"model": "SmolLM2-135M", "path": str(local)}) == "SmolLM2-135M"
    assert _reference_of({"model": "smollm2-135m", "path": str(tmp_path / "gone")}) == "smollm2-135m"
    assert _reference_of({"model": "./m", "path": str(tmp_path / "m")}) == str(tmp_path / "m")


@pytest.mark.parametrize(
    "reference, codec, counts",
    [
        (True, None, {"gsm8k_generate": 1}),
        (False, None, {"gsm_symbolic_problems": 0, "gsm8k_generate": 1}),
        (True, "kivi-2bit", {"gsm8k_problems": 0, "gsm8k_generate": 1}),
        (False, "int8", {}),
    ],
)
def test_measured_metrics_names_what_the_evaluation_fills(tiny_model, reference, codec, counts):
    """`build` refuses gates outside `measured_metrics` before compressing: it must be exactly the set of
    gate metrics that `evaluate` reports, on both the plain and the KV-codec path."""
    from trtcompress.eval.harness import GATE_METRICS, evaluate, measured_metrics
    from trtcompress.kv.config import KVCacheConfig

    config = TINY_EVAL.model_copy(update={"max_new_tokens": 2, **counts})
    report = evaluate(
        tiny_model.model, tiny_model.tokenizer, config, tiny_model.model if reference else None,
        model_name="tiny", recipe_name="r", kv=KVCacheConfig(codec=codec),
    )  # fmt: skip
    filled = {name for name in GATE_METRICS if getattr(report, name) is not None}
    assert filled == measured_metrics(config, reference=reference, kv_codec=codec is not None)


def test_a_reference_model_with_another_tokenizer_is_refused(tiny_model_dir, tmp_path):
    """Both models are fed the evaluated model's token ids: a reference with another tokenizer (here the
    same vocabulary size, trained on other text) was scored on ids it reads as other text, and the
    report's ppl_ref, KL and top-1 came out as plausible, meaningless numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trtcompress.errors import ModelError
    from trtcompress.eval.datasets import boolq_passages_text

    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([boolq_passages_text()[50_000:100_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(other)
    with pytest.raises(ModelError, match="another tokenizer"):
        evaluate_target(str(tiny_model_dir), reference_spec=str(other), overrides=TINY_OVERRIDES)


def test_a_reference_model_with_another_vocabulary_size_is_refused(tiny_model):
    """Same tokenizer, other logit width (a padded vocabulary): KL crashed on the shapes."""
    import copy

    from trtcompress.errors import ModelError
    from trtcompress.eval.harness import evaluate

    reference = copy.deepcopy(tiny_model.model)
    reference.resize_token_embeddings(640)
    with pytest.raises(ModelError, match="vocabulary of 640 logits"):
        evaluate(
            tiny_model.model, tiny_model.tokenizer, TINY_EVAL, reference, model_name="m", recipe_name="r"
        )


def test_a_model_evaluated_as_its_own_reference_plots_its_kl(tiny_model, tmp_path, monkeypatch):
    """`eval MODEL` (its own reference) reports gsm8k_kl 0 and top-1 1 in the JSON and the table, but
    left out the per-problem KL, so the plot said "no reference model: KL not measured"."""
    from trtcompress.eval import report as report_module
    from trtcompress.eval.harness import evaluate

    report = evaluate(
        tiny_model.model, tiny_model.tokenizer, TINY_EVAL, model_name="m", recipe_name="r", is_reference=True
    )
    assert report.gsm8k_kl == 0.0 and report.gsm8k_top1 == 1.0
    assert report.details["gsm8k_kl_per_problem"] == [0.0] * TINY_EVAL.gsm8k_problems
    titles = []
    monkeypatch.setattr("matplotlib.axes.Axes.set_title", lambda ax, text, *a, **k: titles.append(text))
    report_module.plot_report(report, tmp_path / "eval.png")
    assert "GSM8K KL 0.0000, top-1 1.000" in titles


@pytest.mark.parametrize(
    "values, reason",
    [
        ({"ppl_ref": 20.0}, "GSM8K not evaluated (eval.gsm8k_problems: 0)"),
        ({"gsm8k_bpb": 0.9}, "no reference model: KL not measured"),
    ],
)
def test_the_plot_says_why_it_has_no_kl(tmp_path, monkeypatch, values, reason):
    """A build with its reference but `eval.gsm8k_problems: 0` plotted "no reference model: KL not
    measured" beside the reference's perplexity bars."""
    from trtcompress.eval import report as report_module
    from trtcompress.eval.harness import EvalReport

    report = EvalReport(
        model="m", recipe="r", ppl=21.0, weight_bytes=1, bits_per_param=4.0, eval_seconds=1.0,
        protocol={}, details={"ppl_window_nll": [3.0], "ppl_window_nll_ref": [3.0]}, **values,
    )  # fmt: skip
    texts = []
    monkeypatch.setattr("matplotlib.axes.Axes.text", lambda ax, x, y, text, *a, **k: texts.append(text))
    report_module.plot_report(report, tmp_path / "eval.png")
    assert texts == [reason]
