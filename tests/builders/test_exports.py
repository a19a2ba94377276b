"""`trtcompress build --export trtllm/hf [--tp-size N] [--engine]` on the tiny model: the extra formats
join the atomic artifact and its checksums; `--engine` without TensorRT-LLM stops before any work and
names the container image to use."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli
from trtcompress.builders import engine
from trtcompress.builders.exports import check_recipe
from trtcompress.errors import ArtifactError, MissingDependencyError, RecipeError
from trtcompress.recipe import EngineConfig, Recipe

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def test_cli_exports_trtllm_tp2_and_hf_into_the_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "a"
    recipe = tmp_path / "g16.yaml"  # group 16: whole groups in each rank's half of the 96 / 160 inputs
    recipe.write_text("passes:\n  - {method: gsq, bits: 4, group_size: 16, exclude: [lm_head]}\n")
    result = run_cli(
        "build", str(tiny_model_dir), "--recipe", str(recipe), "-o", str(out), "--export", "trtllm",
        "--export", "hf", "--tp-size", "2", "--no-eval", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    exports = manifest["exports"]
    assert exports["trtllm"]["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert exports["trtllm"]["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert exports["hf"]["quant_algo"] == "W4A16_AWQ" and exports["hf"]["group_size"] == 16
    assert manifest["recipe"]["export"]["formats"] == ["native", "trtllm", "hf"]
    for rel in ("trtllm/config.json", "trtllm/rank0.safetensors", "trtllm/rank1.safetensors",
                "hf/model.safetensors", "hf/hf_quant_config.json"):  # fmt: skip
        assert rel in manifest["files"], rel  # checksummed like the native shards
    rank1 = load_file(str(out / "trtllm/rank1.safetensors"))
    # rank 1: 2 q heads + 1 k + 1 v head of 24 = 96 rows, padded like TensorRT-LLM's group-wise layers to
    # 128 rows x 128 inputs (max(64, group) * tp), two int4 rows per int8
    assert rank1["transformer.layers.0.attention.qkv.weight"].shape == (128 // 2, 128)
    verify = run_cli("inspect", str(out))  # the reader verifies every checksum, the export files included
    assert verify.returncode == 0, verify.stderr


@pytest.mark.skipif(HAS_TRTLLM, reason="TensorRT-LLM is installed here")
@pytest.mark.parametrize("how", ["flag", "recipe"])
def test_engine_without_trtllm_stops_before_any_work(tiny_model_dir, tmp_path, how):
    out = tmp_path / "a"
    if how == "flag":
        args = ["--engine"]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("export:\n  engine:\n    enabled: true\n    max_batch_size: 4\n")
        args = ["--recipe", str(recipe)]
    result = run_cli("build", str(tiny_model_dir), "-o", str(out), *args)
    assert result.returncode == MissingDependencyError.exit_code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert engine.NGC_IMAGE in lines[0] and "TensorRT-LLM 1.2.1" in lines[0]
    assert "loading" not in result.stdout + result.stderr  # stopped before loading the model
    assert not out.exists() and not list(tmp_path.glob(".partial-*"))


def test_engine_in_recipe_asks_for_the_checkpoint():
    recipe = Recipe.model_validate({"export": {"engine": {"enabled": True}}})
    assert recipe.export.formats == ["native", "trtllm"]


def _config(quant_algo=None, group=None, plugins=None, world=1):
    return {"mapping": {"world_size": world, "tp_size": world, "pp_size": 1},
            "quantization": {"quant_algo": quant_algo, "group_size": group},
            "trtcompress": {"plugins": plugins or {}}}  # fmt: skip


def test_trtllm_build_args_come_from_the_recipe(tmp_path):
    cfg = EngineConfig(enabled=True, max_batch_size=16, max_num_tokens=2048, workers=4)
    args = engine.trtllm_build_args(tmp_path / "ckpt", tmp_path / "eng", cfg, _config(world=2))
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[0] == "trtllm-build"
    assert flags["--checkpoint_dir"] == str(tmp_path / "ckpt") and flags["--output_dir"] == str(
        tmp_path / "eng"
    )
    assert (flags["--max_batch_size"], flags["--max_num_tokens"]) == ("16", "2048")
    assert flags["--kv_cache_type"] == "paged" and flags["--use_paged_context_fmha"] == "enable"
    assert flags["--workers"] == "2"  # no more workers than ranks
    # trtllm-build 1.2.1 defaults --use_paged_context_fmha to enable: a cache that is not paged says disable
    for kv in ("continuous", "disabled"):
        args = engine.trtllm_build_args(tmp_path, tmp_path, EngineConfig(kv_cache_type=kv), _config())
        assert dict(zip(args[1::2], args[2::2], strict=True))["--use_paged_context_fmha"] == "disable"
    args = engine.trtllm_build_args(tmp_path, tmp_path, EngineConfig(use_paged_context_fmha=False), _config())
    assert dict(zip(args[1::2], args[2::2], strict=True))["--use_paged_context_fmha"] == "disable"


# `trtllm-build` options of TensorRT-LLM 1.2.1, transcribed from tensorrt_llm/commands/build.py
# (parse_arguments) and tensorrt_llm/plugin/plugin.py (cli_plugin_args): the subset a LLaMA build may use.
# Removed / renamed spellings (--max_output_len, --use_custom_all_reduce, --context_fmha_fp32_acc,
# --strongly_typed, --paged_kv_cache as a plugin flag) must never appear.
TRTLLM_BUILD_OPTIONS = {
    "--checkpoint_dir", "--model_config", "--build_config", "--output_dir", "--max_batch_size",
    "--max_input_len", "--max_seq_len", "--max_beam_width", "--max_num_tokens", "--opt_num_tokens",
    "--kv_cache_type", "--workers", "--log_level", "--weight_sparsity", "--logits_dtype",
    "--gpt_attention_plugin", "--gemm_plugin", "--nccl_plugin", "--context_fmha", "--remove_input_padding",
    "--tokens_per_block", "--use_paged_context_fmha", "--use_fp8_context_fmha", "--multiple_profiles",
    "--use_fused_mlp", "--reduce_fusion",
}  # fmt: skip
TRTLLM_KV_CACHE_TYPES = {"continuous", "paged", "disabled"}  # KVCacheTypeFromString, case-insensitive


@pytest.mark.parametrize(
    "cfg",
    [EngineConfig(enabled=True), EngineConfig(kv_cache_type="continuous", use_paged_context_fmha=False)]
    + [EngineConfig(gemm_plugin=g) for g in engine.GEMM_PLUGIN_CHOICES]
    + [EngineConfig(gpt_attention_plugin=a) for a in engine.ATTENTION_PLUGIN_CHOICES],
)
def test_trtllm_build_args_are_options_of_the_pinned_trtllm_build(tmp_path, cfg):
    args = engine.trtllm_build_args(tmp_path, tmp_path, cfg, _config(world=3))
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert set(flags) <= TRTLLM_BUILD_OPTIONS
    assert flags["--kv_cache_type"] in TRTLLM_KV_CACHE_TYPES
    assert flags["--gemm_plugin"] in engine.GEMM_PLUGIN_CHOICES
    assert flags["--gpt_attention_plugin"] in engine.ATTENTION_PLUGIN_CHOICES
    assert flags["--use_paged_context_fmha"] in ("enable", "disable")


def test_checkpoints_stock_trtllm_build_cannot_build_are_refused():
    engine.check_buildable(_config("W4A16_AWQ", 128))
    engine.check_buildable(_config("FP8"))
    # TensorRT-LLM's TensorRT path has no MXFP4 linear (quantization/quantize.py: quantize()).
    with pytest.raises(ArtifactError, match=r"W4A16_MXFP4.*PyTorch backend"):
        engine.check_buildable(_config("W4A16_MXFP4"))
    with pytest.raises(ArtifactError, match=r"trtcompress::gear_attention.*stock trtllm-build"):
        engine.check_buildable(_config(plugins={"trtcompress::gear_attention": {"codec": "gear-2bit"}}))
    with pytest.raises(ArtifactError, match="group size 64 or 128"):
        engine.check_buildable(_config("W4A16_AWQ", 32))


@pytest.mark.skipif(HAS_TRTLLM, reason="TensorRT-LLM is installed here")
def test_require_trtllm_names_the_container():
    with pytest.raises(MissingDependencyError, match=r"nvcr\.io/nvidia/tritonserver:"):
        engine.require_trtllm()


def test_engine_triton_repository_points_where_the_artifact_will_be(tmp_path):
    from trtcompress.triton_models.pbtxt import validate_repository

    building, final = tmp_path / ".partial-x", tmp_path / "artifact"
    repo = engine.fill_triton_repository(building, final, log=lambda m: None)
    assert repo == building / "triton" / "trtllm"
    configs = validate_repository(repo)
    assert set(configs) >= {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble"}
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert str(final / "engine") in text and ".partial-x" not in text


@pytest.mark.parametrize(
    ("cfg", "chunked"),
    [
        (EngineConfig(enabled=True), "true"),
        (EngineConfig(enabled=True, use_paged_context_fmha=False), "false"),
        (EngineConfig(enabled=True, kv_cache_type="continuous"), "false"),
    ],
)
def test_engine_repository_chunks_only_what_the_engine_can(tmp_path, cfg, chunked):
    """TensorRT-LLM's executor refuses enable_chunked_context on an engine without paged context FMHA
    (TLLM_CHECK "Chunked context requires context FMHA, paged kv_cache and paged context FMHA" in
    batch_manager/trtGptModelInflightBatching.cpp): the repository must not ask for it then."""
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.triton_models.pbtxt import validate_repository

    deploy = DeployConfig(enable_chunked_context=True)
    repo = engine.fill_triton_repository(tmp_path / "b", tmp_path / "a", deploy, lambda m: None, engine=cfg)
    params = validate_repository(repo)["tensorrt_llm"].parameters
    assert params["enable_chunked_context"].string_value == chunked


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"passes": [{"method": "nvfp4"}], "export": {"formats": ["trtllm"]}}, "weight-only"),
        ({"passes": [{"method": "gsq"}, {"method": "eora", "rank": 8}], "export": {"formats": ["hf"]}},
         "low-rank correction factors"),
        ({"kv_cache": {"codec": "int8"}, "export": {"formats": ["hf"]}}, "FP8 KV-cache scales only"),
        ({"passes": [{"method": "minmax-fp4"}], "export": {"engine": {"enabled": True}}},
         "stock trtllm-build"),
        ({"passes": [{"method": "llmfp4"}], "export": {"formats": ["trtllm"]}},
         "passes.0.shared_weight_format: true"),
        ({"kv_cache": {"codec": "gear-2bit"}, "export": {"engine": {"enabled": True}}}, "gear-2bit"),
        ({"passes": [{"method": "mxfp4"}], "export": {"engine": {"enabled": True}}}, "W4A16_MXFP4"),
        ({"export": {"engine": {"enabled": True, "gemm_plugin": "fp16"}}}, "gemm_plugin 'fp16'"),
        ({"export": {"engine": {"enabled": True, "gpt_attention_plugin": "fp8"}}}, "gpt_attention_plugin"),
    ],
)  # fmt: skip
def test_impossible_exports_are_refused_before_any_work(data, fragment):
    with pytest.raises(RecipeError, match=fragment):
        check_recipe(Recipe.model_validate(data))
    check_recipe(Recipe.model_validate({"passes": [{"method": "mxfp4"}], "export": {"formats": ["trtllm"]}}))
    # one searched format: every linear has it, so q/k/v share it without shared_weight_format
    one_format = {"method": "llmfp4", "formats": ["e2m1"]}
    check_recipe(Recipe.model_validate({"passes": [one_format], "export": {"formats": ["trtllm"]}}))


WEIGHT_PASSES = [
    {"method": "gsq", "bits": bits, "group_size": group, "symmetric": sym}
    for bits, group, sym in [(4, 32, True), (4, 32, False), (3, 32, True), (8, 32, True), (4, 0, True),
                             (4, 0, False), (8, 0, True), (2, 0, True)]
] + [{"method": "mxfp4"}, {"method": "nvfp4"}]  # fmt: skip


@pytest.mark.parametrize("export", ["trtllm", "hf"])
@pytest.mark.parametrize("spec", WEIGHT_PASSES, ids=lambda p: "-".join(map(str, p.values())))
def test_the_early_weight_format_check_agrees_with_the_writers(tiny_model_dir, tmp_path, spec, export):
    """check_recipe refuses a pass's weight format before any work exactly when the writer would refuse
    the compressed model (widths 96/160 hold whole groups of 32, so only the format decides)."""
    from trtcompress.builders.compress import compress_model
    from trtcompress.checkpoints.hf_quant import write_hf_checkpoint
    from trtcompress.checkpoints.trtllm import write_trtllm_checkpoint
    from trtcompress.checkpoints.trtllm_layout import ExportError
    from trtcompress.models import load_model

    recipe = Recipe.model_validate({"passes": [spec], "export": {"formats": [export]}})
    try:
        check_recipe(recipe)
        early = None
    except RecipeError as exc:
        early = str(exc)
    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    compress_model(loaded.model, loaded.tokenizer, recipe)
    write = write_trtllm_checkpoint if export == "trtllm" else write_hf_checkpoint
    args = (loaded.model,) if export == "trtllm" else (loaded.model, loaded.tokenizer)
    try:
        write(*args, tmp_path / "out")
        late = None
    except ExportError as exc:
        late = str(exc)
    assert (early is None) == (late is None), (early, late)


def test_only_the_last_weight_quantizer_is_held_to_the_export():
    """An earlier quantizer's format may be replaced by a later one's (int3 then int4 exports)."""
    int3 = {"method": "gsq", "bits": 3}
    check_recipe(Recipe.model_validate({"passes": [int3, {"method": "gsq"}], "export": {"formats": ["hf"]}}))
    with pytest.raises(RecipeError, match=r"passes\.1 \(gsq\).*int3"):
        check_recipe(
            Recipe.model_validate({"passes": [{"method": "gsq"}, int3], "export": {"formats": ["trtllm"]}})
        )
    weight_only = {"method": "llmfp4", "quantize_activations": False, "formats": ["e2m1"]}
    with pytest.raises(RecipeError, match="quantize_activations: false"):
        check_recipe(Recipe.model_validate({"passes": [weight_only], "export": {"formats": ["trtllm"]}}))


def test_pipeline_refuses_an_impossible_export_without_loading(tiny_model_dir, tmp_path):
    from trtcompress.builders.pipeline import build

    recipe = Recipe.model_validate({"passes": [{"method": "nvfp4"}], "export": {"formats": ["trtllm"]}})
    with pytest.raises(RecipeError, match="weight-only"):
        build(str(tiny_model_dir), recipe, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def _width_models(tiny_model_dir, tmp_path_factory):
    """Models whose widths decide a layout: the tiny model (96 / 160, partial groups of 64 and 128; a tp
    split of o_proj at 48 and of down_proj at 80), one of width 80 (not whole MXFP4 blocks of 32), and the
    tiny model with o_proj / down_proj weights of one magnitude, whose every row part reaches the
    largest int8 / int4 code (TensorRT-LLM's per-shard re-quantization gives back the same codes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.conftest import make_tiny_model_dir
    from trtcompress.models import load_model

    path = tmp_path_factory.getbasetemp() / "tiny-w80"
    if not (path / "config.json").is_file():
        make_tiny_model_dir(path)
        config = AutoConfig.from_pretrained(path)
        config.hidden_size, config.head_dim = 80, 20
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    one_magnitude = load_model(str(tiny_model_dir), log=lambda m: None)
    with torch.no_grad():
        for layer in one_magnitude.model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.copy_(linear.weight.sign() * 0.01)
    return {
        "w96": lambda: load_model(str(tiny_model_dir), log=lambda m: None),
        "w80": lambda: load_model(str(path), log=lambda m: None),
        "one-magnitude": lambda: one_magnitude,
    }


GSQ4 = {"method": "gsq", "bits": 4}
WIDTH_PASSES = [
    {"method": "gsq", "bits": 4, "group_size": g} for g in (16, 32, 64, 128)
] + [
    {"method": "gsq", "bits": 4, "group_size": 128, "exclude": ["lm_head", "o_proj", "down_proj"]},
    # a fused group (q/k/v; gate/up for hf) quantized in part: no loader takes it
    {"method": "gsq", "bits": 4, "group_size": 16, "exclude": ["lm_head", "v_proj"]},
    {"method": "nvfp4", "exclude": ["lm_head", "up_proj"]},
    {"method": "gsq", "bits": 8, "group_size": 0},
    {"method": "gsq", "bits": 4, "group_size": 0},
    {"method": "mxfp4"},
    {"method": "nvfp4"},
    # structured pruning first: the widths the quantizer sees are the pruned ones (o_proj 48 inputs with
    # half the KV groups of the tiny model, down_proj 80 with half its FFN channels in multiples of 16)
    [{"method": "structured", "ffn_ratio": 0, "head_ratio": 0.5}, {"method": "mxfp4"}],
    [{"method": "structured", "ffn_ratio": 0.5, "round_to": 16}, {"method": "mxfp4"}],
    [{"method": "structured", "ffn_ratio": 0.5, "round_to": 16}, GSQ4 | {"group_size": 32}],
    [{"method": "structured", "ffn_ratio": 0.2, "round_to": 64}, GSQ4 | {"group_size": 64}],
]  # fmt: skip


def _width_id(spec) -> str:
    if isinstance(spec, list):
        return "+".join(_width_id(p) for p in spec)
    return "-".join("no-" + "-".join(v[1:]) if isinstance(v, list) else str(v) for v in spec.values())


@pytest.mark.parametrize("export", ["hf", "trtllm", "trtllm-tp2"])
@pytest.mark.parametrize(
    "spec",
    WIDTH_PASSES,
    ids=_width_id,
)
def test_the_early_model_checks_agree_with_the_writers(tiny_model_dir, tmp_path_factory, spec, export):
    """check_recipe + check_model (widths: partial groups for hf, tp splits inside a group, MXFP4 blocks;
    per-shard re-quantization of a data-free per-channel int8 / int4 recipe) refuse before any work
    exactly when the writer would refuse the compressed model: `int4-g128-rtn --export hf` on a 96-wide
    model, or `int8-rtn --export trtllm --tp-size 2`, failed only after the compression and evaluation."""
    from trtcompress.builders.compress import compress_model
    from trtcompress.builders.exports import check_model
    from trtcompress.checkpoints.hf_quant import write_hf_checkpoint
    from trtcompress.checkpoints.trtllm import TrtllmOptions, write_trtllm_checkpoint
    from trtcompress.checkpoints.trtllm_layout import ExportError

    tp = 2 if export == "trtllm-tp2" else 1
    fmt = export.split("-")[0]
    passes = spec if isinstance(spec, list) else [spec]
    recipe = Recipe.model_validate({"passes": passes, "export": {"formats": [fmt], "tp_size": tp}})
    for label, load in _width_models(tiny_model_dir, tmp_path_factory).items():
        loaded = load()
        try:
            check_recipe(recipe)
            check_model(recipe, loaded.model)
            early = None
        except RecipeError as exc:
            early = str(exc)
        compress_model(loaded.model, loaded.tokenizer, recipe)
        out = tmp_path_factory.mktemp("export")
        try:
            if fmt == "hf":
                write_hf_checkpoint(loaded.model, loaded.tokenizer, out)
            else:
                write_trtllm_checkpoint(loaded.model, out, TrtllmOptions(tp_size=tp))
            late = None
        except ExportError as exc:
            late = str(exc)
        assert (early is None) == (late is None), (label, early, late)


@pytest.mark.parametrize(
    ("preset", "args", "fragment"),
    [
        ("int4-g128-rtn", ["--export", "hf"], "partial last group"),
        ("int4-g64-rtn", ["--export", "trtllm", "--tp-size", "2"], "inside a quantization group of 64"),
        ("int8-rtn", ["--export", "trtllm", "--tp-size", "2", "--set", "gates=[]"], "re-quantizes"),
    ],
)
def test_width_refusals_come_before_the_compression(tiny_model_dir, tmp_path, preset, args, fragment):
    """Through the CLI: exit 2, one error line, no progress and no OUT (they failed after the build)."""
    out = tmp_path / "a"
    result = run_cli("build", str(tiny_model_dir), "-r", preset, "-o", str(out), "--no-eval", *args)
    assert result.returncode == RecipeError.exit_code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert not any("error" in line or "gsq" in line for line in lines[:-1]), result.stderr  # no progress
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_sliding_window_shorter_than_the_engines_sequences_is_refused(tmp_path):
    """A Mistral with a sliding window exported to trtllm: the checkpoint cannot carry the window and an
    engine of longer sequences attends to every token (found by the model-family audit)."""
    from tests.conftest import make_tiny_model_dir
    from trtcompress.builders.exports import check_model
    from trtcompress.models import load_model

    path = make_tiny_model_dir(tmp_path / "mistral", model_type="mistral")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 16}), encoding="utf-8")
    model = load_model(str(path), log=lambda m: None).model
    recipe = Recipe.model_validate({"export": {"formats": ["trtllm"]}})
    with pytest.raises(RecipeError, match=r"sliding window of 16 tokens.*max_seq_len <= 16"):
        check_model(recipe, model)
    short = {"formats": ["trtllm"], "engine": {"max_seq_len": 16}}
    check_model(Recipe.model_validate({"export": short}), model)
    check_model(Recipe.model_validate({"export": {"formats": ["hf"]}}), model)  # its config keeps the window


def test_export_dtype_auto_follows_the_source_checkpoint(tiny_model_dir, tmp_path):
    """`export.dtype: auto` (the default): a bf16 source exports bf16 (a fixed float16 default turned
    Llama-3's bf16 weights into fp16, whose range its activations may overflow), an fp32 one float16;
    the manifest records the dtype written, and an explicit dtype wins."""
    import torch

    from trtcompress.builders.pipeline import build
    from trtcompress.checkpoints import native
    from trtcompress.models import load_model

    bf16 = tmp_path / "bf16"
    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    loaded.model.to(torch.bfloat16).save_pretrained(bf16)
    loaded.tokenizer.save_pretrained(bf16)
    base = {"passes": [{"method": "gsq", "bits": 4, "group_size": 32}], "eval": {"enabled": False}}
    for source, dtype, expected in (
        (bf16, "auto", "bfloat16"), (tiny_model_dir, "auto", "float16"), (bf16, "float16", "float16"),
    ):  # fmt: skip
        recipe = Recipe.model_validate({**base, "export": {"formats": ["trtllm", "hf"], "dtype": dtype}})
        out = tmp_path / f"{source.name}-{dtype}"
        build(str(source), recipe, out)
        assert native.read_manifest(out)["recipe"]["export"]["dtype"] == expected
        assert json.loads((out / "trtllm" / "config.json").read_text(encoding="utf-8"))["dtype"] == expected
        assert json.loads((out / "hf" / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == expected


def test_the_tp_geometry_check_sees_the_heads_structured_pruning_leaves(tiny_model):
    """4 heads / 2 KV heads, half the KV groups pruned: tp 4 passed the early check (on 4 heads) and the
    writer refused it (2 heads) once the model was compressed (found reviewing the pass-chain audit)."""
    from trtcompress.builders.exports import check_model
    from trtcompress.checkpoints.trtllm_layout import ExportError

    pruned = {"passes": [{"method": "structured", "ffn_ratio": 0, "head_ratio": 0.5}]}
    with pytest.raises(ExportError, match="tp_size 4 does not divide the 2 attention heads"):
        check_model(
            Recipe.model_validate({**pruned, "export": {"formats": ["trtllm"], "tp_size": 4}}),
            tiny_model.model,
        )
    check_model(
        Recipe.model_validate({**pruned, "export": {"formats": ["trtllm"], "tp_size": 2}}), tiny_model.model
    )
    assert tiny_model.model.config.num_attention_heads == 4  # (a copy of the config was pruned)
