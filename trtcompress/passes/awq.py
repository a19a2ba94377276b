"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Per group of linears sharing an input (q/k/v after the input norm, gate/up after the post-attention
norm, down after up_proj, o after v_proj when their widths match): search s = mean|x|^α over a grid
of α, scaling salient input channels up before rounding, and keep the α whose quantized group best
reproduces the group's float outputs on calibration tokens. The scale is folded into the producer
(norm weight or the producing linear's rows) so the model computes the same function before
quantization. Then an optional clipping search shrinks each (row, group) range to minimise the
output error, and the weights are rounded to nearest on the chosen grid.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import ABS_MEAN, HESSIAN, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.gsq import SUPPORTED_GROUP_SIZES


def fake_quantize(w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    codes, scales, zeros = intgrid.quantize_groups(w, fmt.bits, fmt.group_size, fmt.symmetric)
    return intgrid.dequantize_groups(codes, scales, zeros, fmt.bits, fmt.group_size)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared output error of a weight change: mean_t (x_t · δ_r)² = δ_r Σ δ_rᵀ.

    Σ = XᵀX / T is the input Gram matrix; in this form every calibration token counts and the cost
    does not grow with their number (the sampled-token form costs tokens x in x out per candidate).
    """
    return ((delta @ gram) * delta).sum(1)


def _check_finite(gram: torch.Tensor, x_abs_mean: torch.Tensor | None = None) -> None:
    # A NaN/inf statistic (overflowing activations) makes every candidate's error NaN, no candidate
    # "wins", and the search silently falls back to plain rounding: refuse it instead.
    if not torch.isfinite(gram).all() or (x_abs_mean is not None and not torch.isfinite(x_abs_mean).all()):
        raise CompressionError("awq: the input statistics have non-finite entries (NaN or inf)")


def search_scale(
    gram: torch.Tensor, weights: list[torch.Tensor], x_abs_mean: torch.Tensor, fmt: IntFormat, grid: int
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale s = mean|x|^α (normalised), α on a grid in [0, 1).

    Returns (s, α, relative output error). α = 0 means s = 1: plain round to nearest.
    """
    _check_finite(gram, x_abs_mean)
    w = torch.cat(weights)
    norm = output_error(w, gram).sum().item()
    best = (torch.ones_like(x_abs_mean), 0.0, float("inf"))
    for step in range(grid):
        alpha = step / grid
        s = x_abs_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        w_hat = fake_quantize(w * s, fmt) / s
        error = output_error(w_hat - w, gram).sum().item() / norm
        if error < best[2]:
            best = (s, alpha, error)
    return best


def search_clip(
    gram: torch.Tensor, w: torch.Tensor, fmt: IntFormat, grid: int, max_shrink: float
) -> torch.Tensor:
    """Clip each (row, group) of `w` to the shrink ratio of its range that minimises its output error."""
    _check_finite(gram)
    out_f, in_f = w.shape
    g = intgrid.effective_group_size(in_f, fmt.group_size)
    clipped = w.clone()
    for start in range(0, in_f, g):
        cols = slice(start, min(start + g, in_f))
        wg, gram_g = w[:, cols], gram[cols, cols]
        wmax, wmin = wg.amax(1, keepdim=True), wg.amin(1, keepdim=True)
        amax = torch.maximum(wmax.abs(), wmin.abs())
        best_err = torch.full((out_f,), float("inf"))
        best = wg
        for step in range(int(grid * max_shrink) + 1):
            ratio = 1 - step / grid
            if fmt.symmetric:
                candidate = wg.clamp(-amax * ratio, amax * ratio)
            else:
                candidate = wg.clamp(wmin * ratio, wmax * ratio)
            q = fake_quantize(candidate, IntFormat(fmt.bits, 0, fmt.symmetric))
            err = output_error(wg - q, gram_g)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[:, None], candidate, best)
        clipped[:, cols] = best
    return clipped


class AWQConfig(PassConfig):
    method: Literal["awq"] = "awq"
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(128, description="input channels per scale; 0 = per output channel")
    symmetric: bool = Field(True, description="symmetric grid (no zero point)")
    grid: int = Field(20, ge=1, le=100, description="points of the α grid in [0, 1) (and of the clip grid)")
    clip: bool = Field(True, description="search a per-(row, group) clipping range after scaling")
    max_shrink: float = Field(
        0.5, ge=0, lt=1, description="largest fraction of the range the clip may remove"
    )

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)} (0 = per channel), got {v}"
            )
        return v

    @property
    def format(self) -> IntFormat:
        return IntFormat(self.bits, self.group_size, self.symmetric)


# q/k feed a softmax whose saturation the output error of one layer does not see; AWQ leaves them unclipped.
NO_CLIP = ("q_proj", "k_proj")


@register_pass
class AWQPass(CalibratedPass):
    config_type = AWQConfig
    config: AWQConfig
    needs = frozenset({ABS_MEAN, HESSIAN})
    quantizer, keeps_mask = True, False

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        cfg = self.config
        gram = stats.hessian  # 2/T · XᵀX: the factor 2 cancels in every comparison below
        weights = [group.weight(n) for n in names]
        width = group.producer_width()
        # Folding needs every reader of the producer's output in this group, and matching widths
        # (under GQA, v_proj's output is narrower than o_proj's input: that group is not scaled).
        foldable = len(names) == len(group.members) and width in (None, weights[0].shape[1])
        if foldable and not group.can_fold():  # e.g. up_proj already NVFP4: its rows cannot take s
            context.log(
                f"awq: {group.prefix}{group.group.name} not scaled: its producer {group.group.producer} "
                "has block scales that cannot absorb the fold (clip only; put awq before nvfp4/mxfp4)"
            )
            foldable = False
        if foldable:
            s, alpha, error = search_scale(gram, weights, stats.abs_mean, cfg.format, cfg.grid)
            if alpha > 0:
                group.fold_into_producer(s)
                gram = gram / s[:, None] / s[None, :]  # the Gram matrix of the scaled input x / s
                weights = [w * s for w in weights]
            context.log(f"awq: {group.prefix}{group.group.name} α={alpha:.2f} rel. error {error:.2e}")
        for name, w in zip(names, weights, strict=True):
            if cfg.clip and not name.endswith(NO_CLIP):
                w = search_clip(gram, w, cfg.format, cfg.grid, cfg.max_shrink)
            quantized = QuantizedWeight.round_to_nearest(w, cfg.format)
            bias = group.members[name].bias
            group.set_state(
                name,
                CompressedLinearState(
                    w.shape[0],
                    w.shape[1],
                    quantized=quantized,
                    bias=None if bias is None else bias.detach().clone(),
                ),
            )
