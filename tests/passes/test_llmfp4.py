"""LLM-FP4 W4A4: the joint format / bias search, on tiny tensors and on the tiny random LLaMA."""

import pytest
import torch
from pydantic import ValidationError

from trtcompress.builders.compress import compress_model
from trtcompress.compressed import (
    CompressedLinear,
    CompressedLinearState,
    QuantizedWeight,
    compressed_linears,
)
from trtcompress.compressed.formats import FpFormat
from trtcompress.passes.fp4 import minmax_act_quantizer
from trtcompress.passes.llmfp4 import (
    LLMFP4Config,
    OutputError,
    candidate_biases,
    coarse_to_fine,
    quantized_weight,
    search_group,
)
from trtcompress.recipe import load_recipe

FAST = {"rounds": 2, "grid": 30, "stride": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: with other test runs sharing the 2 cores, OpenMP's spinning barriers make
    2 threads ~50x slower than 1 here (same results either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outlier_inputs(tokens: int = 512, channels: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated activations whose channel scales span 100x, with a few outlier channels (as in LLMs)."""
    torch.manual_seed(seed)
    mix = torch.eye(channels) + 0.3 * torch.randn(channels, channels) / channels**0.5
    spread = torch.exp(torch.randn(channels) * 0.7)
    spread[[5, 40]] = torch.tensor([40.0, 25.0])
    return (torch.randn(tokens, channels) @ mix) * spread


def minmax_error(x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Layer-output error of the naive W4A4 baseline: E2M1, per-channel weight max, per-tensor act max."""
    act = minmax_act_quantizer(x.abs().amax(0), 2, 1)
    w_hat = torch.cat([QuantizedWeight.round_to_nearest(w, FpFormat(2, 1, 0)).dequantize() for w in weights])
    y = torch.cat([x @ w.T for w in weights], 1)
    return OutputError(y, w_hat)(act.fake_quantize(x)) / float(y.pow(2).sum())


def test_search_beats_minmax_and_per_channel_beats_tensor_wise():
    x = outlier_inputs()
    torch.manual_seed(1)
    weights = [torch.randn(48, 64), torch.randn(16, 64) * 0.1]
    baseline = minmax_error(x, weights)
    searched = search_group(x, weights, x.abs().amax(0), LLMFP4Config(**FAST))
    tensor_wise = search_group(x, weights, x.abs().amax(0), LLMFP4Config(**FAST, act_bias="tensor"))
    rel = searched.error / searched.reference
    assert rel < 0.3 * baseline, (rel, baseline)
    assert rel < 0.7 * tensor_wise.error / tensor_wise.reference
    assert searched.act is not None and len(set(searched.act.shift.tolist())) > 1  # shifts in use


def test_auto_act_bias_keeps_the_better_of_the_two_searches():
    x = outlier_inputs(seed=5)
    x = x * torch.distributions.Laplace(0, 1).sample(x.shape).abs()  # heavy tails inside channels too
    torch.manual_seed(5)
    weights = [torch.randn(32, 64)]
    errors = {
        b: search_group(x, weights, x.abs().amax(0), LLMFP4Config(**FAST, act_bias=b))
        for b in ("per_channel", "tensor", "auto")
    }
    assert errors["auto"].error == min(errors["per_channel"].error, errors["tensor"].error)
    assert errors["per_channel"].error != errors["tensor"].error
    assert (errors["auto"].act.shift is None) == (errors["tensor"].error < errors["per_channel"].error)


def test_reported_error_is_what_the_stored_layers_compute():
    x = outlier_inputs(seed=2)
    torch.manual_seed(2)
    weights = [torch.randn(24, 64), torch.randn(8, 64)]
    result = search_group(x, weights, x.abs().amax(0), LLMFP4Config(**FAST))
    outputs = []
    for w, choice in zip(weights, result.weights, strict=True):
        state = CompressedLinearState(
            w.shape[0], w.shape[1], quantized=quantized_weight(w, result.act, choice), act_quant=result.act
        )
        # the stored weight is the pre-shifted W', quantized with the searched per-channel fp16 scales
        assert state.quantized.format == FpFormat(
            *{"e3m0": (3, 0), "e2m1": (2, 1), "e1m2": (1, 2)}[choice.element], 0
        )
        outputs.append(CompressedLinear(state)(x))
    y = torch.cat([x @ w.T for w in weights], 1)
    measured = float((y - torch.cat(outputs, 1)).pow(2).sum())
    assert measured == pytest.approx(result.error, rel=1e-3)


@pytest.mark.parametrize(
    "make, element",
    [
        (lambda: torch.rand(32, 64) * 2 - 1, "e1m2"),  # uniform weights: the uniform grid wins
        (lambda: torch.exp(torch.randn(32, 64) * 1.5) * torch.randn(32, 64).sign(), "e3m0"),  # log-normal
    ],
)
def test_format_search_follows_the_weight_distribution(make, element):
    torch.manual_seed(3)
    x, w = torch.randn(256, 64), make()
    result = search_group(x, [w], x.abs().amax(0), LLMFP4Config(**FAST, quantize_activations=False))
    assert result.act is None and result.weights[0].element == element


def test_a_group_shares_one_weight_format_unless_told_otherwise():
    """q/k/v (and gate/up) run as one GEMM in TensorRT-LLM, which decodes one grid: by default the
    group's members get the format with the lowest summed error; per linear (the paper) on request."""
    torch.manual_seed(3)
    x = torch.randn(256, 64)
    uniform = torch.rand(32, 64) * 2 - 1
    lognormal = torch.exp(torch.randn(32, 64) * 1.5) * torch.randn(32, 64).sign()
    config = LLMFP4Config(**FAST, quantize_activations=False, shared_weight_format=False)
    own = search_group(x, [uniform, lognormal], x.abs().amax(0), config)
    assert [c.element for c in own.weights] == ["e1m2", "e3m0"]
    shared = search_group(
        x, [uniform, lognormal], x.abs().amax(0), config.model_copy(update={"shared_weight_format": True})
    )
    assert len({c.element for c in shared.weights}) == 1
    assert shared.error >= own.error  # the constraint costs what it costs, never less


def test_coarse_to_fine_finds_the_exhaustive_argmin():
    torch.manual_seed(4)
    targets = torch.rand(6) * 99
    widths = torch.rand(6) + 0.5

    def evaluate(idx):
        return ((idx.float() - targets) * widths).abs() + 0.01 * torch.cos(idx.float())

    exhaustive, _ = coarse_to_fine(evaluate, 100, 6, 1)
    for stride in (3, 10, 16):
        best, _ = coarse_to_fine(evaluate, 100, 6, stride)
        assert torch.equal(best, exhaustive)


def test_candidate_grids():
    b = torch.tensor([4.0, -2.0])
    upstream = candidate_biases(b, 100, "upstream")
    assert torch.allclose(upstream[:, 0], 4 * torch.linspace(0.01, 1.2, 100))  # b_init x [0.01, 1.2]
    by_max = candidate_biases(b, 14, "max")
    # Qmax = max x 2**-δ: δ from -0.25 (1.19x the max) to 3 (an eighth of it), whatever the sign of b_init
    assert torch.allclose(by_max[:, 1] - b[1], torch.linspace(-0.25, 3.0, 14))


def test_config_is_strict():
    with pytest.raises(ValidationError):
        LLMFP4Config(grid_size=10)
    with pytest.raises(ValidationError):
        LLMFP4Config(formats=["e2m1", "e2m1"])
    with pytest.raises(ValidationError):
        LLMFP4Config(formats=["e4m3"])


def _relative_logit_error(model, ids, ref):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return float((out - ref).norm() / ref.norm())


def test_llmfp4_on_the_tiny_model_beats_minmax(tiny_model_dir):
    from trtcompress.models import load_model

    errors = {}
    for preset in ("w4a4-minmax-fp4", "w4a4-llmfp4"):
        lm = load_model(str(tiny_model_dir), log=lambda m: None)
        ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = lm.model(input_ids=ids).logits
        recipe = load_recipe(preset)
        data = recipe.model_dump()
        data["calibration"].update(num_samples=4, seq_len=64)
        if preset == "w4a4-llmfp4":
            data["passes"][0].update(FAST, grid=12, sample_tokens=128)
        compress_model(lm.model, lm.tokenizer, type(recipe).model_validate(data))
        layers = dict(compressed_linears(lm.model))
        assert len(layers) == 14 and "lm_head" not in layers  # 2 layers x 7 linears
        for layer in layers.values():
            state = layer.state
            assert state.act_quant is not None and state.quantized.format.kind == "fp"
            assert (state.act_quant.shift is not None) == (preset == "w4a4-llmfp4")
        errors[preset] = _relative_logit_error(lm.model, ids, ref)
    assert errors["w4a4-llmfp4"] < errors["w4a4-minmax-fp4"], errors


def test_activations_are_quantized_at_run_time(tiny_model):
    """The model's output depends on the input quantizer: dropping it changes the logits."""
    recipe = load_recipe("w4a4-llmfp4").model_dump()
    recipe["calibration"].update(num_samples=2, seq_len=32)
    recipe["passes"][0].update(rounds=1, grid=6, stride=2, sample_tokens=64, targets=["model.layers.0.mlp.*"])
    model = tiny_model.model
    compress_model(model, tiny_model.tokenizer, type(load_recipe("w4a4-llmfp4")).model_validate(recipe))
    _, layer = next(iter(compressed_linears(model)))
    x = torch.randn(3, layer.in_features) * 4
    state = layer.state
    quantized = layer(x)
    no_act = CompressedLinearState(state.out_features, state.in_features, dense_weight=state.weight())
    assert not torch.allclose(quantized, CompressedLinear(no_act)(x), rtol=1e-3)
    assert torch.allclose(
        quantized, state.act_quant.fake_quantize(x) @ state.weight().T, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.model
def test_llmfp4_beats_minmax_on_smollm2(smollm2_dir):
    """On the real model (reduced budget and protocol): ppl and KL far below the min-max W4A4 baseline."""
    from trtcompress.eval.config import EvalConfig
    from trtcompress.eval.harness import evaluate
    from trtcompress.models import load_model

    config = EvalConfig(ppl_tokens=2048, context=1024, gsm8k_problems=8, gsm_symbolic_problems=0)
    reference = load_model(str(smollm2_dir), log=lambda m: None).model
    reports = {}
    for preset in ("w4a4-minmax-fp4", "w4a4-llmfp4"):
        loaded = load_model(str(smollm2_dir), log=lambda m: None)
        recipe = load_recipe(preset).model_dump()
        recipe["calibration"].update(num_samples=8, seq_len=512)
        recipe["eval"] = config.model_dump()
        if preset == "w4a4-llmfp4":
            recipe["passes"][0].update(rounds=1, sample_tokens=1024)
        recipe = type(load_recipe(preset)).model_validate(recipe)
        compress_model(loaded.model, loaded.tokenizer, recipe)
        reports[preset] = evaluate(
            loaded.model, loaded.tokenizer, config, reference, model_name="smollm2", recipe_name=preset
        )
    minmax, llmfp4 = reports["w4a4-minmax-fp4"], reports["w4a4-llmfp4"]
    assert llmfp4.ppl < 0.01 * minmax.ppl and llmfp4.gsm8k_kl < 0.5 * minmax.gsm8k_kl
    assert llmfp4.bits_per_param == pytest.approx(4.02, abs=0.01)
