"""FP grids, NVFP4 / MXFP4 block scales and FP weight states, against slow, obviously-correct references."""

import math

import pytest
import torch

from trtcompress.compressed import CompressedLinear, CompressedLinearState, QuantizedWeight, fpgrid
from trtcompress.compressed.formats import MXFP4, NVFP4, FpFormat, IntFormat, format_from_dict


def ref_quant(x: float, e: int, m: int, bias: float) -> float:
    """LLM-FP4's quantizer, one float at a time: clip to ±Qmax, p = max(1, floor(log2|x| + b)),
    v = 2**(p - m - b), round(x / v) * v (Python's round is half to even)."""
    qmax = (2 - 2.0**-m) * 2.0 ** (2**e - 1 - bias)
    x = min(max(x, -qmax), qmax)
    if x == 0:
        return 0.0
    p = max(1, math.floor(math.log2(abs(x)) + bias))
    v = 2.0 ** (p - m - bias)
    return round(x / v) * v


def ref_e4m3(x: float) -> float:
    """float8 E4M3 (fn: max 448, no inf) by the same formula: bias 7, saturate at 448."""
    return ref_quant(min(x, 448.0), 4, 3, 7)


def test_e2m1_e3m0_e1m2_grids():
    assert fpgrid.positive_grid(2, 1).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert fpgrid.positive_grid(3, 0).tolist() == [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    assert fpgrid.positive_grid(1, 2).tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    # negative codes mirror the positive ones with the sign bit (bit 3) set
    e2m1 = fpgrid.decode(torch.arange(16, dtype=torch.uint8), 2, 1)
    assert e2m1[8:].tolist() == [-v for v in [0, 0.5, 1, 1.5, 2, 3, 4, 6]]
    assert fpgrid.max_value(2, 1) == 6 and fpgrid.max_value(3, 0) == 16 and fpgrid.max_value(1, 2) == 3.5


@pytest.mark.parametrize("e,m", [(2, 1), (3, 0), (1, 2), (4, 3)])
def test_round_to_grid_matches_the_reference_formula(e, m):
    torch.manual_seed(e)
    b0 = fpgrid.standard_bias(e)
    grid = fpgrid.positive_grid(e, m)
    ties = ((grid[:-1] + grid[1:]) / 2).tolist()  # exact midpoints: half to even must hold
    x = torch.cat(
        [torch.randn(2000) * grid[-1] / 2, torch.tensor(ties + [-t for t in ties] + [0.0, 1e-30, 1e9])]
    )
    ours = fpgrid.round_to_grid(x, e, m)
    expected = torch.tensor([ref_quant(v, e, m, b0) for v in x.tolist()])
    assert torch.equal(ours, expected)
    assert set(ours.abs().tolist()) <= set(grid.tolist())


@pytest.mark.parametrize("e,m", [(2, 1), (3, 0), (1, 2)])
def test_every_code_round_trips(e, m):
    codes = torch.arange(16, dtype=torch.uint8)
    values = fpgrid.decode(codes, e, m)
    again = fpgrid.encode(values, e, m)
    # -0 (code 8) encodes as +0; every other code comes back as itself
    assert torch.equal(again[codes != 8], codes[codes != 8]) and again[8] == 0


def test_real_valued_bias_is_a_scaled_standard_grid():
    torch.manual_seed(1)
    x = torch.randn(500) * 3
    for bias in (-1.3, 0.37, 2.0, 5.81):
        ours = fpgrid.quantize_with_bias(x, bias, 2, 1)
        expected = torch.tensor([ref_quant(v, 2, 1, bias) for v in x.tolist()])
        assert torch.allclose(ours, expected, rtol=1e-6, atol=0)
    # b = 2**e - log2(Qmax) + log2(2 - 2**-m) - 1 puts the grid's top at Qmax
    assert fpgrid.quantize_with_bias(torch.tensor([100.0]), fpgrid.bias_for_max(2, 1, 7.5), 2, 1).item() == (
        pytest.approx(7.5)
    )


def _blocks_ref(w: torch.Tensor, g: int):
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], g):
            yield r, start // g, w[r, start : start + g].tolist()


def test_nvfp4_block_scales_codes_and_bytes():
    torch.manual_seed(2)
    w = torch.randn(6, 40) * torch.logspace(-2, 0, 6)[:, None]  # 40 = 16 + 16 + 8: a partial block
    q = QuantizedWeight.round_to_nearest(w, NVFP4)
    amax = w.abs().max().item()
    global_scale = amax / (6 * 448)
    assert q.global_scale.item() == pytest.approx(global_scale, rel=1e-6)
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (6, 3)
    expected = torch.empty_like(w)
    for r, b, block in _blocks_ref(w, 16):
        scale = ref_e4m3(max(abs(v) for v in block) / 6 / global_scale)
        assert q.scales[r, b].float().item() == pytest.approx(scale, rel=1e-6)
        s = scale * q.global_scale.item()
        expected[r, b * 16 : b * 16 + len(block)] = torch.tensor(
            [ref_quant(v / s, 2, 1, 1) * s for v in block]
        )
    assert torch.allclose(q.dequantize(), expected, rtol=1e-6, atol=0)
    # 40 E2M1 codes = 20 bytes per row, 3 E4M3 scales per row, one fp32 tensor scale
    state = CompressedLinearState(6, 40, quantized=q)
    assert state.nbytes == 6 * 20 + 6 * 3 + 4
    assert state.format_name == "nvfp4"


def test_nvfp4_block_whose_scale_underflows_e4m3_is_not_flushed_to_zero():
    """A non-zero block far below the tensor's max (ideal E4M3 scale <= 2**-10) rounded its scale to 0 and
    lost every element; like ModelOpt it keeps E4M3's smallest subnormal, 2**-9, and its elements."""
    w = torch.zeros(2, 32)
    w[0, :16] = 1.0  # sets the tensor scale: 1 / 2688
    w[1, :16] = torch.linspace(-2e-6, 2e-6, 16)  # ideal block scale 448 * 2e-6 = 9e-4 < 2**-10
    q = QuantizedWeight.round_to_nearest(w, NVFP4)
    assert q.scales[1, 0].float().item() == 2.0**-9
    assert q.scales[0, 1].float().item() == 0 and q.scales[1, 1].float().item() == 0  # all-zero blocks
    s = 2.0**-9 * q.global_scale.item()
    expected = torch.tensor([ref_quant(v / s, 2, 1, 1) * s for v in w[1, :16].tolist()])
    assert torch.allclose(q.dequantize()[1, :16], expected, rtol=1e-6, atol=0)
    assert (q.dequantize()[1, :16] - w[1, :16]).norm() < 0.3 * w[1, :16].norm()  # was all zeros: 1.0
    assert q.dequantize()[:, 16:].abs().sum() == 0


def test_mxfp4_e8m0_scales_codes_and_bytes():
    torch.manual_seed(3)
    w = torch.randn(5, 64) * 0.05
    w[0, :32] = 0  # an all-zero block: scale byte 0 (2**-127), codes 0
    q = QuantizedWeight.round_to_nearest(w, MXFP4)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (5, 2) and q.global_scale is None
    expected = torch.empty_like(w)
    for r, b, block in _blocks_ref(w, 32):
        amax = max(abs(v) for v in block)
        exponent = math.floor(math.log2(amax)) - 2 if amax > 0 else -127  # emax(E2M1) = 2
        assert q.scales[r, b].item() == exponent + 127
        s = 2.0**exponent
        expected[r, b * 32 : b * 32 + 32] = torch.tensor([ref_quant(v / s, 2, 1, 1) * s for v in block])
    assert torch.equal(q.dequantize(), expected)
    assert q.dequantize()[0, :32].abs().sum() == 0
    # the largest element of a block may saturate at 6 x scale (the spec's floor), never exceed it
    assert (q.dequantize().abs() <= w.abs().max()).all()
    assert CompressedLinearState(5, 64, quantized=q).nbytes == 5 * 32 + 5 * 2
    assert CompressedLinearState(5, 64, quantized=q).format_name == "mxfp4"


def test_mxfp4_shared_exponent_is_exact_just_below_a_power_of_two():
    """floor(log2(amax)) must be exact: float32 log2 rounds amax = nextafter(2**k, 0) up to k."""
    powers = torch.exp2(torch.arange(-20, 21, dtype=torch.float32))
    amax = torch.nextafter(powers, torch.zeros(()))
    w = amax[:, None].expand(-1, 32).contiguous()
    q = QuantizedWeight.round_to_nearest(w, MXFP4)
    expected = [math.frexp(float(a))[1] - 1 - 2 + 127 for a in amax]  # floor(log2 a) - emax + bias
    assert q.scales[:, 0].tolist() == expected
    # so the block's max lands on the grid's top binade (E2M1 4..6), not on 2..3
    assert (q.codes() & 0x7).min() >= 6


def test_per_channel_fp16_scales_round_trip_and_bytes():
    torch.manual_seed(4)
    w = torch.randn(16, 576)
    fmt = FpFormat(2, 1, 0)
    q = QuantizedWeight.round_to_nearest(w, fmt)
    assert q.scales.dtype == torch.float16 and q.scales.shape == (16, 1)
    scale = (w.abs().amax(1) / 6).half().float()
    assert torch.equal(q.scales.float()[:, 0], scale)
    expected = torch.tensor(
        [
            [ref_quant(v / s, 2, 1, 1) * s for v in row]
            for row, s in zip(w.tolist(), scale.tolist(), strict=True)
        ]
    )
    assert torch.allclose(q.dequantize(), expected, rtol=1e-6, atol=0)
    state = CompressedLinearState(16, 576, quantized=q)
    assert state.nbytes == 16 * 288 + 16 * 2 and state.format_name == "fp4_e2m1_ch"
    # group 128 over a 576-wide row: 5 groups (4 x 128 + a partial 64)
    g128 = QuantizedWeight.round_to_nearest(w, FpFormat(3, 0, 128))
    assert (
        g128.scales.shape == (16, 5)
        and CompressedLinearState(16, 576, quantized=g128).nbytes == 16 * 288 + 16 * 10
    )


def test_fp16_scale_that_underflows_keeps_the_smallest_subnormal():
    """A row whose max/6 underflows fp16 (<= 2**-25) got scale 1, so every element rounded to 0; with fp16's
    smallest subnormal (2**-24) its elements stay on the grid. An all-zero row still gets scale 1."""
    w = torch.zeros(3, 16)
    w[0] = torch.linspace(-1.5e-7, 1.5e-7, 16)
    w[1] = torch.randn(16)
    q = QuantizedWeight.round_to_nearest(w, FpFormat(2, 1, 0))
    assert q.scales[:, 0].float().tolist()[0] == 2.0**-24 and q.scales[2, 0].item() == 1
    expected = torch.tensor([ref_quant(v / 2.0**-24, 2, 1, 1) * 2.0**-24 for v in w[0].tolist()])
    assert torch.equal(q.dequantize()[0], expected)
    assert (q.dequantize()[0] - w[0]).norm() < 0.3 * w[0].norm()  # was all zeros: 1.0
    assert q.dequantize()[2].abs().sum() == 0


@pytest.mark.parametrize("fmt", [NVFP4, MXFP4, FpFormat(1, 2, 0), FpFormat(3, 0, 64)])
def test_fp_state_round_trips_through_tensors_and_meta(fmt):
    torch.manual_seed(5)
    w = torch.randn(12, 96)
    state = CompressedLinearState(
        12, 96, quantized=QuantizedWeight.round_to_nearest(w, fmt), bias=torch.randn(12)
    )
    assert format_from_dict(fmt.to_dict()) == fmt
    meta = state.meta()
    assert meta["quant"]["kind"] == "fp"
    again = CompressedLinearState.from_tensors(meta, state.tensors())
    assert torch.equal(again.weight(), state.weight()) and again.format_name == state.format_name
    module = CompressedLinear(state)
    x = torch.randn(3, 96)
    assert torch.allclose(module(x), x @ state.weight().T + state.bias, atol=1e-5)


def test_fp_formats_validate():
    with pytest.raises(ValueError, match="block size"):
        FpFormat(2, 1, 0, "e4m3")
    with pytest.raises(ValueError, match="scale_encoding"):
        FpFormat(2, 1, 16, "bf16")
    with pytest.raises(ValueError, match="exponent bit"):
        FpFormat(0, 3, 0)
    q = QuantizedWeight.round_to_nearest(torch.randn(4, 32), NVFP4)
    with pytest.raises(ValueError, match="global scale"):
        QuantizedWeight(NVFP4, 4, 32, q.qweight, q.scales, None, None)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(NVFP4, 4, 32, q.qweight, q.scales.float().half(), None, q.global_scale)
    with pytest.raises(ValueError, match="cannot be rescaled"):
        CompressedLinearState(4, 32, quantized=q).scale_rows(torch.full((4,), 2.0))
    # integer formats are untouched
    assert IntFormat(4, 128, True).name == "int4_g128_sym" and format_from_dict(
        IntFormat(4, 0, False).to_dict()
    )
