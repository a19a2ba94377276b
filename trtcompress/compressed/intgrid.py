"""Uniform integer grids with one scale (and zero point) per group of input channels.

Pure functions on tensors, shared by RTN (GSQ), GPTQ and every exporter. Conventions:
- codes are unsigned, in [0, 2**bits - 1]; the real value is (code - zero) * scale;
- symmetric: zero = 2**(bits-1) (implicit, not stored), scale = max|w| / (2**(bits-1) - 1);
- asymmetric: the range [min(w, 0), max(w, 0)] is mapped onto [0, 2**bits - 1] with an integer zero point;
- groups run along the input dimension; `group_size = 0` means one group per output channel, and a
  row whose length is not a multiple of the group size ends with a shorter partial group.
Scales are rounded to fp16 before the codes are computed, so dequantizing the stored fp16 scales
reproduces exactly the weights the quantizer chose.
"""

from __future__ import annotations

import math

import torch

SCALE_DTYPE = torch.float16
FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive float16 value


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == 0 else math.ceil(in_features / group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    return in_features if group_size == 0 else group_size


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> (out, groups, g) padded view plus a validity mask for the partial last group."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    n = num_groups(in_f, group_size)
    pad = n * g - in_f
    valid = torch.ones(in_f, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return w.reshape(out_f, n, g), valid.reshape(n, g)


def group_scale_zero(
    w: torch.Tensor, bits: int, symmetric: bool, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the last dim of `w` (one group per leading index).

    Returns fp16-rounded scales (as float32) and float zero points in code units.
    `valid` masks padding elements out of the statistics.
    """
    w = w.float()
    if valid is not None:
        wmax = torch.where(valid, w, torch.tensor(-math.inf)).amax(-1)
        wmin = torch.where(valid, w, torch.tensor(math.inf)).amin(-1)
    else:
        wmax, wmin = w.amax(-1), w.amin(-1)
    if symmetric:
        qpos = 2 ** (bits - 1) - 1
        amax = torch.maximum(wmax.abs(), wmin.abs())
        scale = amax / qpos
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)
        scale = (wmax - wmin) / (2**bits - 1)
        zero = None
    # Stored as fp16 (a scale that underflowed to 1 zeroed groups with max|w| below qpos * 2**-25, e.g.
    # 3.8e-6 at 8 bits; one that rounded to inf dequantized to NaN)
    scale = fp16_scales(scale).float()
    if zero is None:
        zero = torch.clamp(torch.round(-wmin / scale), 0, 2**bits - 1)
    return scale, zero


def fp16_scales(scale: torch.Tensor) -> torch.Tensor:
    """Round real scales to fp16: clamped to its largest finite value; a positive scale that would
    underflow keeps fp16's smallest subnormal (its group's elements then round no worse than to all
    zeros, which a scale of 1 gave them); a zero scale (an all-zero group) becomes 1."""
    scale = scale.float()
    scale = torch.where(scale > 0, scale.clamp(min=FP16_MIN_SUBNORMAL), scale)
    scale = scale.clamp(max=torch.finfo(SCALE_DTYPE).max).to(SCALE_DTYPE)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` onto the grid defined by broadcastable `scale`/`zero`; returns uint8 codes."""
    q = torch.round(w.float() / scale) + zero
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group quantization of an (out, in) weight.

    Returns (codes uint8 (out, in) unpacked, scales fp16 (out, groups), zeros uint8 (out, groups) or None).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per channel), got {group_size}")
    out_f, in_f = w.shape
    wg, valid = _grouped(w.float(), group_size)
    scale, zero = group_scale_zero(wg, bits, symmetric, valid)
    codes = quantize_to_codes(wg, scale[..., None], zero[..., None], bits)
    codes = codes.reshape(out_f, -1)[:, :in_f]
    zeros = None if symmetric else zero.to(torch.uint8)
    return codes, scale.to(SCALE_DTYPE), zeros


def dequantize_groups(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_groups` on unpacked codes (out, in)."""
    out_f, in_f = codes.shape
    g = effective_group_size(in_f, group_size)
    n = num_groups(in_f, group_size)
    if scales.shape != (out_f, n):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not match ({out_f}, {n}) groups")
    idx = torch.arange(in_f, device=codes.device) // g
    scale = scales.float()[:, idx]
    zero = float(2 ** (bits - 1)) if zeros is None else zeros.float()[:, idx]
    return ((codes.float() - zero) * scale).to(dtype)
