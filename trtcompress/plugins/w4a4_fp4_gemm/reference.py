"""LLM-FP4 W4A4 GEMM, the definition (plain torch; imports nothing from trtcompress).

Activations: x_j / act_scale * 2**shift_j rounded to the standard A-grid (ExMy, saturating, round half
to even: p = max(1, floor(log2|v|) + b0), step 2**(p - m - b0)), times act_scale: the GEMM operand of
`ActQuantizer.gemm_operand`. Weights: FP4 codes (the canonical packing, see w4a16_gemm/reference.py)
decoded on the W-grid times the group scales (fp16/fp32 effective scales; group 0 = per channel).
out = operand(x) @ wᵀ in float32, returned in x's dtype.
"""

from __future__ import annotations

import torch

from trtcompress.plugins.w4a16_gemm.reference import dequantize_w4


def round_to_grid(v: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    bias = 2 ** (exp_bits - 1) - 1
    qmax = (2 - 2.0**-man_bits) * 2.0 ** (2**exp_bits - 1 - bias)
    v = v.float().clamp(-qmax, qmax)
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-126)))
    p = torch.clamp(exponent + bias, min=1)
    step = torch.exp2(p - man_bits - bias)
    return torch.round(v / step) * step  # torch.round: half to even


def act_operand(
    x: torch.Tensor, act_scale: torch.Tensor, act_shift: torch.Tensor | None, exp_bits: int, man_bits: int
) -> torch.Tensor:
    scaled = x.float() / act_scale.float()
    if act_shift is not None:
        scaled = scaled * torch.exp2(act_shift.float())
    return round_to_grid(scaled, exp_bits, man_bits) * act_scale.float()


def w4a4_fp4_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_scale: torch.Tensor,
    act_shift: torch.Tensor | None,
    w_exp: int,
    w_man: int,
    a_exp: int,
    a_man: int,
    group_size: int,
) -> torch.Tensor:
    k = x.shape[-1]
    w = dequantize_w4(qweight, scales, None, k, group_size, True, w_exp, w_man)
    xq = act_operand(x, act_scale, act_shift, a_exp, a_man).to(x.dtype)  # the operand, in x's dtype
    return torch.nn.functional.linear(xq.float(), w).to(x.dtype)
