from typing import ClassVar, Literal

import pytest
import torch

from trtcompress.compressed import CompressedLinearState, IntFormat, QuantizedWeight, compressed_linears
from trtcompress.passes.awq import AWQConfig, AWQPass, search_clip, search_scale
from trtcompress.passes.base import PassConfig, PassContext
from trtcompress.passes.engine import ABS_MEAN, CalibratedPass, run_sequential
from trtcompress.passes.gsq import GSQConfig, GSQPass


class FoldConfig(PassConfig):
    method: Literal["fold-test"] = "fold-test"
    quantize_first: bool = False


class RandomFold(CalibratedPass):
    """Folds a random positive per-channel scale into every group's producer, keeping weights dense
    (or INT8-quantized before the fold when `quantize_first`), as AWQ does."""

    config_type = FoldConfig
    method = "fold-test"
    needs: ClassVar[frozenset[str]] = frozenset({ABS_MEAN})

    def compress_group(self, group, names, stats, context):
        in_f = group.weight(names[0]).shape[1]
        if group.producer_width() not in (None, in_f):
            scale = None  # GQA: v_proj's output is narrower than o_proj's input
        else:
            scale = torch.rand(in_f, generator=torch.Generator().manual_seed(in_f)) * 3 + 0.25
            group.fold_into_producer(scale)
        for name in names:
            w = group.weight(name) * (scale if scale is not None else 1)
            if self.config.quantize_first:
                q = QuantizedWeight.round_to_nearest(w, IntFormat(8, 0, True))
                state = CompressedLinearState(w.shape[0], w.shape[1], quantized=q)
            else:
                state = CompressedLinearState(w.shape[0], w.shape[1], dense_weight=w)
            group.set_state(name, state)


def _calibration():
    return torch.randint(1, 512, (4, 48), generator=torch.Generator().manual_seed(1))


def test_folded_scales_compute_the_same_function(tiny_model_dir):
    """Folding into norms and into (already compressed) producing linears keeps the model's function."""
    from trtcompress.models import load_model

    ref = load_model(str(tiny_model_dir), log=print).model
    model = load_model(str(tiny_model_dir), log=print).model
    run_sequential(model, [RandomFold(FoldConfig())], PassContext(calibration=_calibration()))
    ids = torch.randint(1, 512, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, ref.model.layers[0].input_layernorm.weight)  # the fold really happened


def test_fold_into_a_compressed_producer_rescales_its_rows_exactly(tiny_model_dir):
    from trtcompress.models import load_model

    ref = load_model(str(tiny_model_dir), log=print).model
    int8 = load_model(str(tiny_model_dir), log=print).model
    GSQPass(GSQConfig(bits=8, group_size=0)).apply(int8, PassContext())
    folded = load_model(str(tiny_model_dir), log=print).model
    run_sequential(
        folded, [RandomFold(FoldConfig(quantize_first=True))], PassContext(calibration=_calibration())
    )
    ids = torch.randint(1, 512, (2, 40))
    with torch.no_grad():
        base = ref(input_ids=ids).logits
        err_int8 = (int8(input_ids=ids).logits - base).abs().max()
        err_folded = (folded(input_ids=ids).logits - base).abs().max()
    assert err_folded < 3 * err_int8 + 1e-3  # same function up to quantization (scales stay fp16-exact)


def test_a_fold_reaches_a_producer_compressed_by_an_earlier_sweep(tiny_model_dir):
    """up_proj INT8-quantized in one sweep, then a second sweep folds a scale into it from down_proj's
    group without compressing it again: the restored state must carry the fold (it used to be put back
    unfolded, so down_proj saw inputs `scale` times too large)."""
    from trtcompress.models import load_model

    ref = load_model(str(tiny_model_dir), log=print).model
    model = load_model(str(tiny_model_dir), log=print).model
    GSQPass(GSQConfig(bits=8, group_size=0, targets=["up_proj"])).apply(model, PassContext())
    ids = torch.randint(1, 512, (2, 40))
    with torch.no_grad():
        base = ref(input_ids=ids).logits
        err_int8 = (model(input_ids=ids).logits - base).abs().max()
    up = model.model.layers[0].mlp.up_proj.state.weight().clone()
    run_sequential(
        model, [RandomFold(FoldConfig(targets=["down_proj"]))], PassContext(calibration=_calibration())
    )
    assert not torch.equal(model.model.layers[0].mlp.up_proj.state.weight(), up)  # the fold reached it
    with torch.no_grad():
        err = (model(input_ids=ids).logits - base).abs().max()
    assert err < 3 * err_int8 + 1e-3  # the same function up to the INT8 error


def test_awq_does_not_fold_into_a_producer_with_block_fp4_scales(tiny_model):
    """nvfp4 then awq on down_proj only: up_proj's E4M3 block scales cannot take the fold, which used to
    end the build with a bare ValueError ("rows of a nvfp4 weight cannot be rescaled exactly"); now that
    group is left unscaled (clip only), as under GQA, and the log says why."""
    from trtcompress.passes.fp4 import NVFP4Config, NVFP4Pass

    model = tiny_model.model
    NVFP4Pass(NVFP4Config()).apply(model, PassContext())
    up = model.model.layers[0].mlp.up_proj.state.weight().clone()
    logs: list[str] = []
    awq = AWQPass(AWQConfig(group_size=32, targets=["down_proj"]))
    run_sequential(model, [awq], PassContext(calibration=_calibration(), log=logs.append))
    assert torch.equal(model.model.layers[0].mlp.up_proj.state.weight(), up)
    assert model.model.layers[0].mlp.down_proj.format_name == "int4_g32_sym"
    assert any("mlp_out not scaled" in line and "mlp.up_proj" in line for line in logs), logs


def test_scale_search_never_worse_than_plain_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 8, 64)  # a few salient channels
    w = torch.randn(32, 64, generator=g)
    fmt = IntFormat(3, 16, True)
    gram = x.T @ x / len(x)
    s, alpha, error = search_scale(gram, [w], x.abs().mean(0), fmt, 10)
    _, _, plain = search_scale(gram, [w], x.abs().mean(0), fmt, 1)  # grid of 1 = α 0 only
    assert error <= plain and alpha > 0
    assert s.shape == (64,) and (s > 0).all()


def test_clip_search_lowers_output_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    w = torch.randn(16, 64, generator=g)
    w[:, 3] *= 12  # outliers that stretch every row's range
    fmt = IntFormat(3, 32, True)
    from trtcompress.passes.awq import fake_quantize

    plain = (x @ (w - fake_quantize(w, fmt)).T).pow(2).mean()
    clipped = search_clip(x.T @ x / len(x), w, fmt, 20, 0.5)
    assert (clipped.abs() <= w.abs() + 1e-6).all()
    assert (x @ (w - fake_quantize(clipped, fmt)).T).pow(2).mean() < plain


def test_awq_through_the_engine_beats_rtn(tiny_model_dir):
    from trtcompress.models import load_model

    calib = torch.randint(1, 512, (8, 64), generator=torch.Generator().manual_seed(2))
    ref = load_model(str(tiny_model_dir), log=print).model
    with torch.no_grad():
        target = torch.log_softmax(ref(input_ids=calib).logits, -1)

    def kl(model):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=calib).logits, -1)
        return (target.exp() * (target - logp)).sum(-1).mean().item()

    awq = load_model(str(tiny_model_dir), log=print).model
    run_sequential(awq, [AWQPass(AWQConfig(bits=3, group_size=32, grid=10))], PassContext(calibration=calib))
    rtn = load_model(str(tiny_model_dir), log=print).model
    GSQPass(GSQConfig(bits=3, group_size=32)).apply(rtn, PassContext())
    assert len(dict(compressed_linears(awq))) == 14
    assert kl(awq) < kl(rtn)


@pytest.mark.parametrize("bad", [{"grid": 0}, {"max_shrink": 1.0}, {"group_size": 48}])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        AWQConfig(**bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_an_error_not_plain_rounding(bad):
    """With a NaN/inf Gram matrix (overflowing activations) every candidate's error was NaN, none won,
    and both searches silently returned plain rounding (α 0, no clipping)."""
    from trtcompress.errors import CompressionError

    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    gram = x.T @ x / len(x)
    gram[2, 5] = gram[5, 2] = bad
    fmt = IntFormat(4, 16, True)
    with pytest.raises(CompressionError, match="non-finite"):
        search_scale(gram, [w], x.abs().mean(0), fmt, 10)
    with pytest.raises(CompressionError, match="non-finite"):
        search_clip(gram, w, fmt, 20, 0.5)
