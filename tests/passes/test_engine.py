"""The sequential calibration engine on the tiny random LLaMA."""

from typing import ClassVar, Literal

import pytest
import torch

from trtcompress.compressed import (
    CompressedLinear,
    CompressedLinearState,
    IntFormat,
    QuantizedWeight,
    compressed_linears,
)
from trtcompress.errors import CalibrationError, CompressionError
from trtcompress.passes.base import PassConfig, PassContext
from trtcompress.passes.engine import HESSIAN, CalibratedPass, collect_stats, run_sequential
from trtcompress.passes.gptq import GPTQConfig, GPTQPass


class RecordingConfig(PassConfig):
    method: Literal["recording-test"] = "recording-test"


class RecordingRTN(CalibratedPass):
    """Round-to-nearest INT4 that records the Hessian it was given for every linear."""

    config_type = RecordingConfig
    method = "recording-test"
    needs: ClassVar[frozenset[str]] = frozenset({HESSIAN})

    def __init__(self, config):
        super().__init__(config)
        self.seen: dict[str, torch.Tensor] = {}

    def compress_group(self, group, names, stats, context):
        for name in names:
            self.seen[name] = stats.hessian
            q = QuantizedWeight.round_to_nearest(group.weight(name), IntFormat(4, 32, True))
            group.set_state(name, CompressedLinearState(q.out_features, q.in_features, quantized=q))


def _calibration(n=4, t=32):
    return torch.randint(1, 512, (n, t), generator=torch.Generator().manual_seed(0))


def test_every_decoder_linear_is_compressed_and_lm_head_is_not(tiny_model):
    model = tiny_model.model
    run_sequential(model, [GPTQPass(GPTQConfig(group_size=32))], PassContext(calibration=_calibration()))
    names = dict(compressed_linears(model))
    assert len(names) == 14 and "lm_head" not in names
    assert all(isinstance(m, CompressedLinear) for m in names.values())


def test_each_layer_sees_the_compressed_outputs_of_the_previous_one(tiny_model):
    model = tiny_model.model
    calib = _calibration()
    recorder = RecordingRTN(RecordingConfig())
    run_sequential(model, [recorder], PassContext(calibration=calib))
    # Re-run the final (compressed) model and capture what enters layer 1's o_proj and down_proj.
    captured = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in (
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.o_proj",
            "model.layers.1.mlp.down_proj",
        )
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for hook in hooks:
        hook.remove()
    for name, x in captured.items():
        expected = collect_stats(x, frozenset({HESSIAN})).hessian
        assert torch.allclose(recorder.seen[name], expected, rtol=1e-4, atol=1e-5), name


def test_gptq_through_the_engine_beats_rtn_on_calibration_logits(tiny_model_dir):
    from trtcompress.models import load_model
    from trtcompress.passes import PassContext as Ctx
    from trtcompress.passes.gsq import GSQConfig, GSQPass

    calib = _calibration(8, 64)
    ref = load_model(str(tiny_model_dir), log=print).model
    with torch.no_grad():
        target = torch.log_softmax(ref(input_ids=calib).logits, -1)

    def kl(model):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=calib).logits, -1)
        return (target.exp() * (target - logp)).sum(-1).mean().item()

    gptq = load_model(str(tiny_model_dir), log=print).model
    run_sequential(gptq, [GPTQPass(GPTQConfig(bits=3, group_size=32))], Ctx(calibration=calib))
    rtn = load_model(str(tiny_model_dir), log=print).model
    GSQPass(GSQConfig(bits=3, group_size=32)).apply(rtn, Ctx())
    assert kl(gptq) < 0.7 * kl(rtn)


def _final_hessians(model, calib, names):
    """The Hessians of what enters `names` when the compressed model runs on `calib`."""
    captured = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for hook in hooks:
        hook.remove()
    return {name: collect_stats(x, frozenset({HESSIAN})).hessian for name, x in captured.items()}


def test_a_w4a4_state_replaced_in_the_same_sweep_stops_quantizing_the_forward(tiny_model):
    """minmax-fp4 then a weight-only pass on the same layers: the final layers do not quantize their
    input, so the calibration forward must not either (a stale transform did: layer 1 was calibrated on
    activations the final model never computes)."""
    from trtcompress.passes.fp4 import MinMaxFP4Config, MinMaxFP4Pass

    model, calib = tiny_model.model, _calibration()
    recorder = RecordingRTN(RecordingConfig())
    run_sequential(model, [MinMaxFP4Pass(MinMaxFP4Config()), recorder], PassContext(calibration=calib))
    assert all(m.state.act_quant is None for _, m in compressed_linears(model))
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for name, expected in _final_hessians(model, calib, names).items():
        assert torch.allclose(recorder.seen[name], expected, rtol=1e-4, atol=1e-5), name


def test_a_w4a4_layer_from_an_earlier_sweep_quantizes_its_input_in_a_later_one(tiny_model):
    """W4A4 attention from sweep 1 stays W4A4: sweep 2 (MLP only) must calibrate on its quantized
    inputs, as the final model computes them (the float stand-in used to skip the quantization)."""
    from trtcompress.passes.fp4 import MinMaxFP4Config, MinMaxFP4Pass

    model, calib = tiny_model.model, _calibration()
    context = PassContext(calibration=calib)
    run_sequential(model, [MinMaxFP4Pass(MinMaxFP4Config(targets=["self_attn.*"]))], context)
    recorder = RecordingRTN(RecordingConfig(targets=["mlp.*"]))
    run_sequential(model, [recorder], context)
    assert model.get_submodule("model.layers.1.self_attn.o_proj").state.act_quant is not None
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"]
    for name, expected in _final_hessians(model, calib, names).items():
        assert torch.allclose(recorder.seen[name], expected, rtol=1e-4, atol=1e-5), name


def test_calibrated_pass_whose_targets_match_nothing_is_an_error(tiny_model):
    """As for data-free passes: a mistyped target was a silent no-op after a whole calibration sweep."""
    with pytest.raises(CompressionError, match="no linear layer matches"):
        run_sequential(
            tiny_model.model,
            [GPTQPass(GPTQConfig(targets=["qproj"]))],
            PassContext(calibration=_calibration()),
        )


def test_non_finite_calibration_activations_are_an_error(tiny_model):
    model = tiny_model.model
    calib = _calibration()
    model.model.embed_tokens.weight.data[calib[0, 3]] = float("nan")
    with pytest.raises(
        CalibrationError, match=r"non-finite activations entering model\.layers\.0\.self_attn\.q_proj"
    ):
        run_sequential(model, [GPTQPass(GPTQConfig())], PassContext(calibration=calib))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_of_a_calibrated_target_is_an_error(tiny_model, bad):
    """The hook runs before the layer's forward, so the bad weight has not reached any activation yet;
    GPTQ used to turn it into finite garbage (a NaN group scale became 1, codes 0: weights of -8)."""
    model = tiny_model.model
    model.model.layers[1].self_attn.k_proj.weight.data[3, 7] = bad
    with pytest.raises(CompressionError, match=r"model\.layers\.1\.self_attn\.k_proj has non-finite weights"):
        run_sequential(model, [GPTQPass(GPTQConfig())], PassContext(calibration=_calibration()))


def test_calibrated_pass_refuses_lm_head(tiny_model):
    with pytest.raises(CompressionError, match=r"decoder-layer linears only.*lm_head"):
        run_sequential(
            tiny_model.model, [GPTQPass(GPTQConfig(exclude=[]))], PassContext(calibration=_calibration())
        )


def test_missing_calibration_is_an_error(tiny_model):
    with pytest.raises(CalibrationError, match="need calibration data"):
        GPTQPass(GPTQConfig()).apply(tiny_model.model, PassContext())


def test_all_finite_is_exact_for_nan_inf_and_overflowing_sums():
    from trtcompress.passes.engine import all_finite

    x = torch.randn(64, 32)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[5, 7] = bad
        assert not all_finite(y)
    huge = torch.full((4, 4), 3e38)  # finite elements whose sum overflows: still all finite
    assert all_finite(huge)


@pytest.mark.parametrize("later", ["gsq", "gptq"])
def test_a_quantization_pass_after_eora_is_refused_not_folded(tiny_model, later):
    """gptq + eora, then another quantization pass: it would quantize weight + A·B and drop the factors
    (the compensation silently gone, nothing of it stored), so it is refused with the fix named."""
    from trtcompress.passes.eora import EoRAConfig, EoRAPass
    from trtcompress.passes.gsq import GSQConfig, GSQPass

    calib = _calibration()
    run_sequential(
        tiny_model.model,
        [GPTQPass(GPTQConfig(bits=4, group_size=32)), EoRAPass(EoRAConfig(rank=4))],
        PassContext(calibration=calib),
    )
    match = r"rank-4 low-rank factors .* put eora / kd after the last"
    with pytest.raises(CompressionError, match=match):
        if later == "gsq":  # a data-free pass, applied on its own
            GSQPass(GSQConfig(bits=8)).apply(tiny_model.model, PassContext())
        else:  # a calibrated pass in a later sweep
            run_sequential(
                tiny_model.model,
                [GPTQPass(GPTQConfig(bits=4, group_size=32))],
                PassContext(calibration=calib),
            )
