"""W4A16 GEMM, the definition (plain torch; imports nothing from trtcompress).

Layout (the canonical one of `trtcompress.compressed`): `qweight` (N, ceil(K/2)) uint8, code of column
2j in the low nibble of byte j and of column 2j+1 in the high nibble; `scales` (N, ceil(K/group)) (fp16,
or fp32 effective scales for FP formats), the last group possibly partial; `zeros` (N, groups) uint8 for
asymmetric INT4, None for symmetric (zero point 8).

INT4: w = (code - zero) * scale. FP4 (`fp_exp`, `fp_man` > 0, e.g. E2M1): w = decode(code) * scale with
decode the standard ExMy grid (sign bit on top, bias 2**(e-1) - 1, subnormals at exponent 0).
out = x @ wᵀ, computed in float32 and returned in x's dtype.
"""

from __future__ import annotations

import torch


def unpack_int4(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/2)) uint8 -> (N, K) int codes 0..15."""
    codes = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(-2)
    return codes[:, :k].to(torch.int32)


def fp_decode(codes: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """float32 values of standard-grid ExMy codes."""
    bias = 2 ** (exp_bits - 1) - 1
    sign = (codes >> (exp_bits + man_bits)) & 1
    exponent = (codes >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = (codes & ((1 << man_bits) - 1)).float()
    normal = (1 + mantissa / 2**man_bits) * torch.exp2(exponent.float() - bias)
    subnormal = mantissa * 2.0 ** (1 - man_bits - bias)
    value = torch.where(exponent == 0, subnormal, normal)
    return torch.where(sign == 1, -value, value)


def dequantize_w4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
    symmetric: bool = True,
    fp_exp: int = 0,
    fp_man: int = 0,
) -> torch.Tensor:
    """The (N, K) float32 weight."""
    codes = unpack_int4(qweight, k)
    group = group_size if group_size > 0 else k
    idx = torch.arange(k, device=qweight.device) // group
    scale = scales.float()[:, idx]
    if fp_exp:
        return fp_decode(codes, fp_exp, fp_man) * scale
    zero = 8.0 if symmetric or zeros is None else zeros.float()[:, idx]
    return (codes.float() - zero) * scale


def w4a16_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    symmetric: bool = True,
    fp_exp: int = 0,
    fp_man: int = 0,
) -> torch.Tensor:
    """x (..., K) -> (..., N)."""
    k = x.shape[-1]
    w = dequantize_w4(qweight, scales, zeros, k, group_size, symmetric, fp_exp, fp_man)
    return torch.nn.functional.linear(x.float(), w).to(x.dtype)
