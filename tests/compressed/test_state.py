import pytest
import torch

from trtcompress.compressed import CompressedLinear, CompressedLinearState, IntFormat, QuantizedWeight
from trtcompress.compressed.formats import format_from_dict


def _state(bits=4, group=128, sym=True, bias=False, shape=(576, 576)):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    q = QuantizedWeight.round_to_nearest(w, IntFormat(bits, group, sym))
    b = torch.randn(shape[0]) if bias else None
    return w, CompressedLinearState(shape[0], shape[1], quantized=q, bias=b)


def test_exact_byte_count_with_partial_group():
    _, state = _state()
    # 576 int4 codes per row = 288 bytes; 5 groups (128 x 4 + 64) of fp16 scales = 10 bytes
    assert state.nbytes == 576 * 288 + 576 * 5 * 2
    assert state.meta()["format"] == "int4_g128_sym"


def test_asymmetric_counts_zero_points():
    _, state = _state(bits=3, group=64, sym=False)
    groups = 9
    assert state.nbytes == 576 * (576 * 3 // 8) + 576 * groups * (2 + 1)


def test_tensors_roundtrip_through_meta():
    _, state = _state(bits=3, group=32, sym=False, bias=True)
    again = CompressedLinearState.from_tensors(state.meta(), state.tensors())
    assert torch.equal(again.weight(), state.weight())
    assert torch.equal(again.bias, state.bias)


def test_module_computes_from_the_state():
    w, state = _state(bits=8, group=0, bias=True, shape=(32, 48))
    module = CompressedLinear(state)
    x = torch.randn(3, 48)
    expected = x @ state.weight().T + state.bias
    assert torch.allclose(module(x), expected, atol=1e-5)
    dense = x @ w.T + state.bias
    assert (module(x) - dense).abs().max() < 0.02 * dense.abs().max()
    assert set(module.state_dict()) == {"qweight", "scales", "bias"}


def test_shape_mismatch_is_refused():
    _, state = _state(shape=(8, 64))
    with pytest.raises(ValueError, match="scales has shape"):
        QuantizedWeight(state.quantized.format, 8, 64, state.quantized.qweight, torch.zeros(8, 3), None)
    with pytest.raises(ValueError, match="exactly one"):
        CompressedLinearState(8, 64)


def test_format_names_and_dicts():
    fmt = IntFormat(8, 0, True)
    assert fmt.name == "int8_ch_sym"
    assert format_from_dict(fmt.to_dict()) == fmt
    with pytest.raises(ValueError):
        IntFormat(1, 0, True)


def test_a_pruned_fp4_state_round_trips_through_its_tensors():
    """A masked state with an FP format: its meta has no "bits" key (the format's dict does not), which
    `from_tensors` read directly."""
    from trtcompress.compressed.formats import NVFP4
    from trtcompress.compressed.sparsity import SparsityMask

    g = torch.Generator().manual_seed(0)
    w, keep = torch.randn(6, 32, generator=g), torch.rand(6, 32, generator=g) > 0.4
    state = CompressedLinearState(
        6, 32, quantized=QuantizedWeight.round_to_nearest(w, NVFP4), mask=SparsityMask.from_bool(keep)
    )
    again = CompressedLinearState.from_tensors(state.meta(), state.tensors())
    assert torch.equal(again.weight(), state.weight())


def test_a_dtype_cast_of_the_module_keeps_the_stored_format():
    """`module.to(torch.bfloat16)` / `.half()` / `.float()` cast every floating buffer: bf16 int scales
    moved the weights, fp32 scales doubled their bytes, and NVFP4's E4M3 scales or the fp32 activation
    scale became invalid (forward raised). The stored tensors keep their dtypes; the forward casts."""
    from trtcompress.compressed.formats import NVFP4
    from trtcompress.compressed.state import ActQuantizer

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    states = [
        _state(bits=4, group=32, sym=False, bias=True, shape=(8, 64))[1],
        CompressedLinearState(8, 64, quantized=QuantizedWeight.round_to_nearest(w, NVFP4)),
        CompressedLinearState(
            8,
            64,
            quantized=QuantizedWeight.round_to_nearest(w, IntFormat(4, 32, True)),
            act_quant=ActQuantizer(2, 1, torch.tensor([0.5])),
            lowrank_a=torch.randn(8, 2).half(),
            lowrank_b=torch.randn(2, 64).half(),
        ),
    ]
    x = torch.randn(3, 64)
    for state in states:
        module = CompressedLinear(state)
        dtypes = {k: v.dtype for k, v in module.state_dict().items()}
        for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
            cast(module)
            assert {k: v.dtype for k, v in module.state_dict().items()} == dtypes
            assert module.state.nbytes == state.nbytes
            assert torch.equal(module.state.weight(), state.weight())
            assert torch.equal(module(x), state.forward(x))
            assert torch.equal(module(x.bfloat16()), state.forward(x.bfloat16()))
