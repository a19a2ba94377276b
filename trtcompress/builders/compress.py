"""Apply a recipe's passes to a loaded model, in order."""

from __future__ import annotations

import copy

import torch
from rich.progress import Progress
from torch import nn

from trtcompress.compressed.linear import CompressedLinear
from trtcompress.errors import CompressionError
from trtcompress.models.calibration import calibration_tokens
from trtcompress.passes import PassContext, build_pass
from trtcompress.passes.base import Pass
from trtcompress.passes.engine import CalibratedPass, run_sequential
from trtcompress.passes.targets import select_linears
from trtcompress.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compress_model(
    model: nn.Module, tokenizer, recipe: Recipe, progress: Progress | None = None, log=lambda m: None
) -> None:
    passes = [build_pass(config) for config in recipe.passes]
    check_order(model, passes)  # before the calibration data and any pass: not after minutes of sweeps
    calibration = None
    if recipe.needs_calibration:
        cal = recipe.calibration
        calibration = calibration_tokens(
            tokenizer, cal.num_samples, cal.seq_len, skip_tokens=recipe.eval.ppl_tokens
        )
    # Distillation (kd) learns from the uncompressed model: keep a copy before the first pass changes it.
    teacher = copy.deepcopy(model) if any("teacher" in p.needs for p in passes) else None
    context = PassContext(calibration=calibration, progress=progress, log=log, teacher=teacher)
    i = 0
    while i < len(passes):
        if isinstance(passes[i], CalibratedPass):  # consecutive calibrated passes share one sweep
            j = i
            while j < len(passes) and isinstance(passes[j], CalibratedPass):
                j += 1
            run_sequential(model, passes[i:j], context)  # type: ignore[arg-type]
            i = j
        else:
            passes[i].apply(model, context)
            i += 1
    cast_dense(model, DTYPES[recipe.dtype])
    if isinstance(getattr(model, "lm_head", None), CompressedLinear):
        model.config.tie_word_embeddings = False  # lm_head now has its own (compressed) weight


def _starts_sweep(previous: Pass | None, current: Pass) -> bool:
    """Whether `current` is the first pass of its calibration sweep (as compress_model and
    passes.engine.run_sequential split them), or not calibrated at all."""
    if not isinstance(current, CalibratedPass) or not isinstance(previous, CalibratedPass):
        return True
    return current.sweep_alone or previous.sweep_alone or previous.ends_sweep


_LEFT = {"lowrank": "with low-rank factors"}  # (how an error names what a pass left on a layer)


def _order_error(where: str, passes: list[Pass], j: int, name: str, what: str, fix: str) -> CompressionError:
    return CompressionError(
        f"{where} comes after passes.{j} ({passes[j].config.method}), which left {name} "
        f"{_LEFT.get(what, what)}: {fix}"
    )


def check_order(model: nn.Module, passes: list[Pass]) -> None:
    """Refuse a pass order that a pass would refuse only on reaching a layer, after the earlier passes
    (minutes of calibration sweeps on a real model): the rules of passes.pruning.check_prunable,
    passes.base.check_replacement, structured's float-only check and EoRA's rule (every layer it selects
    that a pass compressed was compressed in EoRA's own sweep), applied here to each pass's selection of
    linears before any calibration data is read, with the sweeps split as run_sequential splits them."""
    done: dict[str, dict[str, int]] = {}  # linear -> {"pruned" | "quantized" | "lowrank": pass index}
    # linear -> (sweep, pass index) of the last pass that compressed it: EoRA needs it in its own sweep
    last: dict[str, tuple[int, int]] = {}
    previous: Pass | None = None
    sweep = 0
    for i, p in enumerate(passes):
        cfg, method = p.config, p.config.method
        sweep += _starts_sweep(previous, p)
        names = [name for name, _ in select_linears(model, cfg.targets, cfg.exclude)]
        where = f"passes.{i} ({method})"
        quantizes = p.quantizes
        for name in names:
            flags = done.get(name, {})
            checks = []
            if p.prunes:
                fix = (
                    "pruning it would drop that; put the pruning pass first (gptq / gsq after it keep its "
                    "mask), or use sparsegpt with `bits`"
                )
                checks += [("quantized", fix), ("lowrank", fix)]
            if quantizes and not p.keeps_mask:
                fix = (
                    f"{method} cannot keep a sparsity mask; prune after it, or prune and quantize in one "
                    "pass (sparsegpt with `bits`; gptq and gsq keep masks)"
                )
                checks.append(("pruned", fix))
            if quantizes:
                fix = (
                    "it would quantize the low-rank factors into the weight, losing the compensation; put "
                    "eora / kd after the last quantization pass"
                )
                checks.append(("lowrank", fix))
            for what, fix in checks:
                if what in flags:
                    raise _order_error(where, passes, flags[what], name, what, fix)
            if method == "eora" and name in last and last[name][0] != sweep:  # (the engine's per-layer rule)
                j = last[name][1]
                cause = (
                    "is data-free (it runs before the calibration sweep)"
                    if not isinstance(passes[j], CalibratedPass)
                    else "runs in an earlier calibration sweep"
                )
                raise _order_error(
                    where, passes, j, name, "compressed",
                    f"eora fits its factors to the error of a pass in its own calibration sweep, from the "
                    f"uncompressed weight, and passes.{j} {cause}, so that weight is gone when eora runs; "
                    "put eora right after a calibrated pass (gptq instead of gsq; eora before regional)",
                )  # fmt: skip
        if method == "structured":  # it slices q/k/v/o and gate/up/down of every layer, whatever the targets
            rels = (["gate_proj", "up_proj", "down_proj"] if cfg.ffn_ratio else []) + (
                ["q_proj", "k_proj", "v_proj", "o_proj"] if cfg.head_ratio else []
            )
            for name, flags in done.items():
                if flags and name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in rels:
                    what, j = next(iter(flags.items()))
                    raise _order_error(where, passes, j, name, what, "structured pruning needs float layers; "
                                       "put it first")  # fmt: skip
        for name in names:  # what this pass leaves on its selection (the latest pass named in errors)
            flags = done.setdefault(name, {})
            if p.prunes:
                flags["pruned"] = i
            if quantizes:
                flags["quantized"] = i
            if method == "eora" and flags and cfg.rank_for(name) > 0:
                flags["lowrank"] = i
            if method == "kd" and (flags or cfg.merge == "never"):
                flags["lowrank"] = i
            if flags:
                last[name] = (sweep, i)
        previous = p


def cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point tensors outside compressed layers (their scales keep their own dtype)."""
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
