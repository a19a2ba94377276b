import json

import pytest
import torch

from tests.conftest import TINY_EVAL
from trtcompress.builders.pipeline import build
from trtcompress.checkpoints import native
from trtcompress.errors import ArtifactError, CompressionError, RecipeError
from trtcompress.recipe import Recipe, load_recipe, with_overrides


def _recipe(name="int4-g64-rtn", gates=()):
    recipe = load_recipe(name).model_copy(update={"eval": TINY_EVAL})
    return with_overrides(recipe, [("gates", list(gates))]) if gates else recipe


def test_build_writes_an_evaluated_artifact(tiny_model_dir, tmp_path):
    result = build(str(tiny_model_dir), _recipe(gates=["ppl_ratio <= 100"]), tmp_path / "a")
    assert result.gates_passed
    manifest = native.read_manifest(tmp_path / "a")
    assert manifest["status"] == "ok"
    assert manifest["eval"]["ppl_ref"] > 0 and manifest["eval"]["gsm8k_kl"] >= 0
    assert (tmp_path / "a" / "eval.png").stat().st_size > 1000
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["ppl"] == manifest["eval"]["ppl"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary leftovers


def test_failed_gate_keeps_the_artifact_marked(tiny_model_dir, tmp_path):
    result = build(
        str(tiny_model_dir), _recipe("int3-g128-rtn", gates=["gsm8k_kl <= 0.0000001"]), tmp_path / "a"
    )
    assert not result.gates_passed
    assert native.read_manifest(tmp_path / "a")["status"] == "failed_gates"


def test_existing_output_is_refused_before_any_work(tiny_model_dir, tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        build(str(tiny_model_dir), _recipe(), tmp_path / "a")


def test_gates_without_eval_are_a_recipe_error(tiny_model_dir, tmp_path):
    recipe = with_overrides(_recipe(), [("eval.enabled", False), ("gates", ["ppl_ratio <= 2"])])
    # names the gates and how to drop them (`--no-eval` on a preset with gates, such as int8-rtn)
    with pytest.raises(RecipeError, match=r"gates \(ppl_ratio <= 2\).*need an evaluation.*--set gates=\[\]"):
        build(str(tiny_model_dir), recipe, tmp_path / "a")


def test_failing_pass_leaves_no_output(tiny_model_dir, tmp_path):
    recipe = with_overrides(_recipe(), [("passes.0.targets", ["no-such-layer"])])
    with pytest.raises(CompressionError):
        build(str(tiny_model_dir), recipe, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_dense_tensors(tiny_model_dir, tmp_path):
    recipe = with_overrides(_recipe(), [("dtype", "bfloat16"), ("eval.enabled", False)])
    build(str(tiny_model_dir), recipe, tmp_path / "a")
    loaded = native.load_artifact(tmp_path / "a")
    assert loaded.model.model.embed_tokens.weight.dtype.is_floating_point
    assert str(loaded.model.model.embed_tokens.weight.dtype) == "torch.bfloat16"
    assert loaded.model.model.layers[0].mlp.up_proj.scales.dtype.itemsize == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eval.context": 2048, "eval.ppl_tokens": 2048}, "eval.context 2048 exceeds the model's 1024"),
        ({"eval.ppl_tokens": 10_240_000}, "eval.ppl_tokens 10240000 exceeds the"),
    ],
    ids=["context-past-positions", "window-past-the-text"],
)
def test_an_evaluation_that_cannot_run_fails_before_compression(
    tiny_model_dir, tmp_path, monkeypatch, overrides, match
):
    """Such settings used to be refused only when the evaluation started, after minutes of compression
    (GPTQ on a real model): now right after the model loads, in build and in eval --recipe alike."""
    import trtcompress.builders.compress as compress
    import trtcompress.builders.pipeline as pipeline
    from trtcompress.eval.run import evaluate_target

    def compress_model(*args, **kwargs):
        raise AssertionError("compression ran before the protocol was checked")

    monkeypatch.setattr(pipeline, "compress_model", compress_model)
    monkeypatch.setattr(compress, "compress_model", compress_model)
    recipe = with_overrides(_recipe(), list(overrides.items()))
    with pytest.raises(RecipeError, match=match):
        build(str(tiny_model_dir), recipe, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(recipe.model_dump(mode="json")))
    with pytest.raises(RecipeError, match=match):
        evaluate_target(str(tiny_model_dir), recipe_spec=str(recipe_file))


def test_the_artifact_keeps_the_models_generation_config(tiny_model_dir, tmp_path):
    """The runtime stops on the generation config's EOS ids, as HF `generate` does: an artifact built
    from a model with a generation_config.json must carry them (it used to drop the file)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    generation = {"eos_token_id": [0, 300], "bos_token_id": 0}
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    recipe = with_overrides(_recipe(), [("eval.enabled", False)])
    build(str(model_dir), recipe, tmp_path / "a")
    loaded = native.load_artifact(tmp_path / "a")
    assert loaded.model.generation_config.eos_token_id == [0, 300]
    plain = build(str(tiny_model_dir), recipe, tmp_path / "b")  # none: transformers' defaults
    assert native.load_artifact(plain.path).model.generation_config.eos_token_id in (None, 0)


def test_an_output_that_cannot_be_written_fails_before_compression(tiny_model_dir, tmp_path, monkeypatch):
    """`-o FILE/out` (or a read-only mount) used to be found out only at the rename into place, after
    the whole compression (and, with mkdtemp failing, as a traceback)."""
    import trtcompress.builders.pipeline as pipeline

    def compress_model(*args, **kwargs):
        raise AssertionError("compression ran before the output location was checked")

    monkeypatch.setattr(pipeline, "compress_model", compress_model)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ArtifactError, match="is a file"):
        build(str(tiny_model_dir), _recipe(), tmp_path / "file" / "deeper" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_force_with_failed_gates_keeps_the_previous_good_artifact(tiny_model_dir, tmp_path):
    """`--force` with a build whose gates fail used to replace a good artifact with one `serve` and
    `repo` refuse, deleting the last good build. Now OUT is kept and the failed build, still
    inspectable, goes to OUT.failed-gates (replacing an earlier failed build there); a failed_gates
    artifact in OUT is replaced as before."""
    out = tmp_path / "a"
    build(str(tiny_model_dir), _recipe(gates=["ppl_ratio <= 100"]), out)
    good = native.read_manifest(out)["checksum"]
    failing = _recipe("int3-g128-rtn", gates=["gsm8k_kl <= 0.0000001"])
    for _ in range(2):  # the second replaces the first failed build, never OUT
        result = build(str(tiny_model_dir), failing, out, force=True)
        assert not result.gates_passed and result.path == tmp_path / "a.failed-gates"
        assert native.read_manifest(result.path)["status"] == "failed_gates"
        assert native.read_manifest(out)["checksum"] == good and native.read_manifest(out)["status"] == "ok"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.failed-gates"]
    result = build(str(tiny_model_dir), failing, result.path, force=True)  # failed over failed: replaced
    assert result.path == tmp_path / "a.failed-gates"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.failed-gates"]


@pytest.mark.parametrize("kv", [None, "gear-2bit"])
def test_evaluation_leaves_the_model_as_it_was(tiny_model, kv):
    """`build` evaluates (and checks gates) before it writes the artifact, so that a build whose gates
    fail can go elsewhere: evaluating must not change a tensor, a dtype or a module of the model."""
    from trtcompress.eval.harness import evaluate
    from trtcompress.kv.config import KVCacheConfig
    from trtcompress.passes import PassContext
    from trtcompress.passes.gsq import GSQConfig, GSQPass

    model = tiny_model.model
    GSQPass(GSQConfig(bits=4, group_size=32)).apply(model, PassContext())

    def snapshot() -> dict:
        tensors = {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
        return {"tensors": tensors, "modules": [type(m).__name__ for m in model.modules()]}

    before = snapshot()
    config = TINY_EVAL.model_copy(update={"gsm8k_generate": 1, "max_new_tokens": 4})
    evaluate(
        model, tiny_model.tokenizer, config, None, model_name="tiny", recipe_name="r",
        kv=KVCacheConfig(codec=kv) if kv else None,
    )  # fmt: skip
    after = snapshot()
    assert after["modules"] == before["modules"] and after["tensors"].keys() == before["tensors"].keys()
    for name, (dtype, value) in before["tensors"].items():
        assert after["tensors"][name][0] == dtype and torch.equal(after["tensors"][name][1], value), name


def test_a_gate_that_cannot_be_measured_fails_before_the_model_loads(tmp_path):
    """`gsm8k_exact_match` with eval.gsm8k_generate 0 failed as "not measured" after the compression."""
    recipe = _recipe(gates=["gsm8k_exact_match >= 0.2"])
    with pytest.raises(RecipeError, match=r"could only fail: gsm8k_exact_match >= 0.2 .*gsm8k_generate > 0"):
        build(str(tmp_path / "no-such-model"), recipe, tmp_path / "a")  # the model is not even looked at
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ("llama", [("export.tp_size", 3)], "tp_size 3 does not divide the 4 attention heads"),
        ("llama", [("export.pp_size", 5)], "pp_size 5 exceeds the 2 decoder layers"),
        ("qwen2", [], "handles LLaMA-family models .* got 'qwen2'"),
    ],
)
def test_a_trtllm_export_the_model_rules_out_fails_before_compression(
    tiny_model_dir, tiny_qwen2_dir, tmp_path, monkeypatch, model, overrides, message
):
    """`--export trtllm --tp-size 3` on a model with 4 heads (or pp_size over the layer count, or a
    model the writer does not handle) failed only when the checkpoint was written, after the whole
    compression and evaluation."""
    import trtcompress.builders.pipeline as pipeline
    from trtcompress.checkpoints.trtllm_layout import ExportError

    def compress_model(*args, **kwargs):
        raise AssertionError("compression ran before the trtllm export was checked against the model")

    monkeypatch.setattr(pipeline, "compress_model", compress_model)
    recipe = with_overrides(_recipe(), [("export.formats", ["trtllm"]), *overrides])
    model_dir = tiny_model_dir if model == "llama" else tiny_qwen2_dir
    with pytest.raises(ExportError, match=message):
        build(str(model_dir), recipe, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_the_writer_refuses_costs_no_evaluation(tiny_model_dir, tmp_path, monkeypatch):
    """The trtllm / hf checkpoints were written after the evaluation (minutes, with the reference model):
    a layout refused only by the writer (here a partial last group for hf, which the early width check
    leaves to it where a later quantizer replaces only some of an earlier one's layers) failed after all
    of it. They are now written first."""
    from trtcompress.builders import pipeline
    from trtcompress.checkpoints.trtllm_layout import ExportError

    evaluated = []
    monkeypatch.setattr(pipeline, "evaluate_recipe", lambda *a, **k: evaluated.append(1))  # a spy
    recipe = Recipe.model_validate(
        {
            "passes": [
                {"method": "gsq", "group_size": 128},
                {"method": "gsq", "group_size": 32, "targets": ["o_proj"]},
            ],
            "calibration": {"num_samples": 4, "seq_len": 64},
            "eval": TINY_EVAL.model_dump(),
            "export": {"formats": ["native", "hf"]},
        }
    )
    with pytest.raises(ExportError, match="partial last group"):
        build(str(tiny_model_dir), recipe, tmp_path / "a")
    assert not evaluated and list(tmp_path.iterdir()) == []


def test_staged_checkpoints_join_the_artifact(tiny_model_dir, tmp_path):
    recipe = with_overrides(_recipe("int4-g32-rtn"), [("export.formats", ["native", "trtllm", "hf"])])
    build(str(tiny_model_dir), recipe, tmp_path / "a")
    manifest = native.read_manifest(tmp_path / "a")
    assert set(manifest["exports"]) == {"trtllm", "hf"}
    assert {"trtllm/config.json", "hf/hf_quant_config.json"} <= set(manifest["files"])
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging directory left
    native.load_artifact(tmp_path / "a")  # checksums of the moved files verify


def test_a_full_disk_while_staging_the_checkpoints_is_one_error(tiny_model_dir, tmp_path, monkeypatch):
    """A full disk (here a file size limit, as `ulimit -f` sets it) while the trtllm / hf checkpoints are
    staged ended `build` with the writer's traceback; now one ArtifactError naming OUT, nothing left."""
    import resource

    from trtcompress.builders import exports

    write_checkpoints = exports.write_checkpoints
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limited(*args, **kwargs):
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, hard))
        return write_checkpoints(*args, **kwargs)

    monkeypatch.setattr(exports, "write_checkpoints", limited)
    recipe = with_overrides(
        _recipe("int4-g32-rtn"), [("export.formats", ["native", "trtllm"]), ("eval.enabled", False)]
    )
    try:
        with pytest.raises(ArtifactError, match=r"a: cannot write the trtllm checkpoint \(File too large\)"):
            build(str(tiny_model_dir), recipe, tmp_path / "a")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
