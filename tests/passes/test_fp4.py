"""NVFP4 / MXFP4 round-to-nearest and the min-max W4A4 baseline, as passes on the tiny random LLaMA."""

import pytest
import torch
from pydantic import ValidationError

from trtcompress.builders.compress import compress_model
from trtcompress.compressed import compressed_linears
from trtcompress.compressed.accounting import weight_stats
from trtcompress.compressed.formats import MXFP4, NVFP4
from trtcompress.passes import PASS_REGISTRY
from trtcompress.passes.fp4 import MinMaxFP4Config, NVFP4Config
from trtcompress.recipe import load_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: 1 thread avoids OpenMP's spinning barriers on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset, fmt, bits", [("nvfp4", NVFP4, 4.5), ("mxfp4", MXFP4, 4.25)])
def test_block_fp4_presets_compress_every_decoder_linear(tiny_model, preset, fmt, bits):
    model = tiny_model.model
    recipe = load_recipe(preset)
    assert not recipe.needs_calibration  # data-free
    compress_model(model, tiny_model.tokenizer, recipe)
    layers = dict(compressed_linears(model))
    assert len(layers) == 14 and "lm_head" not in layers
    for layer in layers.values():
        state = layer.state
        assert state.quantized.format == fmt and state.act_quant is None
        out_f, in_f = state.out_features, state.in_features
        blocks = out_f * in_f // fmt.group_size  # 96 and 160 are multiples of 16 and 32
        assert state.weight_nbytes == out_f * in_f // 2 + blocks + (4 if fmt is NVFP4 else 0)
    stats = weight_stats(model)
    assert stats.bits_per_param == pytest.approx(bits, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 512, (1, 16))).logits).all()


def test_nvfp4_layers_that_share_an_input_share_one_tensor_scale(tiny_model):
    """q/k/v and gate/up run as one GEMM with one `weight_scale_2` in TensorRT-LLM and vLLM; each layer had
    its own (TensorRT-LLM asserts they are equal, vLLM took the max and dequantized k_proj 11.7% wrong).
    The shared scale is the group's largest |W|; each layer still dequantizes to its own weight."""
    model = tiny_model.model
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    compress_model(model, tiny_model.tokenizer, load_recipe("nvfp4"))
    layers = dict(compressed_linears(model))
    for i in range(len(model.model.layers)):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parent = "self_attn" if group[0] == "q_proj" else "mlp"
            names = [f"model.layers.{i}.{parent}.{n}" for n in group]
            scales = {float(layers[n].state.quantized.global_scale) for n in names}
            assert len(scales) == 1
            assert scales.pop() == pytest.approx(max(float(dense[n].abs().max()) for n in names) / (6 * 448))
            for n in names:  # the block scales absorb the shared tensor scale: same error as RTN alone
                err = (layers[n].state.weight() - dense[n]).abs().max()
                assert err <= 0.26 * dense[n].abs().max()
    o_proj = layers["model.layers.0.self_attn.o_proj"].state.quantized  # alone in its group: its own
    assert float(o_proj.global_scale) == pytest.approx(
        float(dense["model.layers.0.self_attn.o_proj"].abs().max()) / (6 * 448)
    )


def test_minmax_fp4_uses_the_calibration_max(tiny_model):
    model = tiny_model.model
    recipe = load_recipe("w4a4-minmax-fp4").model_dump()
    recipe["calibration"].update(num_samples=2, seq_len=32)
    inputs = {}
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    compress_model(model, tiny_model.tokenizer, type(load_recipe("nvfp4")).model_validate(recipe))
    handle.remove()
    state = model.model.layers[0].mlp.down_proj.state
    # the hook saw what the sweep fed down_proj (the output of the already-quantized gate/up): its max
    # over all calibration tokens sets the one tensor-wise activation scale
    assert state.act_quant.shift is None and state.format_name == "fp4_e2m1_ch+a_fp4_e2m1_tensor"
    assert state.act_quant.scale.item() == pytest.approx(float(inputs["x"].abs().max()) / 6, rel=1e-6)
    # weights: one fp16 scale per output channel, each row's max lands on 6
    w_max = state.weight().abs().amax(1)
    assert torch.allclose(w_max, state.quantized.scales.float()[:, 0] * 6, rtol=1e-6)


def test_pass_configs_are_strict_and_registered():
    assert {"nvfp4", "mxfp4", "minmax-fp4", "llmfp4"} <= set(PASS_REGISTRY)
    with pytest.raises(ValidationError):
        NVFP4Config(group_size=128)  # the block size is the format's, not a knob
    with pytest.raises(ValidationError):
        MinMaxFP4Config(weight_format="e4m3")
    for name, method in [
        ("nvfp4", "nvfp4"),
        ("mxfp4", "mxfp4"),
        ("w4a4-minmax-fp4", "minmax-fp4"),
        ("w4a4-llmfp4", "llmfp4"),
    ]:
        recipe = load_recipe(name)
        assert recipe.name == name and [p.method for p in recipe.passes] == [method]
        assert recipe.passes[0].exclude == ["lm_head"]
