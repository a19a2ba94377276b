"""The W4A4 activation quantizer: LLM-FP4's pre-shifted exponent bias, checked against per-channel FP
quantization computed the slow way."""

import math

import pytest
import torch

from trtcompress.compressed import CompressedLinear, CompressedLinearState, QuantizedWeight, fpgrid
from trtcompress.compressed.formats import FpFormat
from trtcompress.compressed.state import ActQuantizer


def ref_quant(x: float, e: int, m: int, bias: float) -> float:
    qmax = (2 - 2.0**-m) * 2.0 ** (2**e - 1 - bias)
    x = min(max(x, -qmax), qmax)
    if x == 0:
        return 0.0
    p = max(1, math.floor(math.log2(abs(x)) + bias))
    v = 2.0 ** (p - m - bias)
    return round(x / v) * v


def per_channel_reference(x: torch.Tensor, e: int, m: int, biases: list[float]) -> torch.Tensor:
    """Channel j quantized with its own real exponent bias b_j, element by element."""
    return torch.tensor([[ref_quant(v, e, m, biases[j]) for j, v in enumerate(row)] for row in x.tolist()])


def outlier_inputs(tokens: int = 64, channels: int = 24, seed: int = 0) -> torch.Tensor:
    """Activations with LLM-like channel structure: a few channels ~30x larger than the rest."""
    torch.manual_seed(seed)
    spread = torch.ones(channels)
    spread[[3, 11, 17]] = torch.tensor([30.0, 8.0, 60.0])
    return torch.randn(tokens, channels) * spread


@pytest.mark.parametrize("e,m", [(2, 1), (3, 0), (1, 2)])
def test_pre_shifted_bias_is_per_channel_quantization(e, m):
    x = outlier_inputs()
    rho = -3.37  # real-valued, tensor-wise
    shift = torch.tensor([(j * 5) % (2**e) for j in range(x.shape[1])], dtype=torch.uint8)
    scale = torch.tensor([2.0 ** (fpgrid.standard_bias(e) - rho)], dtype=torch.float32)
    act = ActQuantizer(e, m, scale, shift)
    assert act.bias == pytest.approx(rho, abs=1e-6)
    expected = per_channel_reference(x, e, m, [rho + int(c) for c in shift])
    assert torch.allclose(act.fake_quantize(x), expected, rtol=1e-6, atol=0)
    # ...and the shifts matter: a tensor-wise quantizer (all shifts 0) gives a different result
    assert not torch.allclose(ActQuantizer(e, m, scale).fake_quantize(x), expected, rtol=1e-3)


def test_plain_gemm_on_pre_shifted_weights_reproduces_per_channel_quantization():
    """y = Q_ρ(2**c·x) @ W'ᵀ with W' = Q(W·2**-c) equals Q_{ρ+c}(x) @ (2**c·W')ᵀ, term by term exactly."""
    x = outlier_inputs(tokens=32)
    torch.manual_seed(1)
    w = torch.randn(10, x.shape[1])
    e, m, rho = 2, 1, -4.2
    channel_bias = fpgrid.bias_for_max(e, m, x.abs().amax(0))  # what each channel alone would want
    shift = (torch.round(channel_bias) - round(rho)).clamp(0, 2**e - 1).to(torch.uint8)
    assert len(set(shift.tolist())) > 1
    act = ActQuantizer(e, m, torch.tensor([2.0 ** (1 - rho)]), shift)
    w_prime = w / torch.exp2(shift.float())  # pre-shifted ahead of time, then quantized as any weight
    state = CompressedLinearState(
        10, x.shape[1], quantized=QuantizedWeight.round_to_nearest(w_prime, FpFormat(e, m, 0)), act_quant=act
    )
    stored = state.stored_weight()
    # The deployed computation: one activation scale, codes times pre-shifted weight codes.
    x_op = act.gemm_operand(x)
    assert (
        len(set((x_op / act.scale).abs().unique().tolist()) - set(fpgrid.positive_grid(e, m).tolist())) == 0
    )
    per_channel = per_channel_reference(x, e, m, [rho + int(c) for c in shift])
    effective = state.weight()
    assert torch.equal(effective, stored * torch.exp2(shift.float()))
    # every product term is identical (power-of-two rescaling is exact), so only summation order differs
    assert torch.equal(x_op[:, None, :] * stored[None], act.fake_quantize(x)[:, None, :] * effective[None])
    assert torch.allclose(act.fake_quantize(x), per_channel, rtol=1e-6, atol=0)
    y = CompressedLinear(state)(x)
    assert torch.allclose(y, per_channel @ effective.T, rtol=1e-5, atol=1e-5)


def test_codes_decode_to_the_gemm_operand():
    x = outlier_inputs(seed=3)
    act = ActQuantizer(2, 1, torch.tensor([0.7]), torch.randint(0, 4, (x.shape[1],), dtype=torch.uint8))
    codes = act.codes(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16
    assert torch.equal(fpgrid.decode(codes, 2, 1) * act.scale, act.gemm_operand(x))


def test_state_with_act_quantizer_round_trips_and_counts_bytes():
    x = outlier_inputs(seed=4)
    torch.manual_seed(4)
    w = torch.randn(8, x.shape[1])
    act = ActQuantizer(3, 0, torch.tensor([0.25]), torch.randint(0, 8, (x.shape[1],), dtype=torch.uint8))
    state = CompressedLinearState(
        8, x.shape[1], quantized=QuantizedWeight.round_to_nearest(w, FpFormat(3, 0, 0)), act_quant=act
    )
    assert state.format_name == "fp4_e3m0_ch+a_fp4_e3m0_shift"
    assert state.weight_nbytes == 8 * 12 + 8 * 2  # act scale and shifts are not weight bits...
    assert state.nbytes == state.weight_nbytes + 4 + x.shape[1]  # ...but are stored
    meta = state.meta()
    assert meta["act"]["exp_bits"] == 3 and set(state.tensors()) >= {"act_scale", "act_shift"}
    again = CompressedLinearState.from_tensors(meta, state.tensors())
    assert torch.equal(CompressedLinear(again)(x), CompressedLinear(state)(x))
    assert torch.equal(again.act_quant.shift, act.shift)
    # a tensor-wise quantizer has no shift tensor
    plain = CompressedLinearState(
        8, x.shape[1], dense_weight=w, act_quant=ActQuantizer(2, 1, torch.tensor([0.5]))
    )
    assert "act_shift" not in plain.tensors() and torch.equal(plain.weight(), w)


def test_act_quantizer_validates():
    with pytest.raises(ValueError, match="shifts must lie"):
        ActQuantizer(2, 1, torch.tensor([1.0]), torch.tensor([0, 4], dtype=torch.uint8))
    with pytest.raises(ValueError, match="fp32"):
        ActQuantizer(2, 1, torch.tensor([1.0], dtype=torch.float16))
    with pytest.raises(ValueError, match="act shift has shape"):
        CompressedLinearState(
            4,
            8,
            dense_weight=torch.zeros(4, 8),
            act_quant=ActQuantizer(2, 1, torch.tensor([1.0]), torch.zeros(5, dtype=torch.uint8)),
        )


def test_fp8_activations_can_saturate_at_e4m3fn_and_keep_it_through_the_artifact():
    """The no-NaN E4M3 grid tops out at 480; activations that run as float8_e4m3fn (FP8 imported from
    ModelOpt) must saturate at its 448 (470 came out as 480, code 127: NaN in e4m3fn)."""
    x = torch.tensor([[470.0, -1000.0, 300.0, 1.0]])
    plain = ActQuantizer(4, 3, torch.tensor([1.0]))
    fn = ActQuantizer(4, 3, torch.tensor([1.0]), saturate=448.0)
    assert plain.fake_quantize(x).tolist() == [[480.0, -480.0, 288.0, 1.0]]
    assert fn.fake_quantize(x).tolist() == [[448.0, -448.0, 288.0, 1.0]]
    assert int(fn.codes(x)[0, 0]) == 0x7E  # the largest finite e4m3fn code
    again = ActQuantizer.from_tensors(fn.meta(), fn.tensors())
    assert again.saturate == 448.0 and torch.equal(again.fake_quantize(x), fn.fake_quantize(x))
    with pytest.raises(ValueError, match="act saturation"):
        ActQuantizer(4, 3, torch.tensor([1.0]), saturate=500.0)
