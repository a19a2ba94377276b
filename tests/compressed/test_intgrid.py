import pytest
import torch

from trtcompress.compressed import intgrid


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_is_at_most_half_a_step(bits, group_size, symmetric):
    torch.manual_seed(0)
    w = torch.randn(24, 160)
    codes, scales, zeros = intgrid.quantize_groups(w, bits, group_size, symmetric)
    assert int(codes.max()) < 2**bits
    assert scales.dtype == torch.float16
    assert (zeros is None) == symmetric
    deq = intgrid.dequantize_groups(codes, scales, zeros, bits, group_size)
    g = intgrid.effective_group_size(160, group_size)
    step = scales.float()[:, torch.arange(160) // g]
    # Symmetric: half a step (plus fp16 rounding of the scale). Asymmetric: rounding the zero point to an
    # integer shifts the grid by up to half a step, so the extremes may be off by up to one step.
    bound = 0.5 * step * 1.01 if symmetric else 1.0 * step * 1.01
    assert ((w - deq).abs() <= bound + 1e-6).all()
    assert (w - deq).abs().mean() <= 0.3 * step.mean()


def test_partial_last_group_uses_only_its_own_values():
    w = torch.zeros(1, 576)
    w[0, :512] = 100.0
    w[0, 512:] = torch.linspace(-1, 1, 64)
    codes, scales, _ = intgrid.quantize_groups(w, 4, 128, True)
    assert scales.shape == (1, 5)
    assert scales[0, 4].item() == pytest.approx(1 / 7, rel=1e-3)  # from max |w| = 1 of the 64-wide tail
    deq = intgrid.dequantize_groups(codes, scales, None, 4, 128)
    assert (deq[0, 512:] - w[0, 512:]).abs().max() <= 0.5 / 7 + 1e-3


def test_symmetric_grid_keeps_zero_and_sign():
    w = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0, 0.5]])
    codes, scales, _ = intgrid.quantize_groups(w, 4, 0, True)
    deq = intgrid.dequantize_groups(codes, scales, None, 4, 0)
    assert deq[0, 2] == 0
    assert torch.equal(torch.sign(deq[0, :5]), torch.sign(w[0, :5]))
    assert deq[0, 4].item() == pytest.approx(2.0, rel=1e-3)


def test_all_zero_group_is_exact():
    w = torch.zeros(3, 64)
    codes, scales, zeros = intgrid.quantize_groups(w, 4, 32, False)
    assert torch.equal(intgrid.dequantize_groups(codes, scales, zeros, 4, 32), w)


def test_requantizing_the_dequantized_weight_is_idempotent():
    torch.manual_seed(1)
    w = torch.randn(16, 96)
    codes, scales, zeros = intgrid.quantize_groups(w, 4, 32, False)
    deq = intgrid.dequantize_groups(codes, scales, zeros, 4, 32)
    codes2, scales2, zeros2 = intgrid.quantize_groups(deq, 4, 32, False)
    assert torch.equal(intgrid.dequantize_groups(codes2, scales2, zeros2, 4, 32), deq)


def test_smaller_groups_have_smaller_error():
    torch.manual_seed(2)
    w = torch.randn(64, 512) * torch.rand(1, 512) * 3  # channels of different scale, as in real weights
    errors = []
    for g in (128, 64, 32, 16):
        codes, scales, _ = intgrid.quantize_groups(w, 4, g, True)
        errors.append((intgrid.dequantize_groups(codes, scales, None, 4, g) - w).pow(2).mean().item())
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(group_size=-1)])
def test_invalid_parameters(bad):
    args = dict(bits=4, group_size=32, symmetric=True) | bad
    with pytest.raises(ValueError):
        intgrid.quantize_groups(torch.randn(4, 64), **args)


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        intgrid.quantize_groups(torch.randn(4, 4, 4), 4, 0, True)


def test_scales_stay_finite_and_positive_at_the_fp16_limits():
    """A group beyond fp16's range clamps its scale to the largest fp16 (it rounded to inf: NaN
    weights); one that underflows fp16 gets a positive scale (it stored 0: a zero row)."""
    huge = torch.tensor([[1e6, -3.0, 2.0, 1.0]])
    tiny = torch.full((1, 4), 1e-7) * torch.tensor([1.0, -2.0, 3.0, 0.5])
    for w, symmetric in ((huge, True), (huge, False), (tiny, True), (tiny, False)):
        scale, zero = intgrid.group_scale_zero(w, 4, symmetric)
        assert torch.isfinite(scale).all() and (scale > 0).all(), (w, symmetric, scale)
        codes = intgrid.quantize_to_codes(w, scale[:, None], zero[:, None], 4)
        assert torch.isfinite(intgrid.dequantize_codes(codes, scale[:, None], zero[:, None])).all()


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_that_underflows_fp16_keeps_the_smallest_subnormal(bits, symmetric):
    """A group whose scale underflows fp16 (max|w| < qpos * 2**-25: 3.8e-6 at 8 bits) got scale 1, so it
    dequantized to all zeros; fp16's smallest subnormal (2**-24) keeps it on the grid. An all-zero group
    still gets scale 1."""
    qpos = 2 ** (bits - 1) - 1
    w = torch.zeros(2, 16)
    w[0] = torch.linspace(-0.9, 0.9, 16) * qpos * 2.0**-25
    codes, scales, zeros = intgrid.quantize_groups(w, bits, 0, symmetric)
    assert scales[0, 0].item() == 2.0**-24 and scales[1, 0].item() == 1
    deq = intgrid.dequantize_groups(codes, scales, zeros, bits, 0)
    assert (deq[0] - w[0]).abs().max() <= 2.0**-24  # was all zeros: error max|w[0]|
    assert deq[0].abs().max() > 0 and deq[1].abs().sum() == 0
