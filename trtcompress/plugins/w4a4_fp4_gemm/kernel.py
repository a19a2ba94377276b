"""OpenAI Triton kernel of the LLM-FP4 W4A4 GEMM (imports only torch and triton).

One program per (BLOCK_M, BLOCK_N) output tile. Per K step it loads x (even and odd columns, like the
W4A16 kernel), quantizes it in registers on the activation grid (x / act_scale * 2**shift rounded half
to even, saturating; floor(log2|x|) read from the float's exponent bits), decodes the FP4 weight codes,
and runs two `tl.dot`s (fp16 operands: 4-bit values times power-of-two scales are exact in fp16 unless
the scales themselves are not, fp32 accumulation). The activation scale is applied once to the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtcompress.plugins.w4a16_gemm.kernel import _dequant, _pow2


@triton.jit
def _round_to_grid(v, A_EXP: tl.constexpr, A_MAN: tl.constexpr):
    bias: tl.constexpr = (1 << (A_EXP - 1)) - 1
    qmax: tl.constexpr = (2.0 - 1.0 / (1 << A_MAN)) * (1 << ((1 << A_EXP) - 1 - bias))
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2|v|)
    p = tl.maximum(exponent + bias, 1)
    step = _pow2(p - A_MAN - bias)
    y = v / step  # exact: a power of two
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(tie & odd, r - 1.0, r)  # round half to even
    return r * step


@triton.jit
def _act(x_ptr, sh_ptr, rm, col, M, K, act_scale, A_EXP: tl.constexpr, A_MAN: tl.constexpr):
    mask = (rm < M)[:, None] & (col < K)[None, :]
    x = tl.load(x_ptr + rm[:, None] * K + col[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(sh_ptr + col, mask=col < K, other=0).to(tl.int32)
    # A correctly rounded x / s, as the reference and the CompressedLinear state compute it: x * (1 / s)
    # differs in the last bit for some x, enough to move an activation across a rounding boundary.
    scaled = tl.math.div_rn(x, tl.zeros_like(x) + act_scale)
    return _round_to_grid(scaled * _pow2(shift)[None, :], A_EXP, A_MAN)


@triton.jit
def w4a4_fp4_gemm_trt_kernel(x_ptr, w_ptr, s_ptr, as_ptr, sh_ptr, M, N, K, out_ptr, W_EXP: tl.constexpr,
                             W_MAN: tl.constexpr, A_EXP: tl.constexpr, A_MAN: tl.constexpr,
                             GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):  # fmt: skip
    """TensorRT's AOT order; GROUP 0 = per channel. `sh_ptr`: K uint8 shifts (zeros = none)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    kb_row = (K + 1) // 2
    group_eff = K if GROUP == 0 else GROUP
    G = (K + group_eff - 1) // group_eff
    act_scale = tl.load(as_ptr)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        jb = k0 // 2 + tl.arange(0, HALF)
        lo_col = 2 * jb
        hi_col = lo_col + 1
        a_lo = _act(x_ptr, sh_ptr, rm, lo_col, M, K, act_scale, A_EXP, A_MAN)
        a_hi = _act(x_ptr, sh_ptr, rm, hi_col, M, K, act_scale, A_EXP, A_MAN)
        mask = (lo_col < K)[:, None] & n_ok[None, :]
        byte = tl.load(w_ptr + rn[None, :] * kb_row + jb[:, None], mask=mask, other=0).to(tl.int32)
        cols = rn[None, :]
        # _dequant takes group indices here (GROUP 1): the group size is a runtime value (0 = per channel)
        lo_g = lo_col[:, None] // group_eff
        hi_g = hi_col[:, None] // group_eff
        w_lo = _dequant(byte & 0xF, lo_g, cols, s_ptr, s_ptr, G, mask, 1, True, W_EXP, W_MAN)
        hi_mask = (hi_col < K)[:, None] & n_ok[None, :]
        w_hi = _dequant(byte >> 4, hi_g, cols, s_ptr, s_ptr, G, hi_mask, 1, True, W_EXP, W_MAN)
        acc += tl.dot(a_lo.to(tl.float16), w_lo.to(tl.float16), out_dtype=tl.float32)
        acc += tl.dot(a_hi.to(tl.float16), w_hi.to(tl.float16), out_dtype=tl.float32)
    out = out_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, (acc * act_scale).to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & n_ok[None, :])


def w4a4_fp4_gemm_triton(
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
    block_m: int = 16,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    shift = act_shift if act_shift is not None else torch.zeros(k, dtype=torch.uint8, device=x.device)
    out = x.new_empty(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    w4a4_fp4_gemm_trt_kernel[grid](
        x.contiguous(), qweight, scales, act_scale.float().reshape(1), shift, m, n, k, out,
        w_exp, w_man, a_exp, a_man, group_size, block_m, block_n, block_k, num_warps=num_warps,
    )  # fmt: skip
    return out
