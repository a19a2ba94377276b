"""HF quantized export (ModelOpt `hf_quant_config.json` layout) against ModelOpt's `export_hf_checkpoint`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints.trtllm_util import MODELOPT_MISSING, modelopt_quantize
from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints.hf_quant import write_hf_checkpoint
from trtcompress.checkpoints.trtllm_layout import ExportError
from trtcompress.recipe import Recipe


@pytest.mark.parametrize("algo", ["awq", "fp8"])
def test_matches_modelopt_hf_export(tiny_model_dir, tmp_path, algo):
    pytest.importorskip("modelopt", reason=MODELOPT_MISSING)
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from trtcompress.checkpoints.modelopt_import import import_modelopt_model

    # fp16 before exporting: ModelOpt's HF exporter quantizes in the target dtype (from fp32 weights a few
    # codes per layer land on the other side of a rounding boundary)
    model = modelopt_quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir), algo, block=32).half()
    # ModelOpt's HF export packs the weights in place: export a copy, import the original
    export_hf_checkpoint(copy.deepcopy(model), dtype=torch.float16, export_dir=tmp_path / "modelopt")
    import_modelopt_model(model, target="hf")
    write_hf_checkpoint(model, None, tmp_path / "ours")
    ref_q = json.loads((tmp_path / "modelopt/hf_quant_config.json").read_text())["quantization"]
    our_q = json.loads((tmp_path / "ours/hf_quant_config.json").read_text())["quantization"]
    assert {k: our_q[k] for k in ref_q if k != "exclude_modules"} == {
        k: v for k, v in ref_q.items() if k != "exclude_modules"
    }
    assert sorted(our_q["exclude_modules"]) == sorted(ref_q["exclude_modules"])
    ref_c = json.loads((tmp_path / "modelopt/config.json").read_text())["quantization_config"]
    our_c = json.loads((tmp_path / "ours/config.json").read_text())["quantization_config"]
    assert {k: v for k, v in our_c.items() if k != "producer"} == {
        k: v for k, v in ref_c.items() if k != "producer"
    }
    ref, ours = (
        load_file(str(tmp_path / "modelopt/model.safetensors")),
        load_file(str(tmp_path / "ours/model.safetensors")),
    )
    assert set(ours) == set(ref)
    for name, r in ref.items():
        o = ours[name]
        assert o.shape == r.shape, name
        if r.dtype in (torch.uint8, torch.float8_e4m3fn):
            assert o.dtype == r.dtype and torch.equal(o.view(torch.uint8), r.view(torch.uint8)), name
        elif name.endswith(("_scale", "scale_2")):
            assert o.dtype == r.dtype, name  # fp32 block/tensor scales, pre-quant scales in the model dtype
            torch.testing.assert_close(o, r, rtol=2**-11, atol=0, msg=name)
        else:  # dense tensors: ModelOpt 0.47 keeps fp32 under transformers 5; ours are in the export dtype
            torch.testing.assert_close(o.float(), r.float(), rtol=2**-10, atol=1e-6, msg=name)


def test_partial_group_refused_for_hf(tiny_model, tmp_path):
    recipe = Recipe.model_validate(
        {"passes": [{"method": "gsq", "bits": 4, "group_size": 64, "exclude": ["lm_head"]}]}
    )
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    with pytest.raises(ExportError, match="partial last group"):
        write_hf_checkpoint(tiny_model.model, tiny_model.tokenizer, tmp_path / "hf")


def test_asymmetric_int4_refused_for_hf(tiny_model, tmp_path):
    """ModelOpt's HF W4A16_AWQ has no zero-point tensor: writing it would silently drop the zero points."""
    recipe = Recipe.model_validate(
        {
            "passes": [
                {"method": "gsq", "bits": 4, "group_size": 32, "symmetric": False, "exclude": ["lm_head"]}
            ]
        }
    )
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    with pytest.raises(ExportError, match="zero points"):
        write_hf_checkpoint(tiny_model.model, tiny_model.tokenizer, tmp_path / "hf")


def test_rtn_int4_hf_layout(tiny_model, tmp_path):
    recipe = Recipe.model_validate(
        {"passes": [{"method": "gsq", "bits": 4, "group_size": 32, "exclude": ["lm_head"]}]}
    )
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    quant = write_hf_checkpoint(tiny_model.model, tiny_model.tokenizer, tmp_path / "hf")
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 32
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (48, 160)
    assert torch.equal(tensors["model.layers.0.mlp.down_proj.pre_quant_scale"], torch.ones(160))
    assert (tmp_path / "hf/tokenizer.json").is_file()


def test_weight_only_nvfp4_is_w4a16_nvfp4(tiny_model, tmp_path):
    recipe = Recipe.model_validate({"passes": [{"method": "nvfp4", "exclude": ["lm_head"]}]})
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    quant = write_hf_checkpoint(tiny_model.model, None, tmp_path / "hf")
    assert quant["quant_algo"] == "W4A16_NVFP4" and quant["group_size"] == 16
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    p = "model.layers.1.self_attn.o_proj"
    assert tensors[f"{p}.weight"].shape == (96, 48) and tensors[f"{p}.weight"].dtype == torch.uint8
    assert tensors[f"{p}.weight_scale"].dtype == torch.float8_e4m3fn and f"{p}.input_scale" not in tensors
    config = json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]
    assert "input_activations" not in config["config_groups"]["group_0"]
    from trtcompress.compressed.linear import linear_state

    state = linear_state(tiny_model.model.model.layers[1].self_attn.o_proj)
    assert torch.equal(tensors[f"{p}.weight"], state.quantized.qweight)
    for fused in (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ):
        scales = [tensors[f"model.layers.1.{name}.weight_scale_2"] for name in fused]
        assert all(torch.equal(s, scales[0]) for s in scales)  # one GEMM, one weight_scale_2


def _nvfp4_llama(intermediate: int, tensor_amax: torch.Tensor | None, k_factor: float = 1.0):
    """A one-layer LLaMA whose linears are NVFP4, each quantized on its own (`tensor_amax`: shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trtcompress.compressed.formats import NVFP4
    from trtcompress.compressed.linear import CompressedLinear, set_module
    from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    model = LlamaForCausalLM(config)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach() * (k_factor if "k_proj" in name else 1.0)
            q = QuantizedWeight.round_to_nearest(weight, NVFP4, tensor_amax=tensor_amax)
            state = CompressedLinearState(module.out_features, module.in_features, q)
            set_module(model.model.layers, name, CompressedLinear(state))
    return model


def test_nvfp4_layers_fused_with_different_tensor_scales_are_refused(tmp_path):
    """Quantized one by one (an artifact of an older nvfp4 pass), q/k/v hold different weight_scale_2:
    TensorRT-LLM asserts they are equal, vLLM took the max and read k_proj wrong; refused, naming them."""
    model = _nvfp4_llama(64, None, k_factor=2.0)
    with pytest.raises(ExportError, match=r"after input_layernorm have different tensor scales"):
        write_hf_checkpoint(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_partial_nvfp4_block_refused_for_hf(tmp_path):
    """72 inputs = 4.5 NVFP4 blocks: the HF layout's `weight_scale` is (out, in/16), which cannot hold it."""
    # one tensor scale for all (as the nvfp4 pass gives fused layers), so the blocks are the issue
    model = _nvfp4_llama(72, torch.tensor(1.0))
    with pytest.raises(ExportError, match="partial last group"):
        write_hf_checkpoint(model, None, tmp_path / "hf")


def test_fp8_kv_cache_scales_in_the_hf_layout(tiny_model, tmp_path):
    from trtcompress.checkpoints.trtllm import kv_cache_scales

    ids = tiny_model.tokenizer("The capital of France is Paris. " * 8, return_tensors="pt").input_ids
    scales = kv_cache_scales(tiny_model.model, ids, "FP8")
    quant = write_hf_checkpoint(
        tiny_model.model, None, tmp_path / "hf", kv_cache="fp8", kv_cache_scales=scales
    )
    assert quant["kv_cache_quant_algo"] == "FP8" and quant["quant_algo"] is None
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    for i in range(2):  # ModelOpt's names: amax / 448 per attention, fp32 scalars
        for name in (
            f"model.layers.{i}.self_attn.k_proj.k_scale",
            f"model.layers.{i}.self_attn.v_proj.v_scale",
        ):
            assert tensors[name].dtype == torch.float32 and tensors[name].shape == ()
            assert tensors[name].item() == pytest.approx(scales[i])
    config = json.loads((tmp_path / "hf/config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert "quant_algo" not in config and config["quant_method"] == "modelopt"
    for codec in ("int8", "gear-2bit"):
        with pytest.raises(ExportError, match="FP8 KV-cache scales only"):
            write_hf_checkpoint(tiny_model.model, None, tmp_path / codec, kv_cache=codec)
        assert not (tmp_path / codec).exists()


def test_qwen2_biases_are_in_the_hf_checkpoint(tiny_qwen2_dir, tmp_path):
    """Qwen2's q/k/v projections have biases: the HF layout must carry them (they were dropped, and the
    checkpoint computed another model), for quantized and dense linears alike."""
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_qwen2_dir), log=print)
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(
                    0, 0.5, generator=torch.Generator().manual_seed(1)
                )
    # layer 1's q/k/v quantized, layer 0's dense (a fused group is quantized whole or not at all)
    exclude = ["lm_head", "re:layers\\.0\\.self_attn"]
    recipe = Recipe.model_validate(
        {"passes": [{"method": "gsq", "bits": 4, "group_size": 32, "exclude": exclude}]}
    )
    compress_model(loaded.model, loaded.tokenizer, recipe)
    write_hf_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    for layer in (0, 1):
        for name in ("q_proj", "k_proj", "v_proj"):
            stored = tensors[f"model.layers.{layer}.self_attn.{name}.bias"].float()
            expected = getattr(loaded.model.model.layers[layer].self_attn, name).bias.float()
            torch.testing.assert_close(stored, expected, atol=1e-3, rtol=1e-3)  # fp16


def _set_int4(layer, name, group_size, pre_quant_scale=None):
    from trtcompress.compressed.formats import IntFormat
    from trtcompress.compressed.linear import CompressedLinear, set_module
    from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight

    linear = layer.get_submodule(name)
    weight = linear.weight.detach().float()
    if pre_quant_scale is not None:  # y = (x * s) @ W'ᵀ with W' = W / s: the same layer
        weight = weight / pre_quant_scale.float()
    q = QuantizedWeight.round_to_nearest(weight, IntFormat(4, group_size, True))
    state = CompressedLinearState(linear.out_features, linear.in_features, q, pre_quant_scale=pre_quant_scale)
    set_module(layer, name, CompressedLinear(state))


@pytest.mark.parametrize(
    ("quantized", "dense"),
    [
        (("self_attn.q_proj", "self_attn.v_proj"), "self_attn.k_proj"),
        (("mlp.gate_proj",), "mlp.up_proj"),
    ],
)
def test_partly_quantized_fused_group_is_refused(tiny_model, tmp_path, quantized, dense):
    """q/k/v and gate/up are one fused linear of one precision in TensorRT-LLM's PyTorch backend and vLLM:
    vLLM raises "Detected some but not all shards ... are quantized", TensorRT-LLM makes the fused linear
    dense when a member is excluded and cannot load the packed ones. With k_proj dense beside quantized
    q/v (with a pre-quant scale folded into the norm) the checkpoint was written, and no loader took it."""
    model = tiny_model.model
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        width = layer.get_submodule(quantized[0]).in_features
        pqs = (torch.rand(width, generator=gen) + 0.5).half()
        for name in quantized:
            _set_int4(layer, name, 32, pqs)
    with pytest.raises(ExportError, match=rf"model.layers.0: .*quantized but {dense} dense.*one fused"):
        write_hf_checkpoint(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_group_size_is_the_one_of_every_int4_layer(tiny_model, tmp_path):
    """The config has one group_size: several are refused (the last one seen was written, and the other
    layers' weight_scale did not match it); with only o_proj/down_proj quantized it is theirs, not null."""
    model = tiny_model.model
    for layer in model.model.layers:
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            _set_int4(layer, name, 32)
    quant = write_hf_checkpoint(model, None, tmp_path / "hf")
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 32
    for layer in model.model.layers:
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            _set_int4(layer, name, 16)
    with pytest.raises(ExportError, match=r"several group sizes \[16, 32\]"):
        write_hf_checkpoint(model, None, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize(
    ("target", "disabled", "fragment"),
    [
        ("trtllm", "k_proj", "self_attn.q_proj int4_awq, self_attn.k_proj none"),
        ("hf", "up_proj", "mlp.gate_proj int4_awq, mlp.up_proj none"),
    ],
)
def test_modelopt_fused_group_of_mixed_formats_is_refused_before_anything_changes(
    tiny_model_dir, target, disabled, fragment
):
    """ModelOpt INT4_AWQ with one member of layer 1's q/k/v (gate/up) left unquantized: the importer
    replaced layer 0, then ModelOpt's fusion preprocessing failed with a bare AssertionError ("Modules
    have different quantization formats"), leaving a half-imported model."""
    mtq = pytest.importorskip("modelopt.torch.quantization", reason=MODELOPT_MISSING)
    from transformers import AutoModelForCausalLM

    from trtcompress.checkpoints.modelopt_import import import_modelopt_model

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = 32
    cfg["quant_cfg"].append({"quantizer_name": f"*layers.1.*{disabled}*", "enable": False})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, cfg, lambda m: m(input_ids=ids))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=rf"layer 1: {fragment}.*one quantization format"):
        import_modelopt_model(model, target=target)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_rotary_settings_are_under_the_names_transformers_4_reads(tmp_path):
    """transformers 5 writes theta and scaling only inside `rope_parameters`; the loaders of this layout
    on transformers 4 (TensorRT-LLM 1.2's LLM API pins 4.57) read `rope_theta` / `rope_scaling`, and
    silently ran a Llama-3.1 config with theta 10000 and no scaling. Both spellings are written, and
    transformers 5 reads the same rotary settings back."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, rope_theta=500000.0, rope_scaling=dict(rope),  # (a copy: it adds rope_theta)
    )  # fmt: skip
    write_hf_checkpoint(LlamaForCausalLM(config), None, tmp_path / "hf")
    written = json.loads((tmp_path / "hf/config.json").read_text())
    assert written["rope_theta"] == 500000.0
    assert written["rope_scaling"] == rope
    assert AutoConfig.from_pretrained(tmp_path / "hf").rope_parameters == config.rope_parameters
    plain = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, rope_theta=100000.0)  # fmt: skip
    write_hf_checkpoint(LlamaForCausalLM(plain), None, tmp_path / "plain")
    written = json.loads((tmp_path / "plain/config.json").read_text())
    assert written["rope_theta"] == 100000.0 and written.get("rope_scaling") is None
