"""GPTQ: quantize weights column by column, feeding each column's error back into the columns not yet
quantized through the inverse Hessian of the layer-output error (Frantar et al., 2022).

Blocked updates (block of 128 columns), damping (a fraction of the mean Hessian diagonal), act-order
(columns by descending Hessian diagonal) with *static groups*: every group's scale is fixed from the
unquantized weights before the sweep, so the codes stay group-contiguous in the original column order
and exporters need no column permutation (g_idx). A Hessian that is not positive definite is retried
with more damping (and the retry is reported); the result is checked finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import HESSIAN, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.gsq import SUPPORTED_GROUP_SIZES

MAX_DAMP_RETRIES = 4


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in), original column order
    scales: torch.Tensor  # fp16 (out, groups)
    zeros: torch.Tensor | None  # uint8 (out, groups) or None (symmetric)
    damp: float  # damping actually used
    retries: int


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ tenfold until H is positive definite."""
    mean_diag = hessian.diagonal().mean().item()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for retry in range(MAX_DAMP_RETRIES + 1):
        damped = hessian + (damp * mean_diag) * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp, retry
        damp *= 10
    raise CompressionError(f"Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    *,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
) -> GPTQResult:
    """GPTQ on one (out, in) weight (or several stacked along `out`: rows are independent given H)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight input dim {in_f}")
    dead = h.diagonal() == 0  # inputs never active: quantize their (irrelevant) weights to zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = intgrid.effective_group_size(in_f, fmt.group_size)
    n_groups = intgrid.num_groups(in_f, fmt.group_size)
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    static = act_order  # act-order always uses static groups (group-contiguous layout)
    if static:
        padded = torch.nn.functional.pad(w, (0, n_groups * g - in_f)).reshape(out_f, n_groups, g)
        valid = (torch.arange(n_groups * g) < in_f).reshape(n_groups, g)
        scales, zeros = intgrid.group_scale_zero(padded, fmt.bits, fmt.symmetric, valid)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_f)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv, damp_used, retries = inverse_hessian_cholesky(h, damp)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            group = col // g
            if not static and col % g == 0:  # first column of a group: fix its scale from current weights
                ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, : min(g, in_f - col)]
                scales[:, group], zeros[:, group] = intgrid.group_scale_zero(ahead, fmt.bits, fmt.symmetric)
            scale, zero = scales[:, group], zeros[:, group]
            column = w1[:, i]
            q = intgrid.quantize_to_codes(column, scale, zero, fmt.bits)
            codes[:, col] = q
            err = (column - intgrid.dequantize_codes(q, scale, zero)) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return GPTQResult(
        codes=codes,
        scales=scales.to(intgrid.SCALE_DTYPE),
        zeros=None if fmt.symmetric else zeros.to(torch.uint8),
        damp=damp_used,
        retries=retries,
    )


class GPTQConfig(PassConfig):
    method: Literal["gptq"] = "gptq"
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: int = Field(128, description="input channels per scale; 0 = per output channel")
    symmetric: bool = Field(True, description="symmetric grid (no zero point)")
    act_order: bool = Field(
        True, description="quantize columns by descending Hessian diagonal (static groups)"
    )
    block_size: int = Field(128, ge=1, description="columns per lazy-batch update block")
    damp: float = Field(0.01, gt=0, le=1, description="damping, as a fraction of the mean Hessian diagonal")

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


@register_pass
class GPTQPass(CalibratedPass):
    config_type = GPTQConfig
    config: GPTQConfig
    needs = frozenset({HESSIAN})

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        # Linears of a group share their input, hence H: quantize them stacked in one sweep.
        weights = [group.weight(n) for n in names]
        cfg = self.config
        result = gptq_quantize(
            torch.cat(weights), stats.hessian, cfg.format, act_order=cfg.act_order,
            block_size=cfg.block_size, damp=cfg.damp,
        )  # fmt: skip
        if result.retries:
            context.log(
                f"gptq: {group.prefix}{group.group.name} Hessian not positive definite at damp {cfg.damp:g}; "
                f"used {result.damp:g}"
            )
        row = 0
        for name, w in zip(names, weights, strict=True):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            zeros = None if result.zeros is None else result.zeros[rows]
            quantized = QuantizedWeight.from_codes(result.codes[rows], result.scales[rows], zeros, cfg.format)
            bias = group.members[name].bias
            state = CompressedLinearState(
                w.shape[0],
                w.shape[1],
                quantized=quantized,
                bias=None if bias is None else bias.detach().clone(),
            )
            if not torch.isfinite(state.weight()).all():
                raise CompressionError(f"gptq produced non-finite weights for {name}")
            group.set_state(name, state)


__all__ = ["GPTQConfig", "GPTQPass", "gptq_quantize", "inverse_hessian_cholesky"]
