"""Pass orders that a pass refuses only on reaching a layer are refused by `compress_model` before the
calibration data is read and before any pass runs: on a real model the earlier passes' sweeps take
minutes (a `wanda` + `regional` sweep, then `nvfp4` refusing the first pruned layer)."""

from __future__ import annotations

import pytest

from trtcompress.builders import compress
from trtcompress.compressed.linear import CompressedLinear
from trtcompress.errors import CompressionError
from trtcompress.recipe import Recipe

GSQ = {"method": "gsq", "bits": 4, "group_size": 32}
GPTQ = {"method": "gptq", "bits": 4, "group_size": 32}
WANDA = {"method": "wanda", "pattern": "2:4"}
EORA = {"method": "eora", "rank": 4}


class _NoCalibration(Exception):
    pass


def _no_calibration(*args, **kwargs):
    raise _NoCalibration("calibration data read before the pass order was checked")


@pytest.mark.parametrize(
    ("passes", "fragment"),
    [
        ([GSQ, {"method": "eora", "rank": 4}], r"passes.1 \(eora\) comes after passes.0 \(gsq\).*data-free"),
        ([{"method": "nvfp4"}, {"method": "eora", "rank": 4}], r"eora.*data-free"),
        ([WANDA, {"method": "regional", "steps": 1}, {"method": "eora", "rank": 4}],
         r"passes.2 \(eora\).*earlier calibration sweep.*eora before regional"),
        ([WANDA, {"method": "nvfp4"}], r"passes.1 \(nvfp4\).*pruned: nvfp4 cannot keep a sparsity mask"),
        ([WANDA, {"method": "awq", "group_size": 32}], r"awq cannot keep a sparsity mask"),
        ([{"method": "magnitude", "pattern": "2:4"}, {"method": "mxfp4"}], r"mxfp4 cannot keep"),
        ([GSQ, WANDA], r"passes.1 \(wanda\) comes after passes.0 \(gsq\).*quantized: pruning it would drop"),
        ([GPTQ, EORA, GSQ], r"passes.2 \(gsq\).*low-rank factors.*put eora / kd after"),
        # eora after a sweep that compressed only part of its layers, the rest compressed by an earlier one
        ([GSQ | {"targets": ["re:.*mlp.*"]}, GPTQ | {"targets": ["re:.*self_attn.*"]}, EORA],
         r"passes.2 \(eora\) comes after passes.0 \(gsq\), which left model.layers.0.mlp.*data-free"),
        ([GSQ, {"method": "structured", "ffn_ratio": 0.25, "round_to": 16}],
         r"passes.1 \(structured\).*structured pruning needs float layers"),
    ],
)  # fmt: skip
def test_impossible_orders_are_refused_before_calibration(tiny_model, monkeypatch, passes, fragment):
    monkeypatch.setattr(compress, "calibration_tokens", _no_calibration)
    recipe = Recipe.model_validate({"passes": passes})
    with pytest.raises(CompressionError, match=fragment):
        compress.compress_model(tiny_model.model, tiny_model.tokenizer, recipe)
    assert not any(isinstance(m, CompressedLinear) for m in tiny_model.model.modules())  # nothing ran


@pytest.mark.parametrize(
    "passes",
    [
        [GPTQ, {"method": "eora", "rank": 4}],
        [WANDA, {"method": "eora", "rank": 4}, {"method": "regional", "steps": 1}],
        [WANDA, GSQ],
        [WANDA, GPTQ, {"method": "eora", "rank": 4}],
        [
            {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32},
            {"method": "eora", "rank": 4},
        ],
        [{"method": "structured", "ffn_ratio": 0.25, "round_to": 16}, GSQ],
        [GSQ, GPTQ, {"method": "eora", "rank": 4}],
        [{"method": "awq", "group_size": 32}, WANDA | {"exclude": ["lm_head", "re:.*"]}],  # selects nothing
        [GSQ | {"targets": ["down_proj"]}, WANDA | {"exclude": ["lm_head", "down_proj"]}],
        [{"method": "eora", "rank": 4}],  # nothing compressed: nothing to compensate (a no-op, as before)
    ],
)
def test_orders_the_passes_handle_pass_the_check(tiny_model, passes):
    recipe = Recipe.model_validate({"passes": passes})
    compress.check_order(tiny_model.model, [compress.build_pass(p) for p in recipe.passes])


def test_every_preset_passes_the_check(tiny_model):
    """The check mirrors the passes' own refusals: a preset it refused would be a false refusal."""
    from trtcompress.recipe import list_presets

    for name, recipe in list_presets().items():
        try:
            compress.check_order(tiny_model.model, [compress.build_pass(p) for p in recipe.passes])
        except CompressionError as exc:
            raise AssertionError(f"preset {name}: {exc}") from None


def test_every_pass_declares_what_it_leaves():
    """check_order reads the passes' own declarations (prunes, quantizes, keeps_mask): a new quantizer or
    pruner that forgot them would slip past it silently."""
    from trtcompress.passes import PASS_REGISTRY

    declared = {name: (cls.prunes, cls.quantizer, cls.keeps_mask) for name, cls in PASS_REGISTRY.items()}
    assert declared == {
        "awq": (False, True, False), "eora": (False, False, True), "gptq": (False, True, True),
        "gsq": (False, True, True), "kd": (False, False, True), "llmfp4": (False, True, False),
        "magnitude": (True, False, True), "minmax-fp4": (False, True, False), "mxfp4": (False, True, False),
        "nvfp4": (False, True, False), "regional": (False, False, True), "sparsegpt": (True, False, True),
        "structured": (False, False, True), "wanda": (True, False, True),
    }  # fmt: skip
