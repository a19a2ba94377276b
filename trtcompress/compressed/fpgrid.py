"""Low-bit floating-point (FP) grids: element codes, rounding, and the block/channel scales around them.

Conventions (shared by LLM-FP4, NVFP4, MXFP4 and every exporter):
- An ExMy code is `sign << (e + m) | exponent << m | mantissa` (E2M1: bit 3 sign, bits 2-1 exponent,
  bit 0 mantissa, as in NVFP4/MXFP4). Codes decode with the *standard bias* b0 = 2**(e-1) - 1 and no
  inf/NaN codes: exponent field 0 is subnormal, `mantissa * 2**(1 - m - b0)`; otherwise
  `(1 + mantissa / 2**m) * 2**(exponent - b0)`. E2M1 decodes to ±{0, .5, 1, 1.5, 2, 3, 4, 6}.
- LLM-FP4's real-valued exponent bias b is the same grid times a scale: quantizing with bias b equals
  `s * Q(x / s)` with s = 2**(b0 - b), Q rounding onto the standard grid. So every FP weight stores
  standard codes plus scales; a bias is never stored, only its scale.
- Rounding follows LLM-FP4: clip to ±max, p = max(1, floor(log2|x|) + b0), step v = 2**(p - m - b0),
  round(x / v) * v (ties to even, as IEEE round-to-nearest-even).
"""

from __future__ import annotations

import math
from functools import cache

import torch

from trtcompress.compressed.formats import FpFormat
from trtcompress.compressed.intgrid import effective_group_size, fp16_scales, num_groups

SCALE_DTYPES = {"fp16": torch.float16, "e4m3": torch.float8_e4m3fn, "e8m0": torch.uint8}
E4M3_MAX = 448.0  # largest float8_e4m3fn value: NVFP4 block scales are clamped to it
E4M3_MIN_SUBNORMAL = 2.0**-9  # smallest positive float8_e4m3fn value
E8M0_BIAS = 127  # E8M0 scale byte u means 2**(u - 127); 255 is NaN and never written


def standard_bias(exp_bits: int) -> int:
    return 2 ** (exp_bits - 1) - 1


def max_value(exp_bits: int, man_bits: int) -> float:
    """Largest magnitude of the standard ExMy grid: (2 - 2**-m) * 2**(2**e - 1 - b0)."""
    return (2 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 1 - standard_bias(exp_bits))


def bias_for_max(exp_bits: int, man_bits: int, qmax: torch.Tensor | float) -> torch.Tensor:
    """LLM-FP4's exponent bias whose grid tops out at `qmax`: b = 2**e - log2(qmax) + log2(2 - 2**-m) - 1."""
    qmax = torch.as_tensor(qmax, dtype=torch.float32)
    return 2**exp_bits - torch.log2(qmax) + math.log2(2 - 2.0**-man_bits) - 1


def scale_for_bias(exp_bits: int, bias: torch.Tensor) -> torch.Tensor:
    """The scale s = 2**(b0 - b) that turns the standard grid into the grid of bias b."""
    return torch.exp2(standard_bias(exp_bits) - bias.float())


@cache
def _lut(exp_bits: int, man_bits: int) -> torch.Tensor:
    b0 = standard_bias(exp_bits)
    values = []
    for code in range(2 ** (1 + exp_bits + man_bits)):
        sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
        exponent = (code >> man_bits) & (2**exp_bits - 1)
        mantissa = code & (2**man_bits - 1)
        if exponent == 0:
            magnitude = mantissa * 2.0 ** (1 - man_bits - b0)
        else:
            magnitude = (1 + mantissa / 2**man_bits) * 2.0 ** (exponent - b0)
        values.append(sign * magnitude)
    return torch.tensor(values, dtype=torch.float32)


def decode(codes: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Standard-grid values (float32) of uint8 ExMy codes."""
    return _lut(exp_bits, man_bits).to(codes.device)[codes.long()]


def positive_grid(exp_bits: int, man_bits: int) -> torch.Tensor:
    """The 2**(e+m) non-negative values of the standard grid, ascending."""
    return _lut(exp_bits, man_bits)[: 2 ** (exp_bits + man_bits)]


def round_to_grid(x: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Round x to the nearest standard-grid value (ties to even), saturating at ±max. Returns float32.

    Same result as LLM-FP4's p = max(1, floor(log2|x|) + b0), v = 2**(p - m - b0), round(x / v) * v, but
    without transcendental functions (it is the hot loop of every search): floor(log2|x|) is the
    float32 exponent field, v is built from its bits, and adding then subtracting 1.5 * 2**23 * v makes
    the FPU round x to a multiple of v, half to even.
    """
    b0 = standard_bias(exp_bits)
    qmax = max_value(exp_bits, man_bits)
    x = x.float().clamp(-qmax, qmax)
    exponent = torch.bitwise_right_shift(x.view(torch.int32), 23).bitwise_and_(0xFF)  # floor(log2|x|) + 127
    # p = max(1, floor(log2|x|) + b0); the step's biased exponent is p - m - b0 + 127 (zero lands at p = 1)
    exponent.add_(b0 - 127).clamp_(min=1).add_(127 - man_bits - b0).bitwise_left_shift_(23)
    magic = exponent.view(torch.float32).mul_(1.5 * 2**23)
    return (x + magic).sub_(magic)


def encode(values: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """uint8 codes of values that already lie on the standard grid (output of `round_to_grid`)."""
    b0 = standard_bias(exp_bits)
    magnitude = values.abs().float()
    normal = magnitude >= 2.0 ** (1 - b0)
    exponent = torch.where(normal, torch.floor(torch.log2(magnitude)) + b0, torch.zeros_like(magnitude))
    # normal: mantissa = (|v| / 2**(E - b0) - 1) * 2**m; subnormal: |v| / 2**(1 - m - b0)
    mantissa = torch.where(
        normal,
        (magnitude / torch.exp2(exponent - b0) - 1) * 2**man_bits,
        magnitude / 2.0 ** (1 - man_bits - b0),
    )
    sign = (values < 0).to(torch.int32)
    code = (
        (sign << (exp_bits + man_bits))
        | (exponent.to(torch.int32) << man_bits)
        | mantissa.round().to(torch.int32)
    )
    return code.to(torch.uint8)


def quantize_scaled(x: torch.Tensor, scale: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Fake-quantize x with a (broadcastable) scale: scale * round_to_grid(x / scale)."""
    return round_to_grid(x.float() / scale, exp_bits, man_bits) * scale


def quantize_with_bias(
    x: torch.Tensor, bias: torch.Tensor | float, exp_bits: int, man_bits: int
) -> torch.Tensor:
    """LLM-FP4's quantizer with a real-valued (broadcastable) exponent bias b."""
    return quantize_scaled(x, scale_for_bias(exp_bits, torch.as_tensor(bias)), exp_bits, man_bits)


# ------------------------------------------------------------------------------------------ scales


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round to float8_e4m3fn (saturating at ±448)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_scales(
    blocks: torch.Tensor,
    valid: torch.Tensor,
    exp_bits: int = 2,
    man_bits: int = 1,
    tensor_amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 scales of (out, blocks, 16) weights: E4M3 block scales and an fp32 tensor scale.

    As NVIDIA ModelOpt: global = amax(W) / (qmax * 448) so the largest block scale lands on E4M3's max;
    block scale = amax(block) / qmax / global, rounded to E4M3. Effective scale = block * global.
    `tensor_amax` (at least amax(W)) replaces amax(W): layers fused into one GEMM share one tensor scale.
    """
    qmax = max_value(exp_bits, man_bits)
    absw = torch.where(valid, blocks.float().abs(), torch.zeros(()))
    block_amax = absw.amax(-1)
    amax = block_amax.max() if tensor_amax is None else torch.as_tensor(tensor_amax, dtype=torch.float32)
    global_scale = (amax / (qmax * E4M3_MAX)) if amax > 0 else torch.tensor(1.0, device=blocks.device)
    block = block_amax / qmax / global_scale
    # A non-zero block whose scale would round to 0 (<= 2**-10) keeps E4M3's smallest subnormal, as
    # ModelOpt does: its elements then lie within 3 on the grid and round no worse than all zeros.
    block = torch.where(block_amax > 0, block.clamp(min=E4M3_MIN_SUBNORMAL), block)
    return e4m3_round(block), global_scale.reshape(1).float()


def e8m0_scales(
    blocks: torch.Tensor, valid: torch.Tensor, exp_bits: int = 2, man_bits: int = 1
) -> torch.Tensor:
    """MXFP4 (OCP MX v1.0) shared exponents of (out, blocks, 32) weights, as uint8 E8M0 bytes.

    X = 2**(floor(log2(amax)) - emax_elem), emax_elem = floor(log2(max element)) (2 for E2M1); elements
    above the grid's max after scaling saturate, as the spec says. An all-zero block gets 2**-127.
    """
    emax = math.floor(math.log2(max_value(exp_bits, man_bits)))
    amax = torch.where(valid, blocks.float().abs(), torch.zeros(())).amax(-1)
    # floor(log2(amax)) exactly, from the float's exponent (amax = m * 2**e, m in [0.5, 1)): a float32
    # log2 rounds amax just below a power of two up to it, doubling the block's scale.
    exponent = torch.frexp(amax).exponent.float() - 1 - emax
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -E8M0_BIAS))
    return (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(scales: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scales.float() - E8M0_BIAS)


# ----------------------------------------------------------------------------------------- weights


def blocks(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> zero-padded (out, groups, g) view and the (groups, g) mask of real elements."""
    out_f, in_f = w.shape
    g = effective_group_size(in_f, group_size)
    n = num_groups(in_f, group_size)
    pad = n * g - in_f
    valid = torch.ones(in_f, dtype=torch.bool, device=w.device)
    if pad:  # a partial last group (576 = 4 x 128 + 64) is padded with zeros that never count
        w = torch.nn.functional.pad(w, (0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad))
    return w.reshape(out_f, n, g), valid.reshape(n, g)


def effective_scales(scales: torch.Tensor, global_scale: torch.Tensor | None, fmt: FpFormat) -> torch.Tensor:
    """float32 (out, groups) multipliers of the standard grid, whatever the scale encoding."""
    if fmt.scale_encoding == "e8m0":
        return e8m0_decode(scales)
    if fmt.scale_encoding == "e4m3":
        assert global_scale is not None
        return scales.float() * global_scale.float()
    return scales.float()


def minmax_scales(
    w: torch.Tensor, fmt: FpFormat, tensor_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales of an (out, in) weight: each group's max lands on the grid's max
    (E8M0: the power of two the MX spec prescribes). Returns (stored scales, fp32 tensor scale or None).
    `tensor_amax`: the NVFP4 tensor scale's range, when shared with other layers (see `nvfp4_scales`)."""
    wb, valid = blocks(w.float(), fmt.group_size)
    if fmt.scale_encoding == "e4m3":
        return nvfp4_scales(wb, valid, fmt.exp_bits, fmt.man_bits, tensor_amax)
    if tensor_amax is not None:
        raise ValueError(f"{fmt.name}: only E4M3 block scales have a tensor scale to share")
    if fmt.scale_encoding == "e8m0":
        return e8m0_scales(wb, valid, fmt.exp_bits, fmt.man_bits), None
    amax = torch.where(valid, wb.abs(), torch.zeros(())).amax(-1)
    return fp16_scales(amax / max_value(fmt.exp_bits, fmt.man_bits)), None


def quantize_weight(
    w: torch.Tensor, fmt: FpFormat, scales: torch.Tensor, global_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 codes (out, in) of `w` on the grid given by stored `scales` (and the NVFP4 tensor scale)."""
    out_f, in_f = w.shape
    wb, _ = blocks(w.float(), fmt.group_size)
    scale = effective_scales(scales, global_scale, fmt)[..., None]
    # A zero block scale (an all-zero NVFP4 block, or E4M3 scales computed elsewhere) encodes zeros.
    values = round_to_grid(
        wb / torch.where(scale > 0, scale, torch.ones_like(scale)), fmt.exp_bits, fmt.man_bits
    )
    values = torch.where(scale > 0, values, torch.zeros_like(values))
    return encode(values, fmt.exp_bits, fmt.man_bits).reshape(out_f, -1)[:, :in_f]


def dequantize_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    fmt: FpFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    out_f, in_f = codes.shape
    g = effective_group_size(in_f, fmt.group_size)
    if scales.shape != (out_f, num_groups(in_f, fmt.group_size)):
        raise ValueError(f"scales shape {tuple(scales.shape)} does not match ({out_f}, {in_f}) in {fmt.name}")
    idx = torch.arange(in_f, device=codes.device) // g
    scale = effective_scales(scales, global_scale, fmt)[:, idx]
    return (decode(codes, fmt.exp_bits, fmt.man_bits) * scale).to(dtype)
