"""GPTQ: quantize weights column by column, feeding each column's error back into the columns not yet
quantized through the inverse Hessian of the layer-output error (Frantar et al., 2022).

Blocked updates (block of 128 columns), damping (a fraction of the mean Hessian diagonal), act-order
(columns by descending Hessian diagonal) with *static groups*: every group's scale is fixed from the
unquantized weights before the sweep, so the codes stay group-contiguous in the original column order
and exporters need no column permutation (g_idx). A Hessian that is not positive definite is retried
with more damping (and the retry is reported); the result is checked finite.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.sparsity import SparsityMask
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import HESSIAN, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.gsq import SUPPORTED_GROUP_SIZES

MAX_DAMP_RETRIES = 4


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run small, latency-bound tensor ops on one thread.

    The column loop is thousands of tiny updates and torch.cholesky_inverse on CPU degrades badly with
    several OpenMP threads (measured: 0.18 s on one thread, 34 s on two busy cores, for 1536 x 1536).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in), original column order
    scales: torch.Tensor  # fp16 (out, groups)
    zeros: torch.Tensor | None  # uint8 (out, groups) or None (symmetric)
    damp: float  # damping actually used
    retries: int


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, raising λ tenfold until H is positive definite."""
    with single_threaded():
        return _inverse_hessian_cholesky(hessian, damp)


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    # A NaN/inf Hessian (overflowing activations) fails every Cholesky: say so instead of retrying the
    # damping and blaming positive definiteness.
    if not torch.isfinite(hessian).all():
        raise CompressionError(
            "Hessian has non-finite entries (NaN or inf); check the calibration activations"
        )
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


def search_group_scale(
    w: torch.Tensor, importance: torch.Tensor, fmt: IntFormat, shrink: float, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero of one group that minimises the importance-weighted rounding error.

    `w` is (rows, group columns), `importance` the Hessian diagonal of those columns. Candidate ranges
    shrink the min/max range by up to `shrink` (0 = plain min/max); clipping a few outliers often
    buys a finer grid for the rest.
    """
    best_scale, best_zero = intgrid.group_scale_zero(w, fmt.bits, fmt.symmetric)
    if shrink <= 0:
        return best_scale, best_zero

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = intgrid.quantize_to_codes(w, scale[:, None], zero[:, None], fmt.bits)
        return ((intgrid.dequantize_codes(q, scale[:, None], zero[:, None]) - w).pow(2) * importance).sum(-1)

    best_err = error(best_scale, best_zero)
    for step in range(1, steps + 1):
        scale, zero = intgrid.group_scale_zero(w * (1 - shrink * step / steps), fmt.bits, fmt.symmetric)
        err = error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    *,
    act_order: bool = True,
    block_size: int = 128,
    damp: float = 0.01,
    clip_shrink: float = 0.0,
    keep: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ on one (out, in) weight (or several stacked along `out`: rows are independent given H).
    `keep` (bool, (out, in)): a pruned weight's mask; pruned weights stay exactly zero and their error
    is fed back like a quantization error (as SparseGPT with a fixed mask)."""
    with single_threaded():
        return _gptq(weight, hessian, fmt, act_order, block_size, damp, clip_shrink, keep)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt: IntFormat,
    act_order: bool,
    block_size: int,
    damp: float,
    clip_shrink: float,
    keep: torch.Tensor | None,
) -> GPTQResult:
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not match weight input dim {in_f}")
    if not torch.isfinite(w).all():  # NaN rounds to an arbitrary code: finite garbage, never caught later
        raise CompressionError("gptq: the weight has non-finite entries (NaN or inf)")
    dead = h.diagonal() == 0  # inputs never active: quantize their (irrelevant) weights to zero
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = intgrid.effective_group_size(in_f, fmt.group_size)
    n_groups = intgrid.num_groups(in_f, fmt.group_size)
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    hdiag = h.diagonal().clone()
    static = act_order  # act-order always uses static groups (group-contiguous layout)
    if static:
        kept = w if keep is None else w.masked_fill(~keep, 0)  # the scales cover the kept weights only
        for group in range(n_groups):
            cols = slice(group * g, min((group + 1) * g, in_f))
            scales[:, group], zeros[:, group] = search_group_scale(
                kept[:, cols], hdiag[cols], fmt, clip_shrink
            )
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
                width = min(g, in_f - col)
                ahead = w1[:, i : i + width]
                if i + width > i2 - i1:
                    # The group runs past this block: its tail in `w` still lacks the lazy update from
                    # this block's columns quantized so far; apply it, or the scale would depend on
                    # block_size (a pure speed knob).
                    tail = w[:, i2 : col + width] - err1[:, :i] @ hinv[i1 : i1 + i, i2 : col + width]
                    ahead = torch.cat([ahead, tail], dim=1)
                if keep is not None:
                    ahead = ahead.masked_fill(~keep[:, col : col + width], 0)
                scales[:, group], zeros[:, group] = search_group_scale(
                    ahead, hdiag[col : col + width], fmt, clip_shrink
                )
            scale, zero = scales[:, group], zeros[:, group]
            column = w1[:, i]
            q = intgrid.quantize_to_codes(column, scale, zero, fmt.bits)
            codes[:, col] = q
            deq = intgrid.dequantize_codes(q, scale, zero)
            if keep is not None:  # pruned stays pruned (the state's mask zeroes these codes)
                deq = deq.masked_fill(~keep[:, col], 0)
            err = (column - deq) / hinv1[i, i]
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
    # 0.5 measured best on SmolLM2 INT4 g128 (ppl 26.15 at 0, 24.34 at 0.2, 23.05 at 0.35, 23.00 at 0.5).
    clip_shrink: float = Field(
        0.5, ge=0, lt=1, description="search each group's range up to this fraction smaller (0 = min/max)"
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


@register_pass
class GPTQPass(CalibratedPass):
    config_type = GPTQConfig
    config: GPTQConfig
    needs = frozenset({HESSIAN})
    quantizer = True

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        # Linears of a group share their input, hence H: quantize them stacked in one sweep.
        weights = [group.weight(n) for n in names]
        cfg = self.config
        # Pruned layers (an earlier pass) keep their mask: quantizing must not fill their zeros back in.
        masks = {n: s.mask for n in names if (s := group.current_state(n)) is not None and s.mask is not None}
        keep = None
        if masks:
            keep = torch.cat([
                masks[n].dense() if n in masks else torch.ones_like(w, dtype=torch.bool)
                for n, w in zip(names, weights, strict=True)
            ])  # fmt: skip
        result = gptq_quantize(
            torch.cat(weights), stats.hessian, cfg.format, act_order=cfg.act_order,
            block_size=cfg.block_size, damp=cfg.damp, clip_shrink=cfg.clip_shrink, keep=keep,
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
            bias = group.members[name].bias
            mask = masks.get(name)
            state = self._state(name, result, rows, bias, mask)
            group.set_state(name, state)
            group.recompress[name] = functools.partial(self._recompress, name, stats.hessian, bias, mask)

    def _state(
        self,
        name: str,
        result: GPTQResult,
        rows: slice,
        bias: torch.Tensor | None,
        mask: SparsityMask | None = None,
    ) -> CompressedLinearState:
        fmt = self.config.format
        zeros = None if result.zeros is None else result.zeros[rows]
        quantized = QuantizedWeight.from_codes(result.codes[rows], result.scales[rows], zeros, fmt)
        out_f, in_f = result.codes[rows].shape
        state = CompressedLinearState(
            out_f, in_f, quantized=quantized, bias=None if bias is None else bias.detach().clone(), mask=mask
        )
        if not torch.isfinite(state.weight()).all():
            raise CompressionError(f"gptq produced non-finite weights for {name}")
        return state

    def _recompress(
        self,
        name: str,
        hessian: torch.Tensor,
        bias: torch.Tensor | None,
        mask: SparsityMask | None,
        target: torch.Tensor,
    ) -> CompressedLinearState:
        """GPTQ of another target weight for `name` on the same Hessian (EoRA's alternation)."""
        cfg = self.config
        result = gptq_quantize(
            target, hessian, cfg.format, act_order=cfg.act_order,
            block_size=cfg.block_size, damp=cfg.damp, clip_shrink=cfg.clip_shrink,
            keep=None if mask is None else mask.dense(),
        )  # fmt: skip
        return self._state(name, result, slice(0, target.shape[0]), bias, mask)


__all__ = ["GPTQConfig", "GPTQPass", "gptq_quantize", "inverse_hessian_cholesky"]
