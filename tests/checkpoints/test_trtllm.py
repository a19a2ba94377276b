"""TensorRT-LLM checkpoint writer on the tiny random LLaMA (4 heads, 2 KV heads, widths 96/160, 2 layers)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints.trtllm_util import (
    MODELOPT_MISSING,
    assert_same_checkpoint,
    modelopt_export,
    modelopt_quantize,
)
from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints.trtllm import TrtllmOptions, kv_cache_scales, write_trtllm_checkpoint
from trtcompress.checkpoints.trtllm_layout import ExportError, requantized_codes, unpack_int4_rows
from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import NVFP4, IntFormat
from trtcompress.compressed.linear import CompressedLinear, linear_state, set_module
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.recipe import Recipe

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _compressed(tiny_model, **gsq):
    recipe = Recipe.model_validate({"passes": [{"method": "gsq", "exclude": ["lm_head"], **gsq}]})
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    return tiny_model.model


def _write(model, path, **options):
    config = write_trtllm_checkpoint(model, path, TrtllmOptions(**options))
    world = config["mapping"]["world_size"]
    return config, [load_file(str(path / f"rank{r}.safetensors")) for r in range(world)]


def _dequant_awq(tensors, prefix, shape):
    """(out, in) float weight of a W4A16_AWQ tensor group (with or without `zero`), padding trimmed."""
    signed = unpack_int4_rows(tensors[f"{prefix}.weight"]).float()
    scales = tensors[f"{prefix}.weights_scaling_factor"].float()
    group = signed.shape[1] // scales.shape[1]
    idx = torch.arange(signed.shape[1]) // group
    w = signed * scales[:, idx]
    if f"{prefix}.zero" in tensors:
        w = w + tensors[f"{prefix}.zero"].float().T[:, idx]  # stored (in/group, out), as TRT-LLM's layer
    return w[: shape[0], : shape[1]]


# ------------------------------------------------------------------------------- conformance (ModelOpt)


@pytest.mark.parametrize("algo", ["none", "awq", "fp8"])
def test_matches_modelopt_tiny(tiny_model_dir, tmp_path, algo):
    """Same quantization (ModelOpt's), exported by ModelOpt and by us: identical checkpoints at TP 1 and 2."""
    pytest.importorskip("modelopt", reason=MODELOPT_MISSING)
    from transformers import AutoModelForCausalLM

    from trtcompress.checkpoints.modelopt_import import import_modelopt_model

    model = modelopt_quantize(AutoModelForCausalLM.from_pretrained(tiny_model_dir), algo, block=16)
    # Import a copy taken before ModelOpt's exporter ran: it fuses scales in place (FP8 gate/up), which
    # hid an importer that did not.
    fresh = copy.deepcopy(model)
    for tp in (1, 2):
        modelopt_export(model, tmp_path / f"modelopt-tp{tp}", tp)
    model = import_modelopt_model(fresh)
    for tp in (1, 2):
        write_trtllm_checkpoint(model, tmp_path / f"ours-tp{tp}", TrtllmOptions(tp_size=tp))
        n = assert_same_checkpoint(
            tmp_path / f"modelopt-tp{tp}", tmp_path / f"ours-tp{tp}", tp, algo == "awq"
        )
        assert n == tp * {"none": 17, "awq": 37, "fp8": 37}[algo]
    config = json.loads((tmp_path / "ours-tp2/config.json").read_text())
    assert config["quantization"]["quant_algo"] == {"none": None, "awq": "W4A16_AWQ", "fp8": "FP8"}[algo]


def test_unsupported_modelopt_format_is_refused_before_anything_changes(tiny_model_dir):
    """An INT8 SmoothQuant model: the importer re-smoothed layer 0's q/k/v in place (ModelOpt's fusion
    preprocessing) and only then refused the format, leaving the caller's model changed."""
    pytest.importorskip("modelopt", reason=MODELOPT_MISSING)
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from trtcompress.checkpoints.modelopt_import import import_modelopt_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG), lambda m: m(input_ids=ids))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ExportError, match=r"layer 0 self_attn.q_proj: ModelOpt format 'int8_sq'.*supported"):
        import_modelopt_model(model)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------------- sharding


def test_tp2_shards_reassemble_to_tp1(tiny_model, tmp_path):
    model = _compressed(tiny_model, bits=4, group_size=16, symmetric=True)
    cfg1, (one,) = _write(model, tmp_path / "tp1")
    cfg2, shards = _write(model, tmp_path / "tp2", tp_size=2)
    assert cfg1["quantization"] == {
        "quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 16, "has_zero_point": False,
        "pre_quant_scale": False, "exclude_modules": ["lm_head"],
    }  # fmt: skip
    assert cfg2["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    hd, q, kv = 24, 96, 48
    for i in range(2):
        p = f"transformer.layers.{i}"
        full = _dequant_awq(one, f"{p}.attention.qkv", (q + 2 * kv, 96))
        parts = [_dequant_awq(s, f"{p}.attention.qkv", (q // 2 + 2 * kv // 2, 96)) for s in shards]
        # each rank holds q heads [2r, 2r+2) then its KV head r, for q, k and v
        q_part = torch.cat([s[: q // 2] for s in parts])
        k_part = torch.cat([s[q // 2 : q // 2 + hd] for s in parts])
        v_part = torch.cat([s[q // 2 + hd :] for s in parts])
        rebuilt = torch.cat([q_part, k_part, v_part])
        assert torch.equal(rebuilt, full)
        attn = model.model.layers[i].self_attn
        states = [linear_state(getattr(attn, n)).weight() for n in ("q_proj", "k_proj", "v_proj")]
        torch.testing.assert_close(full, torch.cat(states), rtol=0, atol=0)
        dense = torch.cat([_dequant_awq(s, f"{p}.attention.dense", (96, 48)) for s in shards], 1)
        assert torch.equal(dense, _dequant_awq(one, f"{p}.attention.dense", (96, 96)))
        for key, rows in (("fc", True), ("gate", True), ("proj", False)):
            shape = (80, 96) if rows else (96, 80)
            got = torch.cat([_dequant_awq(s, f"{p}.mlp.{key}", shape) for s in shards], 0 if rows else 1)
            full_shape = (160, 96) if rows else (96, 160)
            assert torch.equal(got, _dequant_awq(one, f"{p}.mlp.{key}", full_shape))
        assert torch.equal(shards[0][f"{p}.input_layernorm.weight"], one[f"{p}.input_layernorm.weight"])
    emb = torch.cat([s["transformer.vocab_embedding.weight"] for s in shards])
    assert torch.equal(emb, one["transformer.vocab_embedding.weight"])
    assert torch.equal(torch.cat([s["lm_head.weight"] for s in shards]), one["lm_head.weight"])


def test_pipeline_parallel_splits_layers(tiny_model, tmp_path):
    model = tiny_model.model
    _, (one,) = _write(model, tmp_path / "pp1")
    config, (first, last) = _write(model, tmp_path / "pp2", pp_size=2)
    assert config["mapping"] == {"world_size": 2, "tp_size": 1, "pp_size": 2}
    assert "transformer.vocab_embedding.weight" in first and "lm_head.weight" not in first
    assert "transformer.ln_f.weight" in last and "transformer.vocab_embedding.weight" not in last
    for name, tensor in last.items():  # stage-local index: global layer 1 is layers.0 on stage 1
        source = name.replace("layers.0.", "layers.1.")
        assert torch.equal(tensor, one[source]), name
    assert {k for k in first if "layers" in k} == {k for k in one if "layers.0." in k}


def test_tp2_pp2_ranks_reassemble_to_one(tiny_model, tmp_path):
    """World size 4: rank = pp_rank * tp_size + tp_rank; every tensor of the TP1/PP1 checkpoint is rebuilt."""
    model = tiny_model.model
    _, (one,) = _write(model, tmp_path / "one")
    config, ranks = _write(model, tmp_path / "tp2pp2", tp_size=2, pp_size=2)
    assert config["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert len(ranks) == 4
    rebuilt: dict[str, torch.Tensor] = {}
    q, hd = 96, 24
    for stage in (0, 1):
        pair = ranks[2 * stage : 2 * stage + 2]  # the two tensor-parallel ranks of this stage
        for name in pair[0]:
            parts = [r[name] for r in pair]
            glob = name.replace("layers.0.", f"layers.{stage}.")  # one decoder layer per stage, local index 0
            if name.endswith("attention.qkv.weight"):
                half = q // 2
                rebuilt[glob] = torch.cat([torch.cat([p[:half] for p in parts]),
                                           torch.cat([p[half : half + hd] for p in parts]),
                                           torch.cat([p[half + hd :] for p in parts])])  # fmt: skip
            elif name.endswith(("attention.dense.weight", "mlp.proj.weight")):
                rebuilt[glob] = torch.cat(parts, 1)
            elif name.endswith(
                ("mlp.fc.weight", "mlp.gate.weight", "vocab_embedding.weight", "lm_head.weight")
            ):
                rebuilt[glob] = torch.cat(parts)[
                    : one[glob].shape[0]
                ]  # vocabulary padded to a multiple of tp
            else:
                assert torch.equal(parts[0], parts[1]), name  # norms are replicated
                rebuilt[glob] = parts[0]
    assert set(rebuilt) == set(one)
    for name, tensor in one.items():
        assert torch.equal(rebuilt[name], tensor), name
    assert "lm_head.weight" not in ranks[0] and "transformer.vocab_embedding.weight" not in ranks[3]


def test_tp_must_divide_heads(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="does not divide the 4 attention heads"):
        write_trtllm_checkpoint(tiny_model.model, tmp_path / "x", TrtllmOptions(tp_size=3))


def test_tp4_replicates_kv_heads(tiny_model, tmp_path):
    _, shards = _write(tiny_model.model, tmp_path / "tp4", tp_size=4)
    qkv = [s["transformer.layers.0.attention.qkv.weight"] for s in shards]
    assert all(t.shape == (24 * 3, 96) for t in qkv)  # 1 q head + the replicated k and v heads
    assert torch.equal(qkv[0][24:], qkv[1][24:]) and not torch.equal(qkv[1][24:], qkv[2][24:])


# ----------------------------------------------------------------------------------------- formats


def test_partial_group_is_padded_like_trtllm(tiny_model, tmp_path):
    """96 inputs with group 64 = groups of 64 + 32: padded to 128 (max(64, 64) * tp) with zero codes."""
    model = _compressed(tiny_model, bits=4, group_size=64, symmetric=True)
    _, (one,) = _write(model, tmp_path / "g64")
    w = one["transformer.layers.0.mlp.fc.weight"]
    s = one["transformer.layers.0.mlp.fc.weights_scaling_factor"]
    assert w.shape == (192 // 2, 128) and s.shape == (192, 2) and w.dtype == torch.int8  # out 160 -> 192
    state = linear_state(model.model.layers[0].mlp.gate_proj)
    assert torch.equal(s[:160].half(), state.quantized.scales)
    assert torch.all(unpack_int4_rows(w)[:, 96:] == 0) and torch.all(s[160:] == 1)
    torch.testing.assert_close(_dequant_awq(one, "transformer.layers.0.mlp.fc", (160, 96)), state.weight())


def _trtllm_loaded_shapes(tensors, prefix, dtype=torch.float16):
    """What TensorRT-LLM 1.2's `preprocess_perlayer_weights` (W4A16_AWQ branch) hands to the layer: int8
    weights interleaved and viewed as `dtype` (in, out/4), scales transposed; `zero` untouched."""
    w = tensors[f"{prefix}.weight"]
    assert w.dtype == torch.int8
    loaded = {"weight": ((w.shape[1], w.shape[0] // 2), dtype)}
    s = tensors[f"{prefix}.weights_scaling_factor"]
    loaded["weights_scaling_factor"] = (tuple(s.T.shape), dtype)
    z = tensors[f"{prefix}.zero"]
    loaded["zero"] = (tuple(z.shape), z.dtype)
    return loaded


def test_asymmetric_groups_write_awq_with_zero_point(tiny_model, tmp_path):
    """A W4A16_GPTQ checkpoint must hold TensorRT-LLM-preprocessed (interleaved) weights, which its loader
    never makes: asymmetric int4 is written as W4A16_AWQ + has_zero_point, `zero` in the layer's layout."""
    model = _compressed(tiny_model, bits=4, group_size=32, symmetric=False)
    config, (one,) = _write(model, tmp_path / "asym")
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert config["quantization"]["has_zero_point"] is True
    state = linear_state(model.model.layers[1].self_attn.o_proj)
    got = _dequant_awq(one, "transformer.layers.1.attention.dense", (96, 96))
    torch.testing.assert_close(got, state.weight(), rtol=0, atol=3e-5)  # zero rounded to fp16
    # WeightOnlyGroupwiseQuantRowLinear(in=160 -> 192, out=96 -> 128, group 32): weight (in, out/4),
    # weights_scaling_factor and zero (in/group, out), all in the model dtype
    assert _trtllm_loaded_shapes(one, "transformer.layers.0.mlp.proj") == {
        "weight": ((192, 32), torch.float16),
        "weights_scaling_factor": ((6, 128), torch.float16),
        "zero": ((6, 128), torch.float16),
    }


def test_zero_point_checkpoint_gives_symmetric_layers_zero(tiny_model, tmp_path):
    """has_zero_point applies to every group-wise layer: a symmetric one in the same fused qkv gets zero 0."""
    model = _compressed(tiny_model, bits=4, group_size=32, symmetric=False)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.state.weight()
    sym = QuantizedWeight.round_to_nearest(weight, IntFormat(4, 32, True))
    set_module(model, "model.layers.0.self_attn.q_proj", CompressedLinear(CompressedLinearState(96, 96, sym)))
    config, (one,) = _write(model, tmp_path / "mixed")
    assert config["quantization"]["has_zero_point"] is True
    zero = one["transformer.layers.0.attention.qkv.zero"]
    assert zero.shape == (128 // 32, 96 + 2 * 48) and torch.all(zero[:, :96] == 0)  # in 96 padded to 128
    states = [
        linear_state(getattr(model.model.layers[0].self_attn, n)).weight()
        for n in ("q_proj", "k_proj", "v_proj")
    ]
    got = _dequant_awq(one, "transformer.layers.0.attention.qkv", (192, 96))
    torch.testing.assert_close(got, torch.cat(states), rtol=0, atol=3e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_weight_only_round_trips_trtllm_requantization(tiny_model, tmp_path, bits):
    model = _compressed(tiny_model, bits=bits, group_size=0, symmetric=True)
    config, (one,) = _write(model, tmp_path / f"w{bits}")
    assert config["quantization"]["quant_algo"] == f"W{bits}A16"
    weight = one["transformer.layers.0.mlp.proj.weight"]
    assert weight.dtype == torch.float16 and weight.shape == (96, 160)
    state = linear_state(model.model.layers[0].mlp.down_proj)
    codes = state.quantized.codes().float() - 2 ** (bits - 1)
    assert torch.equal(requantized_codes(weight, bits), codes)  # what TensorRT-LLM's loader will compute


def test_per_channel_requantization_mismatch_is_refused(tiny_model, tmp_path):
    model = _compressed(tiny_model, bits=8, group_size=0, symmetric=True)
    layer = model.model.layers[0].mlp.down_proj
    state = layer.state
    codes = state.quantized.codes().clone()
    codes[0] = 128  # row 0 no longer reaches the largest code (as GPTQ can leave it)
    codes[0, 0] = 129
    q = QuantizedWeight.from_codes(codes, state.quantized.scales, None, state.quantized.format)
    set_module(model, "model.layers.0.mlp.down_proj", CompressedLinear(CompressedLinearState(96, 160, q)))
    with pytest.raises(ExportError, match="re-quantizes"):
        write_trtllm_checkpoint(model, tmp_path / "bad", TrtllmOptions())


def _nvfp4_model(model, with_act: bool):
    for layer in model.model.layers:
        for group in (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:]):
            weights = [layer.get_submodule(n).weight.detach() for n in group]
            _, global_scale = fpgrid.minmax_scales(
                torch.cat(weights), NVFP4
            )  # one tensor scale per fused GEMM
            for name, w in zip(group, weights, strict=True):
                blocks, valid = fpgrid.blocks(w, 16)
                amax = torch.where(valid, blocks.abs(), torch.zeros(())).amax(-1)
                scales = fpgrid.e4m3_round(amax / 6 / global_scale)
                q = QuantizedWeight.with_fp_scales(w, NVFP4, scales, global_scale)
                act = ActQuantizer(2, 1, torch.tensor([0.5])) if with_act else None
                set_module(layer, name, CompressedLinear(CompressedLinearState(*w.shape, q, act_quant=act)))
    return model


def test_nvfp4_layout(tiny_model, tmp_path):
    model = _nvfp4_model(tiny_model.model, with_act=True)
    config, (one,) = _write(model, tmp_path / "nvfp4")
    assert config["quantization"]["quant_algo"] == "NVFP4"
    p = "transformer.layers.0.attention.qkv"
    assert one[f"{p}.weight"].shape == (192, 48) and one[f"{p}.weight"].dtype == torch.uint8
    assert one[f"{p}.weights_scaling_factor"].shape == (192, 6)
    assert one[f"{p}.weights_scaling_factor"].dtype == torch.float8_e4m3fn
    assert one[f"{p}.activation_scaling_factor"].item() == pytest.approx(0.5 / 448)
    q = linear_state(model.model.layers[0].self_attn.q_proj).quantized
    assert torch.equal(one[f"{p}.weight"][:96], q.qweight)  # same nibble order as the canonical state


def test_nvfp4_without_activation_scale_is_refused(tiny_model, tmp_path):
    model = _nvfp4_model(tiny_model.model, with_act=False)
    with pytest.raises(ExportError, match="weight-only"):
        write_trtllm_checkpoint(model, tmp_path / "x", TrtllmOptions())


def test_mxfp4_and_plugin_layers(tiny_model, tmp_path):
    recipe = Recipe.model_validate({"passes": [{"method": "mxfp4", "exclude": ["lm_head"]}]})
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    config, (one,) = _write(tiny_model.model, tmp_path / "mx")
    assert config["quantization"]["quant_algo"] == "W4A16_MXFP4"
    assert one["transformer.layers.0.mlp.proj.weights_scaling_factor"].shape == (96, 5)
    assert one["transformer.layers.0.mlp.proj.weights_scaling_factor"].dtype == torch.uint8
    assert config["trtcompress"]["stock_trtllm_build"] is True


def test_w4a4_and_gear_are_plugin_entries(tiny_model, tmp_path):
    recipe = Recipe.model_validate({"passes": [{"method": "minmax-fp4", "exclude": ["lm_head"]}],
                                    "calibration": {"num_samples": 2, "seq_len": 32}})  # fmt: skip
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    config, (one,) = _write(tiny_model.model, tmp_path / "w4a4", kv_cache="gear-2bit")
    assert config["quantization"]["quant_algo"] is None
    assert set(config["trtcompress"]["plugins"]) == {
        "trtcompress::w4a4_fp4_gemm",
        "trtcompress::gear_attention",
    }
    assert config["trtcompress"]["stock_trtllm_build"] is False
    assert {"qweight", "scales", "act_scale"} <= {k.rsplit(".", 1)[1] for k in one if ".mlp.fc." in k}
    # the plugin's attributes per checkpoint linear: the checkpoint alone says how to decode each one
    layers = config["trtcompress"]["plugins"]["trtcompress::w4a4_fp4_gemm"]["layers"]
    assert len(layers) == 2 * 5
    e2m1 = {"w_exp": 2, "w_man": 1, "a_exp": 2, "a_man": 1, "group_size": 0}
    assert layers["transformer.layers.1.attention.qkv"] == layers["transformer.layers.0.mlp.proj"] == e2m1


def test_w4a4_fused_layers_with_different_element_formats_are_refused(tiny_model, tmp_path):
    """LLM-FP4 picks the weight element format per linear: q in E2M1 and k in E3M0 were concatenated
    into one qkv GEMM and decoded on one grid (the plugin has one w_exp / w_man), and the checkpoint did
    not say which; now refused, naming both formats."""
    from trtcompress.compressed.formats import FpFormat

    recipe = Recipe.model_validate({"passes": [{"method": "minmax-fp4", "exclude": ["lm_head"]}],
                                    "calibration": {"num_samples": 2, "seq_len": 32}})  # fmt: skip
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    attn = tiny_model.model.model.layers[0].self_attn
    state = linear_state(attn.k_proj)
    e3m0 = QuantizedWeight.round_to_nearest(state.weight(), FpFormat(3, 0, 0))
    state = CompressedLinearState(state.out_features, state.in_features, e3m0, act_quant=state.act_quant)
    set_module(attn, "k_proj", CompressedLinear(state))
    with pytest.raises(
        ExportError, match=r"q/k/v: fused layers must share one format.*weights e2m1.*weights e3m0"
    ):
        write_trtllm_checkpoint(tiny_model.model, tmp_path / "x", TrtllmOptions())


@pytest.mark.parametrize("codec, algo", [("int8", "INT8"), ("fp8", "FP8")])
def test_kv_cache_quant_algo(tiny_model, tmp_path, codec, algo):
    ids = tiny_model.tokenizer("The capital of France is Paris. " * 8, return_tensors="pt").input_ids
    scales = kv_cache_scales(tiny_model.model, ids, algo)
    assert len(scales) == 2 and all(s > 0 for s in scales)
    config, (one,) = _write(tiny_model.model, tmp_path / codec, kv_cache=codec, kv_cache_scales=scales)
    assert config["quantization"]["kv_cache_quant_algo"] == algo
    assert one["transformer.layers.1.attention.kv_cache_scaling_factor"].item() == pytest.approx(scales[1])
    with pytest.raises(ExportError, match="calibrated scale"):
        write_trtllm_checkpoint(tiny_model.model, tmp_path / "x", TrtllmOptions(kv_cache=codec))


def test_prequant_scale_state_and_its_checkpoint_tensor(tiny_model, tmp_path):
    """An unfolded AWQ pre-quant scale: y = (x * s) @ Wᵀ, kept through save/load, written per rank."""
    model = _compressed(tiny_model, bits=4, group_size=16, symmetric=True)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for name in LINEARS:
            state = linear_state(layer.get_submodule(name))
            pqs = (torch.rand(state.in_features, generator=gen) + 0.5).half()
            if name in LINEARS[:3]:  # q, k, v share their input, hence one scale
                pqs = (torch.arange(state.in_features) % 7 / 7 + 0.5).half()
            new = CompressedLinearState(
                state.out_features, state.in_features, state.quantized, pre_quant_scale=pqs
            )
            set_module(layer, name, CompressedLinear(new))
    state = linear_state(model.model.layers[0].mlp.down_proj)
    x = torch.randn(3, state.in_features, generator=gen)
    want = (x * state.pre_quant_scale.float()) @ state.quantized.dequantize().T
    torch.testing.assert_close(state.forward(x), want)
    torch.testing.assert_close(state.weight(), state.quantized.dequantize() * state.pre_quant_scale.float())
    again = CompressedLinearState.from_tensors(state.meta(), state.tensors())
    assert torch.equal(again.pre_quant_scale, state.pre_quant_scale) and again.format_name.endswith(
        "+prequant"
    )
    config, shards = _write(model, tmp_path / "pqs", tp_size=2)
    assert config["quantization"]["pre_quant_scale"] is True
    got = torch.cat([s["transformer.layers.0.mlp.proj.prequant_scaling_factor"][:80] for s in shards])
    assert torch.equal(got, state.pre_quant_scale)  # row-parallel: split with the input channels


# ------------------------------------------------------------------------------- config variations


def _llama(**config):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(LlamaConfig(**{**base, **config}))


def test_rotary_scaling_head_size_and_mqa_reach_the_config(tmp_path):
    """What TensorRT-LLM's LLaMAConfig reads for a Llama-3.1-style config (theta, llama3 scaling, given
    under transformers 4's rope_scaling), an explicit head_dim other than hidden / heads, and one KV head."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}  # fmt: skip
    model = _llama(rope_theta=500000.0, rope_scaling=dict(rope), head_dim=16)
    config, (tensors,) = _write(model, tmp_path)
    assert config["rotary_base"] == 500000.0
    scaling = {k: v for k, v in rope.items() if k != "rope_type"}
    assert config["rotary_scaling"] == {"type": "llama3", **scaling}
    assert config["head_size"] == 16 and config["num_key_value_heads"] == 1
    assert tensors["transformer.layers.0.attention.qkv.weight"].shape == ((4 + 2) * 16, 32)
    assert _write(_llama(), tmp_path / "plain")[0]["rotary_scaling"] is None


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_a_biased_llama_is_refused_naming_the_config_field(tmp_path, field):
    with pytest.raises(ExportError, match=rf"{field}: true.*linear biases are not supported"):
        _write(_llama(**{field: True}), tmp_path)
    assert not list(tmp_path.iterdir())
