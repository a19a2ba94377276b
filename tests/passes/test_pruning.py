"""Sparsity masks, their compact encoding in CompressedLinearState, low-rank factors, magnitude pruning."""

import pytest
import torch

from trtcompress.compressed import CompressedLinear, CompressedLinearState, IntFormat, QuantizedWeight
from trtcompress.compressed.sparsity import SparsityMask, make_mask, nm_mask, row_mask
from trtcompress.errors import CompressionError
from trtcompress.passes.magnitude import MagnitudeConfig, MagnitudePass
from trtcompress.passes.pruning import PruneConfig


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_keep_exactly_n_of_every_m(n, m):
    scores = torch.randn(37, 64, generator=_gen()).abs()
    keep = nm_mask(scores, n, m)
    assert torch.equal(keep.reshape(37, -1, m).sum(-1), torch.full((37, 64 // m), n))
    # ...and the kept ones are the largest of their group.
    grouped = scores.reshape(37, -1, m)
    kept_min = torch.where(keep.reshape(37, -1, m), grouped, torch.inf).amin(-1)
    pruned_max = torch.where(keep.reshape(37, -1, m), -torch.inf, grouped).amax(-1)
    assert bool((kept_min >= pruned_max).all())
    SparsityMask.from_bool(keep, f"{n}:{m}")  # validates


def test_mask_that_is_not_nm_is_refused():
    keep = nm_mask(torch.rand(8, 16, generator=_gen()), 2, 4)
    keep[3, :4] = True
    with pytest.raises(ValueError, match="not 2:4"):
        SparsityMask.from_bool(keep, "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        SparsityMask.from_bool(torch.ones(2, 6, dtype=torch.bool), "2:4")


def test_row_mask_prunes_floor_of_the_exact_fraction():
    """100 * 0.29 is 28.999... in binary: 29 pruned per row, not 28 (SparseGPT rounds the same count)."""
    for in_f, sparsity, pruned in ((100, 0.29, 29), (100, 0.57, 57), (50, 0.58, 29), (10, 0.25, 2)):
        keep = row_mask(torch.rand(2, in_f, generator=_gen()), sparsity)
        assert (keep.shape[1] - keep.sum(1) == pruned).all(), (in_f, sparsity)


def test_unstructured_row_mask_prunes_the_same_count_per_row():
    keep = row_mask(torch.rand(10, 50, generator=_gen()), 0.3)
    assert torch.equal(keep.sum(1), torch.full((10,), 35))


def test_pattern_and_sparsity_must_agree():
    assert PruneConfig(method="x", pattern="4:8").target_sparsity == 0.5
    with pytest.raises(ValueError, match=r"prunes 0\.5"):
        PruneConfig(method="x", pattern="2:4", sparsity=0.6)
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(method="x", pattern="2of4")


def _sparse_states():
    w = torch.randn(24, 64, generator=_gen(1))
    keep = make_mask(w.abs(), "2:4", 0.5)
    dense = CompressedLinearState(
        24, 64, dense_weight=(w * keep).half(), bias=torch.randn(24), mask=SparsityMask.from_bool(keep, "2:4")
    )
    q = QuantizedWeight.round_to_nearest(w * keep, IntFormat(4, 32, False))
    quant = CompressedLinearState(24, 64, quantized=q, mask=SparsityMask.from_bool(keep, "2:4"))
    return w, keep, dense, quant


def test_sparse_state_stores_only_kept_values_and_a_bitmap():
    _, keep, dense, quant = _sparse_states()
    t = dense.tensors()
    assert set(t) == {"values", "mask", "bias"} and t["values"].numel() == int(keep.sum())
    # 2:4 at fp16: 16 bits x 1/2 + 1 mask bit per weight = exactly 9 bits per weight.
    assert dense.weight_nbytes * 8 / (24 * 64) == 9.0
    tq = quant.tensors()
    assert "qweight" not in tq and tq["qvalues"].numel() == int(keep.sum()) * 4 // 8
    # int4 g32 asym: 2 bits (kept codes) + 1 (mask) + 16/32 scales + 8/32 zeros.
    assert quant.weight_nbytes * 8 / (24 * 64) == pytest.approx(2 + 1 + 0.5 + 0.25)


def test_sparse_states_round_trip_exactly_and_run_with_zeros_at_pruned_positions():
    w, keep, dense, quant = _sparse_states()
    x = torch.randn(5, 64, generator=_gen(2))
    for state in (dense, quant):
        again = CompressedLinearState.from_tensors(state.meta(), state.tensors())
        assert torch.equal(again.weight(), state.weight())
        assert bool((state.weight()[~keep] == 0).all())
        module = CompressedLinear(state)
        bias = state.bias.float() if state.bias is not None else None
        assert torch.allclose(module(x), torch.nn.functional.linear(x, state.weight(), bias), atol=1e-5)
    assert torch.allclose(dense.weight()[keep], w[keep], atol=1e-2)  # fp16 values


def test_lowrank_factors_are_added_as_x_bt_at_and_survive_serialisation_and_row_scaling():
    w = torch.randn(16, 32, generator=_gen(3))
    a, b = torch.randn(16, 4, generator=_gen(4)), torch.randn(4, 32, generator=_gen(5))
    q = QuantizedWeight.round_to_nearest(w, IntFormat(4, 16, True))
    state = CompressedLinearState(16, 32, quantized=q, lowrank_a=a, lowrank_b=b)
    x = torch.randn(3, 32, generator=_gen(6))
    expected = x @ (q.dequantize() + a @ b).T
    assert torch.allclose(state.forward(x), expected, atol=1e-4)
    assert torch.allclose(state.weight(), q.dequantize() + a @ b, atol=1e-5)
    again = CompressedLinearState.from_tensors(state.meta(), state.tensors())
    assert again.rank == 4 and torch.allclose(again.forward(x), expected, atol=1e-4)
    factor = torch.rand(16, generator=_gen(7)) + 0.5
    scaled = state.scale_rows(factor)
    assert torch.allclose(scaled.forward(x), expected * factor, atol=1e-2)
    with pytest.raises(ValueError, match="shapes"):
        CompressedLinearState(16, 32, quantized=q, lowrank_a=a, lowrank_b=b[:, :8])


def test_magnitude_pass_keeps_the_largest_weights():
    w = torch.randn(8, 16, generator=_gen(8))
    state = CompressedLinearState(8, 16, dense_weight=w)
    out = MagnitudePass(MagnitudeConfig(pattern="4:8", dtype="float32")).compress_linear("x", state)
    kept = out.weight() != 0
    assert torch.equal(kept, nm_mask(w.abs(), 4, 8))
    assert torch.equal(out.weight()[kept], w[kept])
    with pytest.raises(CompressionError, match="y: 4:8 sparsity needs in_features divisible by 8"):
        MagnitudePass(MagnitudeConfig(pattern="4:8")).compress_linear(
            "y", CompressedLinearState(2, 12, dense_weight=torch.randn(2, 12))
        )


def test_pruning_a_quantized_layer_is_refused(tiny_model):
    """gsq then magnitude used to turn every INT4 layer back into a float16 pruned one, silently."""
    from trtcompress.errors import CompressionError
    from trtcompress.passes import PassContext, build_pass
    from trtcompress.passes.gsq import GSQConfig

    model = tiny_model.model
    build_pass(GSQConfig(bits=4, group_size=32)).apply(model, PassContext())
    with pytest.raises(
        CompressionError, match=r"already compressed \(int4_g32_sym\).*put the pruning pass first"
    ):
        MagnitudePass(MagnitudeConfig(pattern="2:4")).apply(model, PassContext())


def test_a_pass_that_would_drop_a_mask_is_refused(tiny_model):
    """nvfp4 has no sparse form: after 2:4 pruning it would have stored the layer dense, mask gone."""
    from trtcompress.errors import CompressionError
    from trtcompress.passes import PassContext, build_pass
    from trtcompress.passes.fp4 import NVFP4Config

    model = tiny_model.model
    MagnitudePass(MagnitudeConfig(pattern="2:4")).apply(model, PassContext())
    with pytest.raises(
        CompressionError, match=r"is pruned \(2:4\) and this pass would drop its sparsity mask"
    ):
        build_pass(NVFP4Config()).apply(model, PassContext())
