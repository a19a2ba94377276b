"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with the GPTQ inverse-Hessian machinery.

Columns are processed left to right in lazy blocks. A weight's pruning cost is w²/[H⁻¹]²_jj (the OBS
saliency); the mask is chosen per block for unstructured sparsity (the lowest `sparsity` of the block)
or per aligned group of M columns for N:M, and each column's error (pruned and, optionally, quantized)
is fed back into the columns not yet processed through the upper Cholesky factor of H⁻¹, exactly as
GPTQ does (the factor comes from gptq.inverse_hessian_cholesky, so damping and its retries are shared).

Fused with quantization (`bits`): each group's scale is fixed when the sweep reaches the group's first
column, from the current (error-compensated) weights with the group's pruned entries already zeroed
(so N:M masks of a quantization group are chosen at that moment); the kept weights are quantized, the
pruned ones are zero (the state's mask zeroes them whatever their code). No act-order: N:M groups and
quantization groups must stay in the original column order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.sparsity import SparsityMask, parse_nm
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassContext, register_pass
from trtcompress.passes.engine import HESSIAN, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.gptq import inverse_hessian_cholesky, search_group_scale, single_threaded
from trtcompress.passes.gsq import SUPPORTED_GROUP_SIZES
from trtcompress.passes.pruning import PruneConfig, check_divisible, check_prunable, pruned_state


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in) float: pruned (and dequantized, if quantizing) weights
    keep: torch.Tensor  # bool (out, in)
    codes: torch.Tensor | None  # uint8 (out, in) when quantizing
    scales: torch.Tensor | None  # fp16 (out, groups)
    zeros: torch.Tensor | None  # uint8 (out, groups), asymmetric only
    damp: float
    retries: int


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean prune-mask of the `count` lowest entries of `scores` (exactly count, ties broken by index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.view(-1)[scores.flatten().topk(count, largest=False).indices] = True
    return mask


def _prune_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean prune-mask: the m - n lowest of each consecutive group of m columns."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(-1, grouped.topk(m - n, dim=-1, largest=False).indices, True)
    return mask.reshape(rows, cols)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    *,
    fmt: IntFormat | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    clip_shrink: float = 0.0,
    row_splits: list[int] | None = None,
) -> SparseGPTResult:
    """SparseGPT on one (out, in) weight (or several stacked along `out`, sharing the input Hessian;
    `row_splits` gives their row counts, so unstructured sparsity is met by each, not only overall)."""
    splits = row_splits or [int(weight.shape[0])]
    if sum(splits) != weight.shape[0]:
        raise ValueError(f"row_splits {splits} do not add up to the weight's {weight.shape[0]} rows")
    with single_threaded():
        return _sparsegpt(weight, hessian, pattern, sparsity, fmt, block_size, damp, clip_shrink, splits)


def _sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str,
    sparsity: float,
    fmt: IntFormat | None,
    block_size: int,
    damp: float,
    clip_shrink: float,
    row_splits: list[int],
) -> SparseGPTResult:
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight input dim {in_f}")
    nm = parse_nm(pattern)
    if nm is not None and in_f % nm[1]:
        raise ValueError(f"{pattern} sparsity needs in_features divisible by {nm[1]}, got {in_f}")
    dead = h.diagonal() == 0  # inputs never active: their weights are irrelevant, prune them first
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hdiag = h.diagonal().clone()
    hinv, damp_used, retries = inverse_hessian_cholesky(h, damp)

    g = intgrid.effective_group_size(in_f, fmt.group_size) if fmt else 0
    if nm is not None and fmt and g % nm[1]:  # each group's N:M masks are chosen with its scale
        raise ValueError(
            f"{pattern} sparsity with quantization needs a group size divisible by {nm[1]}, got {g}"
        )
    if fmt:  # blocks aligned to quantization groups, so a group never straddles two blocks
        block_size = g if g >= block_size else g * max(1, block_size // g)
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8) if fmt else None
    n_groups = intgrid.num_groups(in_f, fmt.group_size) if fmt else 0
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    keep = torch.ones(out_f, in_f, dtype=torch.bool)
    scale = zero = None

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = hinv1.diagonal()
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:  # unstructured: the block's lowest OBS saliencies, chosen once per block
            saliency = w1.pow(2) / d1.pow(2)[None, :]
            # per stacked layer: over q/k/v together, a layer of smaller weights would lose most of its own
            pruned = torch.cat([
                _prune_lowest(part, round(part.numel() * sparsity)) for part in saliency.split(row_splits)
            ])  # fmt: skip
        for i in range(count):
            col = i1 + i
            if fmt and col % g == 0:
                width = min(g, in_f - col)
                if nm is not None:  # choose this quantization group's N:M masks now, then its scale
                    cols = slice(i, i + width)
                    pruned[:, cols] = _prune_nm(w1[:, cols].pow(2) / d1[cols].pow(2)[None, :], *nm)
                kept = w1[:, i : i + width].masked_fill(pruned[:, i : i + width], 0)
                group = col // g
                scales[:, group], zeros[:, group] = search_group_scale(
                    kept, hdiag[col : col + width], fmt, clip_shrink
                )
                scale, zero = scales[:, group], zeros[:, group]
            elif nm is not None and not fmt and i % nm[1] == 0:  # upstream: lazily, per group of M
                cols = slice(i, i + nm[1])
                pruned[:, cols] = _prune_nm(w1[:, cols].pow(2) / d1[cols].pow(2)[None, :], *nm)
            column = w1[:, i]
            q = column.masked_fill(pruned[:, i], 0)
            if fmt:
                c = intgrid.quantize_to_codes(q, scale, zero, fmt.bits)  # type: ignore[arg-type]
                codes[:, col] = c  # type: ignore[index]
                q = intgrid.dequantize_codes(c, scale, zero).masked_fill(pruned[:, i], 0)  # type: ignore[arg-type]
            q1[:, i] = q
            err = (column - q) / d1[i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        keep[:, i1:i2] = ~pruned
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return SparseGPTResult(
        weight=w,
        keep=keep,
        codes=codes,
        scales=scales.to(intgrid.SCALE_DTYPE) if fmt else None,
        zeros=zeros.to(torch.uint8) if fmt and not fmt.symmetric else None,
        damp=damp_used,
        retries=retries,
    )


class SparseGPTConfig(PruneConfig):
    method: Literal["sparsegpt"] = "sparsegpt"
    bits: int | None = Field(
        None, ge=2, le=8, description="also quantize the kept weights (None = prune only)"
    )
    group_size: int = Field(128, description="quantization: input channels per scale; 0 = per channel")
    symmetric: bool = Field(True, description="quantization: symmetric grid (no zero point)")
    clip_shrink: float = Field(0.0, ge=0, lt=1, description="quantization: range search, as in gptq")
    block_size: int = Field(128, ge=1, description="columns per lazy-batch update block")
    damp: float = Field(0.01, gt=0, le=1, description="damping, as a fraction of the mean Hessian diagonal")

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)} (0 = per channel)")
        return v

    @model_validator(mode="after")
    def _groups_hold_whole_nm_groups(self) -> SparseGPTConfig:
        nm = parse_nm(self.pattern)
        if nm is not None and self.bits is not None and self.group_size % nm[1]:
            raise ValueError(
                f"pattern {self.pattern} with bits needs group_size divisible by {nm[1]} (each quantization "
                f"group's N:M masks are chosen with its scale), got {self.group_size}"
            )
        return self

    @property
    def format(self) -> IntFormat | None:
        return None if self.bits is None else IntFormat(self.bits, self.group_size, self.symmetric)


@register_pass
class SparseGPTPass(CalibratedPass):
    config_type = SparseGPTConfig
    config: SparseGPTConfig
    needs = frozenset({HESSIAN})
    prunes = True

    @property
    def quantizes(self) -> bool:  # (prune and quantize in one pass, with `bits`)
        return bool(self.config.bits)

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        cfg = self.config
        weights = [group.weight(n) for n in names]
        for name, w in zip(names, weights, strict=True):
            check_prunable(name, group.current_state(name))
            check_divisible(name, w.shape[1], cfg)
        result = sparsegpt_prune(
            torch.cat(weights), stats.hessian, cfg.pattern, cfg.target_sparsity, fmt=cfg.format,
            block_size=cfg.block_size, damp=cfg.damp, clip_shrink=cfg.clip_shrink,
            row_splits=[w.shape[0] for w in weights],
        )  # fmt: skip
        if result.retries:
            context.log(
                f"sparsegpt: {group.prefix}{group.group.name} Hessian not positive definite at damp "
                f"{cfg.damp:g}; used {result.damp:g}"
            )
        row = 0
        for name, w in zip(names, weights, strict=True):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            bias = group.members[name].bias
            keep = result.keep[rows]
            if cfg.format is None:
                state = pruned_state(result.weight[rows], keep, cfg, bias)
            else:
                zeros = None if result.zeros is None else result.zeros[rows]
                quantized = QuantizedWeight.from_codes(
                    result.codes[rows],
                    result.scales[rows],
                    zeros,
                    cfg.format,  # type: ignore[index]
                )
                state = CompressedLinearState(
                    w.shape[0], w.shape[1], quantized=quantized,
                    bias=None if bias is None else bias.detach().clone(),
                    mask=SparsityMask.from_bool(keep, cfg.pattern),
                )  # fmt: skip
            if not torch.isfinite(state.weight()).all():
                raise CompressionError(f"sparsegpt produced non-finite weights for {name}")
            group.set_state(name, state)


__all__ = ["SparseGPTConfig", "SparseGPTPass", "sparsegpt_prune"]
