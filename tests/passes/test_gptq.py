import pytest
import torch

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.errors import CompressionError
from trtcompress.passes.gptq import gptq_quantize, inverse_hessian_cholesky


def _correlated_inputs(n=2048, d=64, seed=0):
    """Inputs with strongly correlated channels of different scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mixing * (1 + 4 * torch.rand(d, generator=g))
    return x


def _output_error(w, w_hat, x):
    return (x @ (w - w_hat).T).pow(2).mean().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    ("bits", "group", "sym"), [(4, 16, True), (3, 32, False), (4, 0, True), (2, 16, False)]
)
def test_gptq_beats_round_to_nearest_on_layer_output(act_order, bits, group, sym):
    x = _correlated_inputs()
    w = torch.randn(48, 64)
    fmt = IntFormat(bits, group, sym)
    h = 2 * x.T @ x / x.shape[0]
    result = gptq_quantize(w, h, fmt, act_order=act_order, block_size=16)
    w_gptq = intgrid.dequantize_groups(result.codes, result.scales, result.zeros, bits, group)
    codes, scales, zeros = intgrid.quantize_groups(w, bits, group, sym)
    w_rtn = intgrid.dequantize_groups(codes, scales, zeros, bits, group)
    assert _output_error(w, w_gptq, x) < 0.8 * _output_error(w, w_rtn, x)


def test_static_groups_keep_original_column_order_and_group_scales():
    """With act-order, every column uses the scale of its own (contiguous) group in the original order."""
    x = _correlated_inputs(d=40)
    w = torch.randn(8, 40)
    fmt = IntFormat(4, 16, True)  # groups 16, 16, 8 (partial)
    result = gptq_quantize(w, 2 * x.T @ x / len(x), fmt, act_order=True)
    assert result.scales.shape == (8, 3)
    padded = torch.nn.functional.pad(w, (0, 8)).reshape(8, 3, 16)
    valid = (torch.arange(48) < 40).reshape(3, 16)
    expected, _ = intgrid.group_scale_zero(padded, 4, True, valid)
    assert torch.equal(result.scales.float(), expected)


def test_dead_inputs_and_exact_grid_weights():
    x = _correlated_inputs(d=32)
    x[:, 5] = 0  # a channel that is never active
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    w[:, 5] = 0  # so that no group's range is set by the dead channel...
    codes, scales, _ = intgrid.quantize_groups(w, 4, 16, True)
    codes[:, 5] = 1  # ...which then holds the smallest non-zero grid value
    on_grid = intgrid.dequantize_groups(codes, scales, None, 4, 16)
    result = gptq_quantize(on_grid, 2 * x.T @ x / len(x), IntFormat(4, 16, True), act_order=False)
    w_hat = intgrid.dequantize_groups(result.codes, result.scales, None, 4, 16)
    alive = torch.ones(32, dtype=torch.bool)
    alive[5] = False
    assert torch.allclose(w_hat[:, alive], on_grid[:, alive], atol=1e-6)  # already on the grid: unchanged
    assert (w_hat[:, 5] == 0).all()


def test_indefinite_hessian_is_retried_with_more_damping():
    h = torch.eye(8)
    h[0, 0] = -0.5  # indefinite: fails at damp 0.01 and 0.1, passes at 1.0 (mean diagonal 0.8125)
    upper, damp, retries = inverse_hessian_cholesky(h, 0.01)
    assert retries == 2 and damp == pytest.approx(1.0)
    assert torch.isfinite(upper).all()


def test_hopeless_hessian_is_an_error_not_nans():
    h = -torch.eye(4)
    with pytest.raises(CompressionError, match="not positive definite"):
        inverse_hessian_cholesky(h, 0.01)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), IntFormat(4, 0, True))


def test_gptq_after_pruning_in_the_same_sweep_keeps_the_mask(tiny_model):
    """wanda + gptq in one sweep: GPTQ's error feedback used to fill the pruned zeros back in (48.8% zeros
    left of 2:4's 50%) and the state lost its mask. Pruned weights must stay zero, under the mask."""
    from trtcompress.compressed import compressed_linears
    from trtcompress.passes.base import PassContext
    from trtcompress.passes.engine import run_sequential
    from trtcompress.passes.gptq import GPTQConfig, GPTQPass
    from trtcompress.passes.wanda import WandaConfig, WandaPass

    calib = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    passes = [WandaPass(WandaConfig(pattern="2:4")), GPTQPass(GPTQConfig(bits=4, group_size=32))]
    run_sequential(tiny_model.model, passes, PassContext(calibration=calib))
    layers = dict(compressed_linears(tiny_model.model))
    assert len(layers) == 14
    for name, module in layers.items():
        state = module.state
        assert state.quantized is not None and state.mask is not None and state.mask.pattern == "2:4", name
        w = state.weight()
        assert bool((w[~state.mask.dense()] == 0).all()), name
        assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()), name


def test_masked_gptq_feeds_the_pruned_weights_back():
    """With a fixed mask, GPTQ compensates the pruned weights too: closer to the dense layer's output
    than quantizing the pruned weight on its own."""
    x = _correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    h = 2 * x.T @ x / x.shape[0]
    keep = torch.rand(32, 64, generator=torch.Generator().manual_seed(5)) > 0.5
    fmt = IntFormat(4, 32, True)

    def dequantized(result):
        from trtcompress.compressed.state import QuantizedWeight

        q = QuantizedWeight.from_codes(result.codes, result.scales, result.zeros, fmt)
        return q.dequantize().masked_fill(~keep, 0)

    masked = dequantized(gptq_quantize(w, h, fmt, keep=keep))
    plain = dequantized(gptq_quantize(w * keep, h, fmt))
    assert bool((masked[~keep] == 0).all())
    assert _output_error(w, masked, x) < 0.9 * _output_error(w, plain, x)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_block_size_does_not_change_the_result(sym, masked):
    """Lazy block updates are exact: block_size is a speed knob only. Without act-order a group's scale
    is fixed at its first column; a group straddling two blocks (group 32, block 20) used to take its
    tail from weights that still lacked the block's pending error feedback, so scales and codes changed."""
    x = _correlated_inputs(d=96)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    keep = torch.rand(16, 96, generator=torch.Generator().manual_seed(7)) > 0.3 if masked else None
    fmt = IntFormat(4, 32, sym)
    unblocked = gptq_quantize(w, h, fmt, act_order=False, block_size=1, keep=keep)
    for block_size in (20, 48, 128):
        blocked = gptq_quantize(w, h, fmt, act_order=False, block_size=block_size, keep=keep)
        assert torch.equal(blocked.scales, unblocked.scales), block_size
        assert torch.equal(blocked.codes, unblocked.codes), block_size


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_is_named_as_such(bad):
    """A NaN/inf Hessian (overflowing activations) was retried with damping up to 100 and reported as
    'not positive definite', pointing at the wrong cause."""
    x = _correlated_inputs(d=16)
    h = 2 * x.T @ x / x.shape[0]
    h[3, 4] = h[4, 3] = bad
    with pytest.raises(CompressionError, match="non-finite"):
        inverse_hessian_cholesky(h, 0.01)
    with pytest.raises(CompressionError, match="non-finite"):
        gptq_quantize(torch.randn(4, 16), h, IntFormat(4, 0, True))


def test_non_finite_weight_is_refused():
    """A NaN weight used to become an arbitrary (finite) code, silently."""
    x = _correlated_inputs(d=16)
    w = torch.randn(4, 16)
    w[1, 2] = float("nan")
    with pytest.raises(CompressionError, match="non-finite"):
        gptq_quantize(w, 2 * x.T @ x / x.shape[0], IntFormat(4, 0, True))
