"""LLM-FP4 W4A4 GEMM: reference == CompressedLinearState.forward (activation quantizer with per-channel
pre-shifts); the Triton kernel (interpreted on CPU) == reference for every FP4 format pair."""

from __future__ import annotations

import pytest
import torch

from trtcompress.compressed.formats import FpFormat
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.plugins.w4a4_fp4_gemm import trt
from trtcompress.plugins.w4a4_fp4_gemm.kernel import w4a4_fp4_gemm_triton
from trtcompress.plugins.w4a4_fp4_gemm.op import w4a4_fp4_gemm, w4a4_linear
from trtcompress.plugins.w4a4_fp4_gemm.reference import w4a4_fp4_gemm_reference

from ..w4a16_gemm.test_w4a16_gemm import check_contract


def _state(w_fmt, a_fmt, group, n=40, k=96, seed=0, shifts=True):
    g = torch.Generator().manual_seed(seed)
    q = QuantizedWeight.round_to_nearest(torch.randn(n, k, generator=g), FpFormat(*w_fmt, group))
    shift = torch.randint(0, 2 ** a_fmt[0], (k,), generator=g, dtype=torch.uint8) if shifts else None
    act = ActQuantizer(*a_fmt, torch.tensor([0.37]), shift)
    return CompressedLinearState(n, k, q, act_quant=act)


def _args(state):
    q, a = state.quantized, state.act_quant
    return (q.qweight, q.scales, a.scale, a.shift, q.format.exp_bits, q.format.man_bits,
            a.exp_bits, a.man_bits, q.format.group_size)  # fmt: skip


@pytest.mark.parametrize(
    ("w_fmt", "a_fmt", "group"), [((2, 1), (2, 1), 32), ((3, 0), (1, 2), 0), ((1, 2), (3, 0), 64)]
)
def test_reference_and_kernel(w_fmt, a_fmt, group):
    state = _state(w_fmt, a_fmt, group)
    x = torch.randn(5, 96) * 3
    torch.testing.assert_close(w4a4_fp4_gemm_reference(x, *_args(state)), state.forward(x), rtol=0, atol=0)
    xh = x.half()
    out = w4a4_fp4_gemm_triton(xh, *_args(state), block_n=16, block_k=32)
    ref = w4a4_fp4_gemm_reference(xh, *_args(state))
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=5e-2)


def test_trt_contract_op_and_linear(monkeypatch):
    check_contract(trt.kernel(), trt, trt.constants((2, 1, 2, 1), 32, 1))
    state = _state((2, 1), (2, 1), 32, shifts=False)
    x = torch.randn(2, 3, 96)
    torch.testing.assert_close(w4a4_linear(state, "cpu")(x), state.forward(x), rtol=0, atol=0)
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    xh = x.half()
    got = w4a4_fp4_gemm(xh, *_args(state))
    torch.testing.assert_close(
        got.float(), w4a4_fp4_gemm_reference(xh, *_args(state)).float(), rtol=2e-3, atol=5e-2
    )


@pytest.mark.parametrize("case", ["shift", "scale", "K"])
def test_op_refuses_tensors_that_do_not_fit_x(case):
    """A shift of the wrong length was broadcast by the reference and read past its end by the kernel, a
    weight for another K sliced: wrong results, no error."""
    args = list(_args(_state((2, 1), (2, 1), 32)))
    x = torch.randn(2, 96)
    if case == "shift":
        args[3] = args[3][:1].contiguous()
    elif case == "scale":
        args[1] = args[1][:, :2].contiguous()
    else:
        x = x[:, :94]
    with pytest.raises(ValueError, match="must"):
        w4a4_fp4_gemm(x, *args)


def test_linear_leaves_saturating_activation_quantizers_to_the_reference():
    """The op quantizes activations up to the grid's max: a quantizer that saturates lower (`saturate`)
    must keep the reference path, or its outliers come out unclamped."""
    state = _state((2, 1), (2, 1), 32, shifts=False)
    act = state.act_quant
    state.act_quant = ActQuantizer(act.exp_bits, act.man_bits, act.scale, saturate=2.0)
    x = torch.randn(3, 96) * 3
    assert not torch.equal(w4a4_fp4_gemm(x, *_args(state)), state.forward(x))  # the op ignores it
    assert w4a4_linear(state, "cpu") is None


def test_op_kernel_reads_non_contiguous_scales(monkeypatch):
    """Scales given as a transposed view (same shape, other strides) were read as contiguous rows."""
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    args = list(_args(_state((2, 1), (2, 1), 32)))
    ref = w4a4_fp4_gemm_reference(x := torch.randn(3, 96).half(), *args)
    args[1] = args[1].t().contiguous().t()
    assert not args[1].is_contiguous()
    torch.testing.assert_close(w4a4_fp4_gemm(x, *args).float(), ref.float(), rtol=2e-3, atol=5e-2)
