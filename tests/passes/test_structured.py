"""Structured pruning: real shapes shrink, the config follows, the model loads as a normal smaller model."""

import pytest
import torch

from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassContext
from trtcompress.passes.engine import run_sequential
from trtcompress.passes.structured import StructuredConfig, StructuredPass, kept_ffn_width, refit_columns


def _calib(n=8, t=64):
    return torch.randint(1, 512, (n, t), generator=torch.Generator().manual_seed(0))


def _check_consistent(model):
    c = model.config
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (c.num_attention_heads * c.head_dim, c.hidden_size)
        assert attn.k_proj.weight.shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
        assert attn.v_proj.weight.shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
        assert attn.o_proj.weight.shape == (c.hidden_size, c.num_attention_heads * c.head_dim)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (c.intermediate_size, c.hidden_size)
        assert mlp.down_proj.weight.shape == (c.hidden_size, c.intermediate_size)
        assert attn.num_key_value_groups == c.num_attention_heads // c.num_key_value_heads


@pytest.mark.parametrize(
    ("head_ratio", "head_unit", "heads", "kv_heads"),
    [(0.0, "kv_group", 4, 2), (0.5, "kv_group", 2, 1), (0.5, "query_head", 2, 2)],
)
def test_structured_pruning_shrinks_shapes_and_loads_with_transformers(
    tiny_model, tmp_path, head_ratio, head_unit, heads, kv_heads
):
    from transformers import AutoModelForCausalLM

    model = tiny_model.model
    params_before = sum(p.numel() for p in model.parameters())
    calib = _calib()
    config = StructuredConfig(ffn_ratio=0.25, head_ratio=head_ratio, head_unit=head_unit, round_to=8)
    run_sequential(model, [StructuredPass(config)], PassContext(calibration=calib))
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        120,
        heads,
        kv_heads,
        24,
    )
    _check_consistent(model)
    with torch.no_grad():
        logits = model(input_ids=calib).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    _check_consistent(again)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=calib).logits, logits, atol=1e-5)
    assert sum(p.numel() for p in again.parameters()) < params_before


def test_structured_model_round_trips_through_the_native_artifact(tiny_model, tmp_path):
    from trtcompress.checkpoints import native

    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    calib = _calib()
    config = StructuredConfig(ffn_ratio=0.25, head_ratio=0.5, head_unit="query_head", round_to=8)
    run_sequential(model, [StructuredPass(config)], PassContext(calibration=calib))
    out = tmp_path / "art"
    with native.atomic_directory(out) as tmp:
        content = native.write_weights(model, tokenizer, tmp, 1 << 30)
        manifest = native.new_manifest(
            recipe={}, source={}, model_config=model.config.to_dict(), content=content
        )
        native.write_manifest(tmp, manifest)
    loaded = native.load_artifact(out)
    _check_consistent(loaded.model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=calib).logits, model(input_ids=calib).logits, atol=1e-5)


def test_least_squares_refit_beats_dropping_channels(tiny_model_dir):
    from trtcompress.models import load_model

    calib = _calib()
    reference = load_model(str(tiny_model_dir), log=lambda m: None).model
    with torch.no_grad():
        ref = reference(input_ids=calib).logits
    errors = {}
    for compensate in (False, True):
        model = load_model(str(tiny_model_dir), log=lambda m: None).model
        p = StructuredPass(StructuredConfig(ffn_ratio=0.5, round_to=8, compensate=compensate))
        run_sequential(model, [p], PassContext(calibration=calib))
        with torch.no_grad():
            errors[compensate] = float((model(input_ids=calib).logits - ref).pow(2).mean())
    assert errors[True] < errors[False], errors


def test_refit_is_exact_when_dropped_channels_are_linear_combinations_of_kept_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g)
    x = torch.cat([x, x[:, :2] @ torch.randn(2, 2, generator=g)], dim=1)  # channels 6, 7 depend on 0, 1
    w = torch.randn(5, 8, generator=g)
    keep = torch.arange(6)
    refit = refit_columns(w, x.T @ x, keep, damp=1e-9)
    assert torch.allclose(x[:, keep] @ refit.T, x @ w.T, atol=1e-3)


def test_kept_width_is_rounded_and_bad_ratios_are_refused(tiny_model):
    assert kept_ffn_width(1536, 0.25, 32) == 1152 and kept_ffn_width(100, 0.9, 32) == 32
    with pytest.raises(ValueError, match="ffn_ratio > 0 or head_ratio > 0"):
        StructuredConfig(ffn_ratio=0)
    from trtcompress.errors import CompressionError

    with pytest.raises(CompressionError, match="at least one"):
        run_sequential(
            tiny_model.model,
            [StructuredPass(StructuredConfig(ffn_ratio=0.0, head_ratio=0.1))],
            PassContext(calibration=_calib(2, 16)),
        )
    with pytest.raises(CompressionError, match="keeps all 160"):  # 160 channels in multiples of 256
        run_sequential(
            tiny_model.model,
            [StructuredPass(StructuredConfig(ffn_ratio=0.25, round_to=256))],
            PassContext(calibration=_calib(2, 16)),
        )


@pytest.mark.parametrize("compensate", [False, True])
def test_removing_channels_that_contribute_nothing_keeps_the_function(tiny_model, compensate):
    model = tiny_model.model
    calib = _calib()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:  # 40 of 160 FFN channels (25%) feed nothing into down_proj
            dead = torch.randperm(160, generator=g)[:40]
            layer.mlp.down_proj.weight[:, dead] = 0
        before = model(input_ids=calib).logits
    run_sequential(
        model,
        [StructuredPass(StructuredConfig(ffn_ratio=0.25, round_to=8, compensate=compensate))],
        PassContext(calibration=calib),
    )
    assert model.config.intermediate_size == 120
    _check_consistent(model)
    with torch.no_grad():
        after = model(input_ids=calib).logits
    assert torch.allclose(after, before, atol=1e-4 if compensate else 1e-6)


def test_structured_pruning_refuses_a_down_proj_quantized_by_an_earlier_pass(tiny_model):
    """gsq on down_proj only, then structured: the refit used to replace the INT4 down_proj by a float
    one, silently. An o_proj it leaves alone (head_ratio 0) may stay quantized."""
    from trtcompress.passes import build_pass
    from trtcompress.passes.gsq import GSQConfig

    model = tiny_model.model
    build_pass(GSQConfig(bits=4, group_size=32, targets=["o_proj"])).apply(model, PassContext())
    context = PassContext(calibration=_calib())
    run_sequential(model, [StructuredPass(StructuredConfig(ffn_ratio=0.25, round_to=8))], context)
    assert model.model.layers[0].self_attn.o_proj.format_name == "int4_g32_sym"
    build_pass(GSQConfig(bits=4, group_size=32, targets=["down_proj"])).apply(model, PassContext())
    with pytest.raises(CompressionError, match=r"down_proj is already compressed \(int4_g32_sym\)"):
        run_sequential(model, [StructuredPass(StructuredConfig(ffn_ratio=0.25, round_to=8))], context)


def test_a_quantized_gate_or_up_proj_is_refused_before_any_layer_is_sliced(tiny_model):
    """finish slices gate/up whatever the targets: a gsq-quantized up_proj used to be found only there,
    after the whole sweep, with layer 0's gate_proj already cut to 120 rows and its up_proj still 160."""
    from trtcompress.passes import build_pass
    from trtcompress.passes.gsq import GSQConfig

    model = tiny_model.model
    build_pass(GSQConfig(bits=4, group_size=32, targets=["up_proj"])).apply(model, PassContext())
    with pytest.raises(CompressionError, match=r"layers\.0\.mlp\.up_proj is already compressed"):
        run_sequential(
            model,
            [StructuredPass(StructuredConfig(ffn_ratio=0.25, round_to=8))],
            PassContext(calibration=_calib(2, 16)),
        )
    assert model.config.intermediate_size == 160
    assert all(layer.mlp.gate_proj.out_features == 160 for layer in model.model.layers)
