import pytest
import torch
from torch import nn

from trtcompress.compressed import CompressedLinear, compressed_linears
from trtcompress.errors import CompressionError
from trtcompress.passes import PASS_REGISTRY, PassContext, build_pass
from trtcompress.passes.gsq import GSQConfig
from trtcompress.passes.targets import matches


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_registered_by_name():
    assert PASS_REGISTRY["gsq"].config_type is GSQConfig


def test_replaces_every_linear_but_lm_head(tiny_model):
    model = tiny_model.model
    build_pass(GSQConfig(bits=4, group_size=64)).apply(model, PassContext())
    names = dict(compressed_linears(model))
    assert len(names) == 2 * 7
    assert "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)
    assert all(m.format_name == "int4_g64_sym" for m in names.values())


def test_int8_is_close_and_int3_is_not(tiny_model_dir):
    from trtcompress.models import load_model

    ids = torch.randint(0, 512, (2, 32))
    ref = load_model(str(tiny_model_dir), log=print).model
    out = {}
    for bits in (8, 3):
        model = load_model(str(tiny_model_dir), log=print).model
        build_pass(GSQConfig(bits=bits, group_size=0 if bits == 8 else 32)).apply(model, PassContext())
        out[bits] = (_logits(model, ids) - _logits(ref, ids)).abs().max().item()
    assert out[8] < 0.02
    assert out[3] > 5 * out[8]


def test_model_runs_from_the_compressed_state(tiny_model):
    """The forward uses the dequantized codes: equal to a float model holding the dequantized weights."""
    model = tiny_model.model
    build_pass(GSQConfig(bits=4, group_size=32, symmetric=False)).apply(model, PassContext())
    from trtcompress.models import load_model

    plain = load_model(str(tiny_model.path), log=print).model
    for name, module in compressed_linears(model):
        plain.get_submodule(name).weight.data = module.state.weight()
    ids = torch.randint(0, 512, (1, 20))
    assert torch.allclose(_logits(model, ids), _logits(plain, ids), atol=1e-5)


def test_targets_and_exclude(tiny_model):
    model = tiny_model.model
    build_pass(GSQConfig(bits=8, group_size=0, targets=["*mlp*"], exclude=["down_proj"])).apply(
        model, PassContext()
    )
    names = sorted(n.rsplit(".", 1)[1] for n, _ in compressed_linears(model))
    assert names == ["gate_proj", "gate_proj", "up_proj", "up_proj"]


def test_no_matching_layer_is_an_error(tiny_model):
    with pytest.raises(CompressionError, match="no linear layer matches"):
        build_pass(GSQConfig(targets=["nothing*"])).apply(tiny_model.model, PassContext())


def test_non_finite_weights_are_refused_and_model_is_untouched(tiny_model):
    model = tiny_model.model
    model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(CompressionError, match=r"layers\.1\.mlp\.up_proj has non-finite"):
        build_pass(GSQConfig()).apply(model, PassContext())


def test_requantizing_a_compressed_layer_uses_its_effective_weight(tiny_model):
    model = tiny_model.model
    build_pass(GSQConfig(bits=8, group_size=0)).apply(model, PassContext())
    build_pass(GSQConfig(bits=4, group_size=32)).apply(model, PassContext())
    assert all(
        isinstance(m, CompressedLinear) and m.format_name == "int4_g32_sym"
        for _, m in compressed_linears(model)
    )


def test_quantizing_a_pruned_layer_keeps_its_mask(tiny_model):
    """magnitude 2:4 then gsq: the layer stays 2:4 (mask kept, stored and reported), not a dense INT4."""
    from trtcompress.passes.magnitude import MagnitudeConfig

    model = tiny_model.model
    build_pass(MagnitudeConfig(pattern="2:4")).apply(model, PassContext())
    masks = {n: m.state.mask.dense() for n, m in compressed_linears(model)}
    build_pass(GSQConfig(bits=4, group_size=32)).apply(model, PassContext())
    for name, module in compressed_linears(model):
        state = module.state
        assert state.format_name == "int4_g32_sym+sparse_2of4", name
        assert torch.equal(state.mask.dense(), masks[name]) and "qvalues" in state.tensors()


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("lm_head", "lm_head", True),
        ("model.layers.0.mlp.down_proj", "down_proj", True),
        ("model.layers.0.mlp.down_proj", "*mlp*", True),
        ("model.layers.0.mlp.down_proj", "re:layers\\.[0-9]\\.mlp", True),
        ("model.layers.10.mlp.down_proj", "re:layers\\.[0-9]\\.mlp", False),
        ("model.layers.0.self_attn.q_proj", "down_proj", False),
    ],
)
def test_patterns(name, pattern, expected):
    assert matches(name, pattern) is expected


def test_config_rejects_unknown_group_size():
    with pytest.raises(ValueError, match="group_size must be one of"):
        GSQConfig(group_size=100)
