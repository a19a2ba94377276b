"""Wanda++ regional optimization and KD recovery (LoRA adapters against the uncompressed teacher)."""

import copy

import pytest
import torch

from trtcompress.compressed import compressed_linears
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassContext
from trtcompress.passes.engine import run_sequential
from trtcompress.passes.kd import KDConfig, KDPass, kd_loss
from trtcompress.passes.regional import RegionalConfig, RegionalPass
from trtcompress.passes.wanda import WandaConfig, WandaPass


def _calib(n=8, t=64):
    return torch.randint(1, 512, (n, t), generator=torch.Generator().manual_seed(0))


def _amplify(model):
    """The random tiny model is almost uniform; scale its linears so pruning visibly changes its logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(4.0)
    return model


def test_kd_loss_is_zero_for_the_teacher_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert float(kd_loss(logits, logits, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits + torch.randn(2, 5, 11), logits, 2.0)) > 0


def test_regional_optimization_lowers_each_layers_error_and_keeps_the_mask(tiny_model):
    model = _amplify(tiny_model.model)
    calib = _calib()
    regional = RegionalPass(RegionalConfig(steps=20, samples=8, batch_size=4, lr=1e-3))
    run_sequential(
        model,
        [WandaPass(WandaConfig(pattern="2:4", dtype="float32")), regional],
        PassContext(calibration=calib),
    )
    assert len(regional.history) == 2
    assert all(h["after"] < h["before"] for h in regional.history), regional.history
    for _, module in compressed_linears(model):
        state = module.state
        w = state.weight()
        assert bool((w[~state.mask.dense()] == 0).all())
        assert torch.equal(
            (w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2, torch.ones_like(w[:, ::4]).bool()
        )


def test_gptq_after_regional_quantizes_what_regional_trained(tiny_model):
    """wanda + regional + gptq: regional trains in `finish_layer`, after every pass of its sweep; in one
    sweep gptq had already quantized the layer, so regional silently trained nothing. It ends its sweep
    now: gptq runs in the next one, keeps the mask and quantizes the trained weights."""
    from trtcompress.passes.gptq import GPTQConfig, GPTQPass

    model = _amplify(tiny_model.model)
    regional = RegionalPass(RegionalConfig(steps=5, samples=4, batch_size=4, lr=1e-3))
    passes = [WandaPass(WandaConfig(pattern="2:4", dtype="float32")), regional]
    run_sequential(model, [*passes, GPTQPass(GPTQConfig(group_size=32))], PassContext(calibration=_calib()))
    assert len(regional.history) == 2 and regional.history[0]["after"] < regional.history[0]["before"]
    formats = {m.state.format_name for _, m in compressed_linears(model)}
    assert formats == {"int4_g32_sym+sparse_2of4"}


def test_regional_after_eora_stores_what_it_trained(tiny_model_dir):
    """wanda + eora + regional: the trained weight is stored weight + A·B. Storing it whole next to the
    factors counted A·B twice (layer 0 reported error 0.004, stored model 0.041)."""
    from trtcompress.models import load_model
    from trtcompress.passes.engine import _first_layer_inputs, _layer_output
    from trtcompress.passes.eora import EoRAConfig, EoRAPass

    calib = _calib(4, 32)
    model = load_model(str(tiny_model_dir), log=lambda m: None).model
    dense = copy.deepcopy(model)
    regional = RegionalPass(RegionalConfig(steps=20, samples=4, lr=1e-3, optimizer="adam"))
    passes = [
        WandaPass(WandaConfig(pattern="2:4", dtype="float32")),
        EoRAPass(EoRAConfig(rank=4, factor_dtype="float32")),
        regional,
    ]
    run_sequential(model, passes, PassContext(calibration=calib))
    first = regional.history[0]
    assert first["after"] < first["before"]
    with torch.no_grad():
        hidden, kwargs = _first_layer_inputs(dense, calib)
        reference = _layer_output(dense.model.layers[0](hidden, **kwargs))
        stored = _layer_output(model.model.layers[0](hidden, **kwargs))
    error = float((stored - reference).pow(2).mean() / reference.pow(2).mean())
    assert error == pytest.approx(first["after"], rel=0.05)
    for _, module in compressed_linears(model):
        state = module.state
        assert state.rank == 4 and bool((state.stored_weight()[~state.mask.dense()] == 0).all())


def test_kd_lowers_the_kl_to_the_teacher_and_keeps_adapters_as_factors(tiny_model):
    model = _amplify(tiny_model.model)
    teacher = copy.deepcopy(model)
    calib = _calib()
    run_sequential(
        model, [WandaPass(WandaConfig(pattern="2:4", dtype="float32"))], PassContext(calibration=calib)
    )
    with torch.no_grad():
        target = teacher(input_ids=calib).logits
        kl_before = float(kd_loss(model(input_ids=calib).logits, target, 1.0))
    kd = KDPass(KDConfig(steps=30, rank=4, lr=5e-3, batch_size=4, seq_len=64, max_seconds=None))
    kd.apply(model, PassContext(calibration=calib, teacher=teacher))
    with torch.no_grad():
        kl_after = float(kd_loss(model(input_ids=calib).logits, target, 1.0))
    assert len(kd.history) == 30 and kl_after < 0.8 * kl_before, (kl_before, kl_after)
    layers = dict(compressed_linears(model))
    assert len(layers) == 14
    for module in layers.values():
        state = module.state
        assert state.rank == 4 and state.mask is not None  # sparsity intact, adapters kept as factors
        assert state.lowrank_a.dtype == torch.float16


def test_kd_merges_adapters_into_plain_float_layers_and_needs_a_teacher(tiny_model):
    model = tiny_model.model
    calib = _calib(2, 32)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    teacher = copy.deepcopy(_amplify(copy.deepcopy(model)))  # a different teacher: adapters must move
    KDPass(KDConfig(steps=3, rank=2, batch_size=2, seq_len=32, lr=1e-2)).apply(
        model, PassContext(calibration=calib, teacher=teacher)
    )
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, torch.nn.Linear) and not torch.equal(up.weight, before)
    assert not list(compressed_linears(model))
    with pytest.raises(CompressionError, match="teacher"):
        KDPass(KDConfig(steps=1)).apply(model, PassContext(calibration=calib))


def test_kd_merging_into_a_tied_lm_head_leaves_the_input_embeddings_alone(tiny_model):
    """The tiny model ties lm_head to embed_tokens: merging lm_head's adapter in place used to change
    the input embeddings too (a model KD never trained, and not the one it measured)."""
    model = tiny_model.model
    embeddings = model.get_input_embeddings().weight
    assert model.lm_head.weight is embeddings and model.config.tie_word_embeddings
    before = embeddings.detach().clone()
    teacher = _amplify(copy.deepcopy(model))
    KDPass(
        KDConfig(steps=3, rank=2, batch_size=2, seq_len=32, lr=1e-2, targets=["lm_head"], exclude=[])
    ).apply(model, PassContext(calibration=_calib(2, 32), teacher=teacher))
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert not torch.equal(model.lm_head.weight, before)  # the adapter was merged into lm_head alone
    assert not model.config.tie_word_embeddings  # so a saved model keeps both


def test_kd_preset_runs_end_to_end_with_the_teacher_kept_by_the_builder(tiny_model):
    from trtcompress.builders.compress import compress_model
    from trtcompress.recipe import load_recipe, with_overrides

    recipe = with_overrides(
        load_recipe("sparse24-wanda-kd"),
        [
            ("calibration.num_samples", 4), ("calibration.seq_len", 64), ("passes.1.samples", 4),
            ("passes.2.steps", 3), ("passes.2.seq_len", 64),
        ],
    )  # fmt: skip
    logs: list[str] = []
    compress_model(tiny_model.model, tiny_model.tokenizer, recipe, log=logs.append)
    assert any(line.startswith("kd: step 3/3") for line in logs), logs
    assert any(line.startswith("regional: layer 1") for line in logs), logs
    formats = {m.state.format_name for _, m in compressed_linears(tiny_model.model)}
    assert formats == {"float16+sparse_2of4+lowrank8"}


def test_kd_refuses_a_rank_larger_than_a_layer(tiny_model):
    model = tiny_model.model
    with pytest.raises(CompressionError, match=r"LoRA rank 64 exceeds min\(out, in\) of .*k_proj \(48x96\)"):
        KDPass(KDConfig(steps=1, rank=64)).apply(
            model, PassContext(calibration=_calib(2, 32), teacher=copy.deepcopy(model))
        )
    assert not list(compressed_linears(model))  # nothing changed


def test_kd_precision_picks_an_autocast_dtype():
    from trtcompress.passes.kd import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if native else None)


def test_wanda_regional_gradient_score_keeps_n_of_m_and_changes_the_choice(tiny_model_dir):
    from trtcompress.models import load_model
    from trtcompress.passes.wanda import REFERENCE_TOKENS

    calib = _calib()
    masks = {}
    for alpha in (0.0, 1e6):
        model = _amplify(load_model(str(tiny_model_dir), log=lambda m: None).model)
        wanda = WandaPass(WandaConfig(pattern="2:4", gradient_scale=alpha, gradient_samples=4))
        run_sequential(model, [wanda], PassContext(calibration=calib))
        masks[alpha] = {n: m.state.mask.dense() for n, m in compressed_linears(model)}
        if alpha:
            assert wanda._gradients and all(bool((g >= 0).all()) for g in wanda._gradients.values())
    assert REFERENCE_TOKENS == 128 * 2048
    for keep in masks[1e6].values():
        assert torch.equal(
            keep.reshape(keep.shape[0], -1, 4).sum(-1), torch.full_like(keep[:, ::4], 2, dtype=torch.long)
        )
    assert any(not torch.equal(masks[0.0][n], masks[1e6][n]) for n in masks[0.0])


def test_kd_adapters_live_on_the_device_of_the_layer_they_wrap():
    """Adapters were created on the CPU whatever the model's device: KD on a GPU model failed with a
    device mismatch. The meta device stands in for a GPU here; the start is still the identity."""
    from trtcompress.passes.kd import LoRAAdapter

    base = torch.nn.Linear(16, 12, device="meta")
    adapter = LoRAAdapter(base, 4, 2.0, torch.Generator().manual_seed(0))
    assert adapter.lora_a.device.type == adapter.lora_b.device.type == "meta"
    assert adapter(torch.empty(3, 16, device="meta")).shape == (3, 12)
    cpu = LoRAAdapter(torch.nn.Linear(16, 12), 4, 2.0, torch.Generator().manual_seed(0))
    x = torch.randn(3, 16)
    assert torch.equal(cpu(x), cpu.base(x)) and bool(cpu.lora_b.abs().sum() > 0)


def test_regional_trains_with_the_activation_quantizers_of_w4a4_layers_beside_it(tiny_model_dir):
    """mlp W4A4 (an earlier sweep), then wanda + regional on attention: the dense target includes the mlp's
    activation quantization, so regional's own forwards must too. Without it the loss compared an
    unquantized forward with a quantized target, and the reported error was not the stored layer's."""
    from trtcompress.models import load_model
    from trtcompress.passes.engine import _first_layer_inputs, _layer_output
    from trtcompress.passes.fp4 import MinMaxFP4Config, MinMaxFP4Pass

    calib = _calib(4, 32)
    model = _amplify(load_model(str(tiny_model_dir), log=lambda m: None).model)
    run_sequential(model, [MinMaxFP4Pass(MinMaxFP4Config(targets=["*mlp*"]))], PassContext(calibration=calib))
    dense = copy.deepcopy(model)
    regional = RegionalPass(RegionalConfig(steps=10, samples=4, lr=1e-3, optimizer="adam"))
    attention = WandaPass(WandaConfig(pattern="2:4", dtype="float32", targets=["*self_attn*"]))
    run_sequential(model, [attention, regional], PassContext(calibration=calib))
    first = regional.history[0]
    with torch.no_grad():
        hidden, kwargs = _first_layer_inputs(dense, calib)
        reference = _layer_output(dense.model.layers[0](hidden, **kwargs))
        stored = _layer_output(model.model.layers[0](hidden, **kwargs))
    error = float((stored - reference).pow(2).mean() / reference.pow(2).mean())
    assert error == pytest.approx(first["after"], rel=0.05), (error, first)
