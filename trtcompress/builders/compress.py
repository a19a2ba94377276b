"""Apply a recipe's passes to a loaded model, in order."""

from __future__ import annotations

import copy

import torch
from rich.progress import Progress
from torch import nn

from trtcompress.compressed.linear import CompressedLinear
from trtcompress.models.calibration import calibration_tokens
from trtcompress.passes import PassContext, build_pass
from trtcompress.passes.engine import CalibratedPass, run_sequential
from trtcompress.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compress_model(
    model: nn.Module, tokenizer, recipe: Recipe, progress: Progress | None = None, log=lambda m: None
) -> None:
    calibration = None
    if recipe.needs_calibration:
        cal = recipe.calibration
        calibration = calibration_tokens(
            tokenizer, cal.num_samples, cal.seq_len, skip_tokens=recipe.eval.ppl_tokens
        )
    passes = [build_pass(config) for config in recipe.passes]
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


def cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point tensors outside compressed layers (their scales keep their own dtype)."""
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
