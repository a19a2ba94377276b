"""Group-wise asymmetric uniform quantization and LSB-first bit packing (the KIVI backbone).

A *row* is one quantization group: the last dimension of the tensors below. Codes are
`floor((x - min) / scale + 0.5)` clamped to `[0, 2**bits - 1]` (2**bits - 1 steps, not the
GEAR reference code's `bits**2 - 1`, which is only right for 2 and 4 bits). `floor(. + 0.5)`
rather than `torch.round` (half-to-even) so the Triton kernel reproduces the codes bit for bit.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
FP16_MIN = 2.0**-24  # the smallest positive fp16
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP16_MAX = 65504.0  # the largest finite fp16


def absmax_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The fp16 scale of symmetric codes in [-qmax, qmax] for groups whose largest |x| is `amax`,
    clamped after the fp16 rounding: an all-zero group gets the smallest fp16, not 0 (0 / 0 = NaN codes)."""
    return (amax / qmax).to(torch.float16).clamp_min(FP16_MIN)


def levels(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"KV quantization supports {SUPPORTED_BITS} bits, got {bits}")
    return 2**bits - 1


def row_range(x: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per row over the elements where `exclude` is not True. A row with every element
    excluded (all of a group kept exact as outliers) takes its whole range: its codes are then never
    used, but its scale and zero must stay finite (an empty range is (inf, -inf), which would make
    the row's dequantized values, and through the block's shared fp8 scales the whole block, NaN)."""
    lo, hi = x.amin(-1), x.amax(-1)
    if exclude is None:
        return lo, hi
    empty = exclude.all(-1)
    lo = torch.where(empty, lo, x.masked_fill(exclude, float("inf")).amin(-1))
    hi = torch.where(empty, hi, x.masked_fill(exclude, float("-inf")).amax(-1))
    return lo, hi


def minmax_params(
    x: torch.Tensor, bits: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, min) per row; elements where `exclude` is True do not widen the range."""
    lo, hi = row_range(x, exclude)
    # The stored (fp16) parameters are the ones used to quantize, so decode matches encode exactly.
    scale = ((hi - lo) / levels(bits)).clamp_min(1e-5).to(torch.float16)
    return scale, lo.to(torch.float16)


def search_params(
    x: torch.Tensor, bits: int, exclude: torch.Tensor | None, steps: int, min_shrink: float = 0.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, min) per row minimizing the row's squared error over its non-excluded elements.

    Candidates: the min/max range shrunk about its midpoint by `steps` factors from 1 down to
    `min_shrink` (values beyond the range clip to the end codes). The first best wins, so a row that
    min/max already serves best keeps min/max.
    """
    x = x.float()
    lo, hi = row_range(x, exclude)
    shrink = torch.linspace(1.0, min_shrink, steps, device=x.device)
    mid, half = ((hi + lo) / 2)[..., None], ((hi - lo) / 2)[..., None] * shrink  # (..., steps)
    scale = (2 * half / levels(bits)).clamp_min(1e-5).to(torch.float16)
    mn = (mid - half).to(torch.float16)
    s, m = scale.float()[..., None], mn.float()[..., None]  # (..., steps, 1)
    xs = x[..., None, :]
    # (deq - x)**2 with one temporary (same arithmetic as quantize_rows / dequantize_rows)
    err = (xs - m).div_(s).add_(0.5).floor_().clamp_(0, levels(bits)).mul_(s).add_(m).sub_(xs).square_()
    if exclude is not None:
        err.masked_fill_(exclude[..., None, :], 0.0)
    best = err.sum(-1).argmin(-1, keepdim=True)  # argmin returns the first of equal minima
    return scale.gather(-1, best)[..., 0], mn.gather(-1, best)[..., 0]


def quantize_rows(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    s, m = scale.float()[..., None], mn.float()[..., None]
    return torch.floor((x.float() - m) / s + 0.5).clamp_(0, levels(bits)).to(torch.uint8)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[..., None] + mn.float()[..., None]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) -> uint8 bytes (..., n * bits / 8), element i at bit offset i * bits."""
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    bitplanes = (codes.to(torch.uint8)[..., None] >> shifts) & 1  # (..., n, bits)
    stream = bitplanes.reshape(*codes.shape[:-1], n * bits // 8, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[..., :n]
    if 8 % bits == 0:  # whole codes per byte (LSB first): one shift and mask, the same values
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))[..., :n]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed[..., None] >> shifts) & 1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)[
        ..., : n * bits
    ]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).to(torch.int32)
    return (stream.reshape(*packed.shape[:-1], n, bits).to(torch.int32) * weights).sum(-1).to(torch.uint8)
