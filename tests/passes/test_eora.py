"""EoRA: low-rank compensation in the activation eigenspace, alone and after GPTQ in the engine."""

import pytest
import torch

from trtcompress.compressed import CompressedLinearState, IntFormat, QuantizedWeight, compressed_linears
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassContext
from trtcompress.passes.engine import run_sequential
from trtcompress.passes.eora import EoRAConfig, EoRAPass, eora_factors, with_lowrank
from trtcompress.passes.gptq import GPTQConfig, GPTQPass


def _inputs(n=4096, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 1, d)
    return (
        torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    ) * scales


def _quantized(w):
    return QuantizedWeight.round_to_nearest(w, IntFormat(3, 16, True))


def test_full_rank_eora_reproduces_the_uncompressed_layer_output():
    x = _inputs()
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(1))
    state = CompressedLinearState(40, 48, quantized=_quantized(w))
    a, b = eora_factors(w - state.weight(), x.T @ x / len(x), rank=40)  # min(out, in)
    full = with_lowrank(state, a, b, torch.float32)
    assert torch.allclose(full.forward(x), x @ w.T, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(state.forward(x), x @ w.T, atol=1e-1)  # the compressed layer alone is off


def test_fp16_factors_stay_finite_whatever_the_scale_of_the_covariance():
    """Λ^(-1/2) went into B alone: an all-zero covariance (dead inputs) gave A ~1e-10 and B ~1e8, which
    fp16 stored as 0 and inf, so the corrected layer's weight was NaN."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    state = CompressedLinearState(16, 32, quantized=_quantized(w))
    for scale in (0.0, 1e-12, 1.0):
        a, b = eora_factors(w - state.weight(), scale * torch.eye(32), rank=8)
        corrected = with_lowrank(state, a, b, torch.float16).weight()
        assert torch.isfinite(corrected).all(), scale
        assert torch.allclose(corrected, state.weight() + a @ b, atol=1e-3), scale


def test_eora_error_falls_with_rank_and_beats_a_plain_svd_of_the_weight_error():
    x = _inputs(seed=2)
    w = torch.randn(40, 48, generator=torch.Generator().manual_seed(3))
    w_hat = _quantized(w).dequantize()
    delta = w - w_hat
    h = x.T @ x / len(x)
    errors = []
    for rank in (2, 8, 16, 32):
        a, b = eora_factors(delta, h, rank)
        errors.append(float((x @ (delta - a @ b).T).pow(2).mean()))
        u, s, vh = torch.linalg.svd(delta)
        plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert errors[-1] < float((x @ (delta - plain).T).pow(2).mean())
    assert errors == sorted(errors, reverse=True)


def _calib(n=8, t=64):
    return torch.randint(1, 512, (n, t), generator=torch.Generator().manual_seed(0))


def test_gptq_plus_eora_in_one_sweep_is_closer_to_the_dense_model(tiny_model_dir):
    from trtcompress.models import load_model

    calib = _calib()
    reference = load_model(str(tiny_model_dir), log=lambda m: None).model
    with torch.no_grad():
        ref_logits = reference(input_ids=calib).logits
    errors = {}
    for rank in (0, 8, 32):
        model = load_model(str(tiny_model_dir), log=lambda m: None).model
        passes = [GPTQPass(GPTQConfig(bits=3, group_size=32))]
        if rank:
            passes.append(EoRAPass(EoRAConfig(rank=rank, ranks={"mlp.down_proj": rank // 2})))
        run_sequential(model, passes, PassContext(calibration=calib))
        layers = dict(compressed_linears(model))
        for name, module in layers.items():
            expected = 0 if not rank else (rank // 2 if name.endswith("down_proj") else rank)
            assert module.state.rank == expected, name
        with torch.no_grad():
            errors[rank] = float((model(input_ids=calib).logits - ref_logits).pow(2).mean())
    assert errors[32] < errors[8] < errors[0], errors


def test_eora_refuses_a_layer_compressed_in_an_earlier_sweep(tiny_model):
    model = tiny_model.model
    run_sequential(
        model, [GPTQPass(GPTQConfig(bits=4, group_size=32))], PassContext(calibration=_calib(2, 32))
    )
    with pytest.raises(CompressionError, match="same sweep"):
        run_sequential(model, [EoRAPass(EoRAConfig(rank=4))], PassContext(calibration=_calib(2, 32)))


def test_bad_ranks_are_refused_with_the_layer_named(tiny_model):
    delta, h = torch.randn(8, 12), torch.eye(12)
    with pytest.raises(ValueError, match=r"rank 9 is outside \[1, min\(out, in\) = 8\]"):
        eora_factors(delta, h, 9)
    with pytest.raises(ValueError, match="Hessian shape"):
        eora_factors(delta, torch.eye(8), 4)
    overflowed = torch.eye(12)
    overflowed[3, 3] = torch.inf  # was a LinAlgError traceback from the SVD
    with pytest.raises(CompressionError, match="non-finite"):
        eora_factors(delta, overflowed, 4)
    with pytest.raises(ValueError, match=">= 0"):
        EoRAConfig(ranks={"down_proj": -1})
    passes = [GPTQPass(GPTQConfig(bits=4, group_size=32)), EoRAPass(EoRAConfig(rank=49))]
    with pytest.raises(CompressionError, match=r"rank 49 for model\.layers\.0\.self_attn\.k_proj exceeds"):
        run_sequential(tiny_model.model, passes, PassContext(calibration=_calib(2, 32)))


def test_a_ranks_pattern_matching_no_layer_is_an_error_before_calibration(tiny_model):
    """A typo in a `ranks` key (donw_proj) used to leave those layers at the default rank, silently."""
    model = tiny_model.model
    passes = [
        GPTQPass(GPTQConfig(bits=4, group_size=32)),
        EoRAPass(EoRAConfig(rank=4, ranks={"re:layers\\.1\\.": 8, "donw_proj": 16})),
    ]
    with pytest.raises(CompressionError, match="`ranks` pattern 'donw_proj' matches none of the layers"):
        run_sequential(model, passes, PassContext(calibration=_calib(2, 32)))
    assert not list(compressed_linears(model))  # refused before anything was compressed


def test_refine_lowers_the_output_error_of_the_first_layer_and_needs_a_requantizer(tiny_model_dir):
    from trtcompress.models import load_model
    from trtcompress.passes.awq import AWQConfig, AWQPass

    calib = _calib()
    reference = load_model(str(tiny_model_dir), log=lambda m: None).model
    captured = {}
    q_proj = reference.model.layers[0].self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        reference(input_ids=calib)
    x = captured["x"].float()
    h = x.T @ x / len(x)  # layer 0 sees the same inputs in every run: its error is comparable
    errors = {}
    for refine in (0, 3):
        model = load_model(str(tiny_model_dir), log=lambda m: None).model
        passes = [GPTQPass(GPTQConfig(bits=3, group_size=32)), EoRAPass(EoRAConfig(rank=4, refine=refine))]
        run_sequential(model, passes, PassContext(calibration=calib))
        state = model.model.layers[0].self_attn.q_proj.state
        assert state.rank == 4 and state.quantized is not None
        d = q_proj.weight.detach().float() - state.weight()
        errors[refine] = float(torch.einsum("oi,ij,oj->", d, h, d))
    assert errors[3] < errors[0], errors
    awq_then_refine = [AWQPass(AWQConfig(bits=4, group_size=32)), EoRAPass(EoRAConfig(rank=4, refine=1))]
    model = load_model(str(tiny_model_dir), log=lambda m: None).model
    with pytest.raises(CompressionError, match="refine needs the pass that compressed"):
        run_sequential(model, awq_then_refine, PassContext(calibration=calib))


@pytest.mark.parametrize("later", ["minmax-fp4", "awq"])
def test_refine_never_swaps_a_later_pass_state_back_for_gptq(tiny_model, later):
    # gptq's re-quantizer stayed registered when a later pass of the sweep replaced its state: refine
    # then re-quantized with GPTQ, silently dropping minmax-fp4's activation quantizer (W4A4 -> W4A16)
    # or awq's state (on a Hessian of the unscaled input).
    from trtcompress.passes.awq import AWQConfig, AWQPass
    from trtcompress.passes.fp4 import MinMaxFP4Config, MinMaxFP4Pass

    second = MinMaxFP4Pass(MinMaxFP4Config()) if later == "minmax-fp4" else AWQPass(AWQConfig(group_size=32))
    passes = [GPTQPass(GPTQConfig(group_size=32)), second, EoRAPass(EoRAConfig(rank=4, refine=1))]
    with pytest.raises(CompressionError, match="refine needs the pass that compressed"):
        run_sequential(tiny_model.model, passes, PassContext(calibration=_calib(2, 32)))
