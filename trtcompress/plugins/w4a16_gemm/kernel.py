"""OpenAI Triton kernels of the W4A16 GEMM (imports only torch and triton).

The packed weight is read once per output tile, one byte = two K columns: the low nibbles multiply the
even columns of x and the high nibbles the odd ones, so neither x nor the weight is ever reordered or
dequantized in memory. Codes become values in registers (INT4: (code - zero) * scale; FP4: the ExMy
grid built from the code's bits, times the group scale).

- `w4a16_gemv_kernel` (decode, a few rows): grid (M, cdiv(N, BLOCK_N), SPLIT_K); each program reduces a
  BLOCK_N x K/SPLIT_K slab with elementwise products (no tensor cores needed at M = 1), split-K partial
  sums are added atomically into an fp32 buffer;
- `w4a16_gemv_tc_kernel` (decode on tensor cores, path "gemv_tc"): grid (cdiv(N, BLOCK_N), SPLIT_K), A and
  B swapped: outᵀ (BLOCK_N, 16) = W (BLOCK_N, K) @ xᵀ (K, 16), so all rows of x (M <= 16) share one read
  of the weight; codes made with magic numbers (no int->float conversions), scale applied per group after
  the dots. INT4 with power-of-two groups only: FP4 and other groups take `w4a16_gemv_kernel`;
- `w4a16_gemm_kernel` (prefill): grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), two `tl.dot`s per K step
  (even / odd columns), fp32 accumulation;

When K blocks and quantization groups align (the usual case: group 128, BLOCK_K 64..512), the scale
(and zero point) is applied once per row and group instead of per element: the GEMV sums codes x
activations per group and uses sum((c - z)·x)·s = (sum(c·x) - z·sum(x))·s; the GEMM runs the dots on
the integer codes (exact in fp16/bf16) and scales the partial product. Other shapes (partial groups that
straddle blocks, odd per-channel K) take the element-wise dequantization path.
- `w4a16_gemm_trt_kernel`: the INT4 GEMM in TensorRT's AOT argument order (see `trt.py`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# `GroupMajorWeight` (gemv_lop3.py): a row's bytes per column chunk, chunks outermost
CHUNK_BYTES: tl.constexpr = tl.constexpr(64)


@triton.jit
def _pow2(e):
    """2**e for integer tensors e in the normal float32 range, exactly (built from the bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp_decode(code, FP_EXP: tl.constexpr, FP_MAN: tl.constexpr):
    bias: tl.constexpr = (1 << (FP_EXP - 1)) - 1
    sign = (code >> (FP_EXP + FP_MAN)) & 1
    e = (code >> FP_MAN) & ((1 << FP_EXP) - 1)
    m = (code & ((1 << FP_MAN) - 1)).to(tl.float32)
    normal = (1.0 + m * (1.0 / (1 << FP_MAN))) * _pow2(e - bias)
    subnormal = m * _pow2(tl.zeros_like(e) + (1 - FP_MAN - bias))
    value = tl.where(e == 0, subnormal, normal)
    return tl.where(sign == 1, -value, value)


@triton.jit
def _dequant(code, col, row_n, s_ptr, z_ptr, G, mask, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
             FP_EXP: tl.constexpr, FP_MAN: tl.constexpr):  # fmt: skip
    """Values of 4-bit codes (any 2-D shape) at K columns `col` of weight rows `row_n`."""
    group = col // GROUP
    scale = tl.load(s_ptr + row_n * G + group, mask=mask, other=0.0).to(tl.float32)
    if FP_EXP > 0:
        return _fp_decode(code, FP_EXP, FP_MAN) * scale
    if SYMMETRIC:
        return (code.to(tl.float32) - 8.0) * scale
    zero = tl.load(z_ptr + row_n * G + group, mask=mask, other=0).to(tl.float32)
    return (code.to(tl.float32) - zero) * scale


@triton.jit
def _row_bytes(K, EVEN_K: tl.constexpr):
    """Bytes per packed weight row. With EVEN_K the compiler sees K // 2 (K is specialized as a multiple
    of 16), proves row alignment and vectorizes the weight loads; (K + 1) // 2 is right for any K."""
    if EVEN_K:
        return K // 2
    else:
        return (K + 1) // 2


@triton.jit
def w4a16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP: tl.constexpr,
                      SYMMETRIC: tl.constexpr, FP_EXP: tl.constexpr, FP_MAN: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      EVEN_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF: tl.constexpr = BLOCK_K // 2
    kb_row = _row_bytes(K, EVEN_K)
    G = (K + GROUP - 1) // GROUP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K columns per split, whole blocks
    FAST: tl.constexpr = (GROUP % BLOCK_K == 0) or (BLOCK_K % GROUP == 0 and (BLOCK_K // GROUP) <= 16)
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K >= GROUP else 1  # groups per K block
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(pid_k * span, pid_k * span + span, BLOCK_K):
        jb = k0 // 2 + tl.arange(0, HALF)  # byte index along the row
        lo_col = 2 * jb
        hi_col = lo_col + 1
        cols = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + pid_m * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        x_lo, x_hi = tl.split(tl.reshape(xk, (HALF, 2)))  # even / odd columns
        mask = n_ok[:, None] & (lo_col < K)[None, :]
        byte = tl.load(w_ptr + rn[:, None] * kb_row + jb[None, :], mask=mask, other=0).to(tl.int32)
        if FAST:  # block and group boundaries align: one scale (and zero) per row and group
            if FP_EXP > 0:
                v_lo = _fp_decode(byte & 0xF, FP_EXP, FP_MAN)
                v_hi = _fp_decode(byte >> 4, FP_EXP, FP_MAN)
            else:
                v_lo = (byte & 0xF).to(tl.float32)
                v_hi = (byte >> 4).to(tl.float32)
            prod = v_lo * x_lo[None, :] + v_hi * x_hi[None, :]
            gi = k0 // GROUP + tl.arange(0, NG)
            g_mask = n_ok[:, None] & (gi < G)[None, :]
            part = tl.sum(tl.reshape(prod, (BLOCK_N, NG, HALF // NG)), axis=2)  # (BLOCK_N, NG)
            scale = tl.load(s_ptr + rn[:, None] * G + gi[None, :], mask=g_mask, other=0.0).to(tl.float32)
            if FP_EXP == 0:  # sum((c - z) x) = sum(c x) - z sum(x)
                x_sum = tl.sum(tl.reshape(x_lo + x_hi, (NG, HALF // NG)), axis=1)
                if SYMMETRIC:
                    part = part - 8.0 * x_sum[None, :]
                else:
                    zero = tl.load(z_ptr + rn[:, None] * G + gi[None, :], mask=g_mask, other=0).to(tl.float32)
                    part = part - zero * x_sum[None, :]
            acc += tl.sum(part * scale, axis=1)
        else:
            rows = rn[:, None]
            w_lo = _dequant(
                byte & 0xF, lo_col[None, :], rows, s_ptr, z_ptr, G, mask, GROUP, SYMMETRIC, FP_EXP, FP_MAN
            )
            hi_mask = n_ok[:, None] & (hi_col < K)[None, :]
            w_hi = _dequant(
                byte >> 4, hi_col[None, :], rows, s_ptr, z_ptr, G, hi_mask, GROUP, SYMMETRIC, FP_EXP, FP_MAN
            )
            acc += tl.sum(w_lo * x_lo[None, :] + w_hi * x_hi[None, :], axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + pid_m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(out_ptr + pid_m * N + rn, acc, mask=n_ok)


# `_deq_asm`: $4 = 4 packed bytes b0..b3 (b0 lowest), outputs $0, $1 = fp16x2 (low nibbles of b0 b1, b2 b3),
# $2, $3 = the same for the high nibbles (element 0 in the low half of a register)
_ASM_HEAD = (
    "{\n"
    ".reg .b32 t0, t1, u0, u1, m;\n"
    "prmt.b32 t0, $4, 0, 0x4140;\n"  # bytes b0, 0, b1, 0: 16-bit lanes b0 | b1
    "prmt.b32 t1, $4, 0, 0x4342;\n"
    "shr.b32 u0, t0, 4;\n"
    "shr.b32 u1, t1, 4;\n"
    "lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;\n"  # (a & b) | c
    "lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;\n"
    "lop3.b32 $2, u0, 0x000F000F, 0x64006400, 0xEA;\n"
    "lop3.b32 $3, u1, 0x000F000F, 0x64006400, 0xEA;\n"
)
_ASM_TAIL = "sub.f16x2 $0, $0, m;\nsub.f16x2 $1, $1, m;\nsub.f16x2 $2, $2, m;\nsub.f16x2 $3, $3, m;\n}"
_ASM_SYMMETRIC: tl.constexpr = tl.constexpr(_ASM_HEAD + "mov.b32 m, 0x64086408;\n" + _ASM_TAIL)  # code - 8
_ASM_CODES: tl.constexpr = tl.constexpr(_ASM_HEAD + "mov.b32 m, 0x64006400;\n" + _ASM_TAIL)  # code


@triton.jit
def _deq_asm(byte, SYMMETRIC: tl.constexpr):
    """fp16 codes of the low and high nibbles of uint8 `byte` by PTX on packed registers (4 bytes in, two
    fp16x2 pairs per nibble out): prmt spreads bytes to 16-bit lanes, lop3 ORs the nibble into the
    0x6400 exponent (fp16 1024 + code), sub.f16x2 removes 1032 (symmetric: code - 8) or 1024 (code).
    CUDA only (not under TRITON_INTERPRET)."""
    return tl.inline_asm_elementwise(
        asm=_ASM_SYMMETRIC if SYMMETRIC else _ASM_CODES,
        constraints="=r,=r,=r,=r,r",
        args=[byte],
        dtype=(tl.float16, tl.float16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _gemv_tc_slab(x_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_w, rn, n_ok, rm, m_ok, k_start, k_end,
                  GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  M_PAD: tl.constexpr, IS_BF16: tl.constexpr, MASK_K: tl.constexpr, DEQ_ASM: tl.constexpr,
                  DOT_F32: tl.constexpr, GROUP_MAJOR: tl.constexpr):  # fmt: skip
    """fp32 (BLOCK_N, M_PAD) = W[rn, k_start:k_end] @ x[rm, k_start:k_end]ᵀ, on tensor cores (see
    `w4a16_gemv_tc_kernel`); k_start a multiple of BLOCK_K. GROUP_MAJOR: the weight is a
    `GroupMajorWeight` (column chunks of CHUNK_BYTES per row outermost, `stride_w` bytes per chunk; a
    sub-block, at most one chunk wide, lies inside one chunk) with (G, N) scales and zeros."""
    GB: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # columns per sub-block (one group)
    NSUB: tl.constexpr = BLOCK_K // GB
    GH: tl.constexpr = GB // 2  # bytes per row and sub-block
    G = (K + GROUP - 1) // GROUP
    if IS_BF16:
        MAGIC: tl.constexpr = 128.0
    else:
        MAGIC: tl.constexpr = 1024.0
    if SYMMETRIC:
        zero = tl.zeros((BLOCK_N,), tl.float32) + (MAGIC + 8.0)
        zero_h = zero.to(x_ptr.dtype.element_ty)
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for s in tl.static_range(NSUB):
            kg = tl.multiple_of(k0 + s * GB, 32)  # GB >= 32 (`gemv_tc_group`): 16-byte aligned bytes
            g = kg // GROUP
            g_ok = n_ok & (kg < K) if MASK_K else n_ok  # a sub-block past K has no scale (or zero) to read
            jb = tl.multiple_of(kg // 2, 16) + tl.arange(0, GH)
            if GROUP_MAJOR:  # row rn's bytes of chunk c start at c * stride_w + rn * CHUNK_BYTES
                chunk = kg // (2 * CHUNK_BYTES)
                in_chunk = jb - chunk * CHUNK_BYTES
                w_tile = w_ptr + chunk * stride_w + rn[:, None] * CHUNK_BYTES + in_chunk[None, :]
                meta = rn + g * N  # scales and zeros (G, N)
            else:
                w_tile = w_ptr + rn[:, None] * stride_w + jb[None, :]
                meta = rn * G + g
            if MASK_K:  # the last K block is partial
                byte = tl.load(w_tile, mask=n_ok[:, None] & (2 * jb < K)[None, :], other=0)
            else:  # a mask constant along K keeps the 16-byte loads (and cp.async pipelining)
                byte = tl.load(w_tile, mask=n_ok[:, None], other=0)
            cols = kg + tl.arange(0, GB)
            x_mask = m_ok[:, None] & (cols < K)[None, :] if MASK_K else m_ok[:, None]  # constant along K:
            xk = tl.load(x_ptr + rm[:, None] * K + cols[None, :], mask=x_mask, other=0.0)  # 16-byte loads
            x_lo, x_hi = tl.split(tl.reshape(xk, (M_PAD, GH, 2)))  # even / odd columns
            x_lo = tl.trans(x_lo)  # (GH, M_PAD)
            x_hi = tl.trans(x_hi)
            if not SYMMETRIC:
                zero = tl.load(z_ptr + meta, mask=g_ok, other=0).to(tl.float32) + MAGIC
                zero_h = zero.to(x_ptr.dtype.element_ty)
            if DEQ_ASM:  # fp16 only: codes - 8 (symmetric) or codes, from PTX
                c_lo, c_hi = _deq_asm(byte, SYMMETRIC)
                if not SYMMETRIC:
                    c_lo = c_lo - (zero_h - MAGIC)[:, None]
                    c_hi = c_hi - (zero_h - MAGIC)[:, None]
                part = tl.dot(c_lo, x_lo, out_dtype=tl.float32)
                part = tl.dot(c_hi, x_hi, part, out_dtype=tl.float32)
            else:
                b16 = byte.to(tl.int16)  # zero-extended
                if IS_BF16:  # 128 + code, exact; the zero point comes off after the dot
                    c_lo = ((b16 & 0xF) | 0x4300).to(tl.bfloat16, bitcast=True)
                    c_hi = ((b16 >> 4) | 0x4300).to(tl.bfloat16, bitcast=True)
                    if DOT_F32:
                        part = tl.dot(c_lo.to(tl.float32), x_lo.to(tl.float32))
                        part = tl.dot(c_hi.to(tl.float32), x_hi.to(tl.float32), part)
                    else:
                        part = tl.dot(c_lo, x_lo, out_dtype=tl.float32)
                        part = tl.dot(c_hi, x_hi, part, out_dtype=tl.float32)
                    x_sum = tl.sum(x_lo.to(tl.float32) + x_hi.to(tl.float32), axis=0)  # (M_PAD,)
                    part = part - zero[:, None] * x_sum[None, :]
                else:  # 1024 + code - (1024 + zero): small integers, exact in fp16
                    c_lo = ((b16 & 0xF) | 0x6400).to(tl.float16, bitcast=True) - zero_h[:, None]
                    c_hi = ((b16 >> 4) | 0x6400).to(tl.float16, bitcast=True) - zero_h[:, None]
                    part = tl.dot(c_lo, x_lo, out_dtype=tl.float32)
                    part = tl.dot(c_hi, x_hi, part, out_dtype=tl.float32)
            scale = tl.load(s_ptr + meta, mask=g_ok, other=0.0).to(tl.float32)
            acc += part * scale[:, None]
    return acc


@triton.jit
def w4a16_gemv_tc_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, stride_w, out_ptr, work_per_program,
                         GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, M_PAD: tl.constexpr,
                         IS_BF16: tl.constexpr, MASK_K: tl.constexpr, DEQ_ASM: tl.constexpr,
                         DOT_F32: tl.constexpr, STREAM_K: tl.constexpr,
                         GROUP_MAJOR: tl.constexpr = False):  # fmt: skip
    """Decode GEMV on tensor cores, A and B swapped: outᵀ (BLOCK_N, M_PAD) = W (BLOCK_N, K) @ xᵀ (K, M_PAD).

    One program owns BLOCK_N weight rows (and a K range with SPLIT_K > 1) and M_PAD rows of x (grid axis
    2: one tile for decode, M <= M_PAD, where every row of x shares one read of the weight; several for
    prefill). Per group (sub-block of GB = min(GROUP, BLOCK_K) columns) it loads
    the bytes as stored, makes codes without int->float conversions (magic numbers: the nibble ORed into
    the mantissa of fp16 1024 / bf16 128 is exactly 1024 + c / 128 + c), runs two `tl.dot`s (low
    nibbles x even columns, high nibbles x odd columns) and scales the fp32 partial product per row.
    fp16: codes minus (1024 + zero) before the dot (exact). bf16: the magic codes go into the dot as they
    are and sum((128 + c)·x) - (128 + z)·sum(x) is subtracted after it. INT4 only; GROUP and BLOCK_K
    powers of two with one dividing the other (the launcher falls back to `w4a16_gemv_kernel` otherwise).
    `stride_w` = bytes per weight row (a separate argument so that Triton specializes its divisibility by 16
    and emits 16-byte loads); MASK_K = False when K is a multiple of BLOCK_K (no mask along K).
    DOT_F32 (bf16 only) runs the dots on fp32 copies: for TRITON_INTERPRET, whose bf16 `tl.dot` is wrong
    (triton 3.6: garbage even for plain loaded bf16 tiles); never on a GPU.
    STREAM_K (grid axis 0 = a fixed number of programs, e.g. a few per SM): the cdiv(N, BLOCK_N) x
    cdiv(K, BLOCK_K) steps are cut into equal runs of `work_per_program`, one per program, which adds
    its partial sums atomically at the end of each row block it touches. Every program does the same
    work, so no last wave of a few programs runs on an almost idle GPU (a split-K grid of 896 programs
    on 132 SMs holding ~6 each runs 1.13 waves in 2 rounds).
    """
    pid_m = tl.program_id(2)  # M_PAD-row tiles of x: one for decode, several for prefill
    rm = pid_m * M_PAD + tl.arange(0, M_PAD)
    m_ok = rm < M
    if STREAM_K:  # an equal share of all (row block, K block) steps, flushed at each row block's end
        k_steps = tl.cdiv(K, BLOCK_K)
        first = tl.program_id(0) * work_per_program
        last = tl.minimum(first + work_per_program, tl.cdiv(N, BLOCK_N) * k_steps)  # exclusive
        for nb in range(first // k_steps, tl.cdiv(last, k_steps)):
            rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            k_start = tl.maximum(first - nb * k_steps, 0) * BLOCK_K
            k_end = tl.minimum(tl.minimum(last - nb * k_steps, k_steps) * BLOCK_K, K)
            acc = _gemv_tc_slab(x_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_w, rn, n_ok, rm, m_ok, k_start,
                                k_end, GROUP, SYMMETRIC, BLOCK_N, BLOCK_K, M_PAD, IS_BF16, MASK_K, DEQ_ASM,
                                DOT_F32, GROUP_MAJOR)  # fmt: skip
            out = out_ptr + rm[None, :] * N + rn[:, None]
            tl.atomic_add(out, acc, mask=n_ok[:, None] & m_ok[None, :])
    else:
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K columns per split, whole blocks
        k_start = tl.program_id(1) * span
        k_end = tl.minimum(k_start + span, K)
        acc = _gemv_tc_slab(x_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_w, rn, n_ok, rm, m_ok, k_start, k_end,
                            GROUP, SYMMETRIC, BLOCK_N, BLOCK_K, M_PAD, IS_BF16, MASK_K, DEQ_ASM,
                            DOT_F32, GROUP_MAJOR)  # fmt: skip
        out = out_ptr + rm[None, :] * N + rn[:, None]
        mask = n_ok[:, None] & m_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)


@triton.jit
def w4a16_gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, stride_w, out_ptr, GROUP: tl.constexpr,
                         SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, SUB: tl.constexpr, MASK_K: tl.constexpr,
                         DEQ_ASM: tl.constexpr):  # fmt: skip
    """Decode GEMV in packed fp16 (path "gemv_h2"): no tensor cores and no shared-memory staging of the
    weight. Grid (M, cdiv(N, BLOCK_N), SPLIT_K). Per group (or per BLOCK_K columns of a larger group)
    the bytes are read as stored and turned into fp16 codes (code - 8, or code - zero) by the
    magic-number PTX of `_deq_asm` (1.5 instructions per code, no conversions); the products with x are
    fp16 and summed in fp16 over runs of SUB bytes (2 * SUB products, as exllama's half2 dot products
    do); only those short sums are widened to fp32, summed over the group and scaled. fp16 x only.
    (Loading the next group's bytes before this group's math, register double buffering, measured
    1.2-2x slower on an H200: BENCHMARKS.md.)"""
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    GB: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # columns per sub-block (one group)
    GH: tl.constexpr = GB // 2  # bytes per row and sub-block
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K columns per split, whole blocks
    k_start = tl.program_id(2) * span
    k_end = tl.minimum(k_start + span, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for s in tl.static_range(BLOCK_K // GB):
            kg = k0 + s * GB
            byte = _h2_bytes(w_ptr, K, stride_w, rn, n_ok, kg, GH, MASK_K)
            acc += _h2_group(x_ptr, s_ptr, z_ptr, byte, pid_m, K, rn, n_ok, kg, GROUP, GB, SYMMETRIC, SUB,
                             MASK_K, DEQ_ASM)  # fmt: skip
    out = out_ptr + pid_m * N + rn
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(out, acc, mask=n_ok)


@triton.jit
def _h2_bytes(w_ptr, K, stride_w, rn, n_ok, kg, GH: tl.constexpr, MASK_K: tl.constexpr):
    """The packed bytes of rows `rn`, columns kg .. kg + 2 * GH (zeros past K)."""
    jb = tl.multiple_of(kg // 2, 16) + tl.arange(0, GH)
    w_tile = w_ptr + rn[:, None] * stride_w + jb[None, :]
    if MASK_K:
        return tl.load(w_tile, mask=n_ok[:, None] & (2 * jb < K)[None, :], other=0)
    return tl.load(w_tile, mask=n_ok[:, None], other=0)  # constant along K: 16-byte loads


@triton.jit
def _h2_group(x_ptr, s_ptr, z_ptr, byte, pid_m, K, rn, n_ok, kg, GROUP: tl.constexpr,
              GB: tl.constexpr, SYMMETRIC: tl.constexpr, SUB: tl.constexpr, MASK_K: tl.constexpr,
              DEQ_ASM: tl.constexpr):  # fmt: skip
    """fp32 (BLOCK_N,) = scale * sum((code - zero) * x) over the GB columns from kg (one group's)."""
    GH: tl.constexpr = GB // 2
    G = (K + GROUP - 1) // GROUP
    g = kg // GROUP
    g_ok = n_ok & (kg < K) if MASK_K else n_ok  # a sub-block past K has no scale (or zero) to read
    cols = kg + tl.arange(0, GB)
    if MASK_K:
        xk = tl.load(x_ptr + pid_m * K + cols, mask=cols < K, other=0.0)
    else:
        xk = tl.load(x_ptr + pid_m * K + cols)
    x_lo, x_hi = tl.split(tl.reshape(xk, (GH, 2)))  # even / odd columns
    if DEQ_ASM:
        c_lo, c_hi = _deq_asm(byte, SYMMETRIC)
    else:  # the same exact fp16 values with integer ops (TRITON_INTERPRET)
        b16 = byte.to(tl.int16)
        magic = 1032.0 if SYMMETRIC else 1024.0
        c_lo = ((b16 & 0xF) | 0x6400).to(tl.float16, bitcast=True) - magic
        c_hi = ((b16 >> 4) | 0x6400).to(tl.float16, bitcast=True) - magic
    if not SYMMETRIC:
        zero = tl.load(z_ptr + rn * G + g, mask=g_ok, other=0).to(tl.float16)
        c_lo = c_lo - zero[:, None]
        c_hi = c_hi - zero[:, None]
    prod = c_lo * x_lo[None, :] + c_hi * x_hi[None, :]  # fp16
    short = tl.sum(tl.reshape(prod, (prod.shape[0], GH // SUB, SUB)), axis=2, dtype=tl.float16)
    part = tl.sum(short.to(tl.float32), axis=1)
    scale = tl.load(s_ptr + rn * G + g, mask=g_ok, other=0.0).to(tl.float32)
    return part * scale


@triton.jit
def _gemm_tile(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
               FP_EXP: tl.constexpr, FP_MAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    kb_row = _row_bytes(K, EVEN_K)
    G = (K + GROUP - 1) // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        jb = k0 // 2 + tl.arange(0, HALF)
        lo_col = 2 * jb
        hi_col = lo_col + 1
        cols = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(
            x_ptr + rm[:, None] * K + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0
        )
        x_lo, x_hi = tl.split(tl.reshape(xk, (BLOCK_M, HALF, 2)))  # even / odd columns
        if GROUP % BLOCK_K == 0:  # one group per K block: dot the codes, scale the partial product
            g = k0 // GROUP
            scale = tl.load(s_ptr + rn * G + g, mask=n_ok, other=0.0).to(tl.float32)
            # the bytes as stored (BLOCK_N rows, contiguous along K: coalesced), then K-major for the dot
            row_mask = n_ok[:, None] & (lo_col < K)[None, :]
            byte = tl.trans(tl.load(w_ptr + rn[:, None] * kb_row + jb[None, :], mask=row_mask, other=0))
            byte = byte.to(tl.int32)
            if FP_EXP > 0:
                c_lo = _fp_decode(byte & 0xF, FP_EXP, FP_MAN)
                c_hi = _fp_decode(byte >> 4, FP_EXP, FP_MAN)
            else:
                if SYMMETRIC:
                    zero = tl.full((BLOCK_N,), 8.0, tl.float32)
                else:
                    zero = tl.load(z_ptr + rn * G + g, mask=n_ok, other=0).to(tl.float32)
                c_lo = (byte & 0xF).to(tl.float32) - zero[None, :]  # small integers: exact in fp16/bf16
                c_hi = (byte >> 4).to(tl.float32) - zero[None, :]
            part = tl.dot(x_lo, c_lo.to(x_lo.dtype), out_dtype=tl.float32)
            part += tl.dot(x_hi, c_hi.to(x_hi.dtype), out_dtype=tl.float32)
            acc += part * scale[None, :]
        else:  # element-wise dequantization (groups straddle K blocks)
            mask = (lo_col < K)[:, None] & n_ok[None, :]
            byte = tl.load(w_ptr + rn[None, :] * kb_row + jb[:, None], mask=mask, other=0).to(tl.int32)
            cols_n = rn[None, :]
            w_lo = _dequant(
                byte & 0xF, lo_col[:, None], cols_n, s_ptr, z_ptr, G, mask, GROUP, SYMMETRIC, FP_EXP, FP_MAN
            )
            hi_mask = (hi_col < K)[:, None] & n_ok[None, :]
            w_hi = _dequant(
                byte >> 4, hi_col[:, None], cols_n, s_ptr, z_ptr, G, hi_mask, GROUP, SYMMETRIC, FP_EXP, FP_MAN
            )
            acc += tl.dot(x_lo, w_lo.to(x_lo.dtype), out_dtype=tl.float32)
            acc += tl.dot(x_hi, w_hi.to(x_hi.dtype), out_dtype=tl.float32)
    out = out_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def w4a16_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP: tl.constexpr,
                      SYMMETRIC: tl.constexpr, FP_EXP: tl.constexpr, FP_MAN: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr):  # fmt: skip
    _gemm_tile(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP, SYMMETRIC, FP_EXP, FP_MAN,
               BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)  # fmt: skip


@triton.jit
def w4a16_gemm_trt_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP: tl.constexpr,
                          SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):  # fmt: skip
    """INT4 GEMM in TensorRT's AOT order: (inputs, int32 extras, output), then constexprs."""
    _gemm_tile(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, out_ptr, GROUP, SYMMETRIC, 0, 0,
               BLOCK_M, BLOCK_N, BLOCK_K, False)  # fmt: skip


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (a fixed 4 elsewhere: the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_tc_group(k: int, group: int, block_k: int, fp_exp: int = 0) -> int | None:
    """The GROUP constexpr `w4a16_gemv_tc_kernel` runs with, or None where it does not apply (FP4 codes,
    group sizes that are not powers of two or do not divide / fill BLOCK_K, dots shorter than 16).
    A single group per row (per-channel, group >= K) runs as a power-of-two group covering K."""
    if fp_exp > 0 or block_k < 32 or block_k & (block_k - 1):
        return None
    if group >= k:
        group = triton.next_power_of_2(k)
    if group & (group - 1) or min(group, block_k) < 32:
        return None
    return group


def w4a16_gemm_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    symmetric: bool = True,
    fp_exp: int = 0,
    fp_man: int = 0,
    path: str = "auto",
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    block_m: int = 16,
    num_warps: int = 4,
    num_stages: int | None = None,
    deq_asm: bool = False,
    decode: str = "gemv",
    stream_k: int = 0,
    h2_sub: int = 8,
    prefetch: bool | int = False,
    last_sums: bool = False,
    stages: int = 0,
    rows: int = 1,
) -> torch.Tensor:
    """x (M, K) fp16/bf16 -> (M, N) in x's dtype.

    `path`: "gemv" (elementwise GEMV, one program row per x row), "gemv_tc" (`w4a16_gemv_tc_kernel`:
    tensor cores, up to `block_m` (at least 16) rows of x per program share one read of the weight, so
    a larger M (prefill) runs as several row tiles; INT4 with aligned power-of-two groups,
    other formats (FP4, groups such as 48) fall back to "gemv" with the same blocks), "gemm" or "auto"
    (`decode` for M <= 8, else "gemm"). `deq_asm` (gemv_tc, fp16 x, CUDA only) makes the codes with
    inline PTX instead of Triton integer ops. `num_stages` is passed to the launch when given.
    `stream_k` > 0 (gemv_tc): that many programs per SM share the work equally (`split_k` unused).
    "gemv_h2" (`w4a16_gemv_h2_kernel`, fp16 x, INT4 with power-of-two groups; else "gemv"): packed fp16
    products summed in fp16 over runs of `h2_sub` bytes. "gemv_lop3" (`gemv_lop3.py`, fp16 x, INT4 with
    power-of-two groups, K a multiple of 8, 4-byte aligned weight and x; else "gemv_h2"): the weight as
    int32 words, lop3 dequantization in PTX; `prefetch` loads the next group's words before this group's
    math (2: the next two groups'), `stages` > 1 (without prefetch) has Triton's software pipeline copy
    the words of `stages` - 1 groups ahead into shared memory with cp.async, `last_sums` (split-K)
    lets the last split of a tile add the fp32 partials and store the output (one kernel: no zero
    fill before it nor cast after it), `rows` = 2 has each program serve two rows of x with one read of
    the weight.
    """
    assert x.dim() == 2 and qweight.dim() == 2
    m, k = x.shape
    n = qweight.shape[0]
    group = group_size if group_size > 0 else k
    x = x.contiguous()
    z = zeros if zeros is not None and not symmetric else qweight  # any pointer: never read
    launch = {"num_warps": num_warps}
    if num_stages is not None:
        launch["num_stages"] = num_stages
    if path == "auto":
        path = decode if m <= 8 else "gemm"
    if path == "gemv_tc":
        tc_group = gemv_tc_group(k, group, block_k, fp_exp)
        if tc_group is None:
            path = "gemv"
        else:
            return launch_gemv_tc(
                x, qweight, scales, z, n=n, stride_w=qweight.stride(0), group=tc_group, symmetric=symmetric,
                group_major=False, block_n=block_n, block_k=block_k, split_k=split_k, block_m=block_m,
                deq_asm=deq_asm, stream_k=stream_k, launch=launch,
            )  # fmt: skip
    if path == "gemv_lop3":
        from trtcompress.plugins.w4a16_gemm.gemv_lop3 import launch_lop3

        lop3_group = gemv_tc_group(k, group, block_k, fp_exp)
        # weight bytes and x read as int32 words: 4-byte alignment (Triton vectorizes where it sees 16)
        words_ok = k % 8 == 0 and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0
        words_ok = words_ok and x.data_ptr() % 4 == 0
        if lop3_group is None or x.dtype != torch.float16 or not words_ok:
            path = "gemv_h2"  # which falls back to "gemv" where it does not apply either
        else:
            return launch_lop3(
                x,
                qweight,
                scales,
                z,
                n=n,
                stride_words=qweight.stride(0) // 4,
                group=lop3_group,
                symmetric=symmetric,
                group_major=False,
                block_n=block_n,
                block_k=block_k,
                split_k=split_k,
                launch=launch,
                prefetch=prefetch,
                last_sums=last_sums,
                stages=stages,
                rows=rows,
            )
    if path == "gemv_h2":
        h2_group = gemv_tc_group(k, group, block_k, fp_exp)
        if h2_group is None or x.dtype != torch.float16:
            path = "gemv"
        else:
            atomic = split_k > 1
            out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else x.new_empty(m, n)
            sub = min(h2_sub, min(h2_group, block_k) // 2)  # fp16 runs within one group's bytes
            w4a16_gemv_h2_kernel[(m, triton.cdiv(n, block_n), split_k)](
                x, qweight, scales, z, m, n, k, qweight.stride(0), out, h2_group, bool(symmetric),
                block_n, block_k, split_k, sub, k % block_k != 0, not _interpreting(), **launch,
            )  # fmt: skip
            return out.to(x.dtype) if atomic else out
    if path == "gemv":
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split_k > 1 else x.new_empty(m, n)
        grid = (m, triton.cdiv(n, block_n), split_k)
        w4a16_gemv_kernel[grid](
            x, qweight, scales, z, m, n, k, out, group, bool(symmetric), fp_exp, fp_man,
            block_n, block_k, split_k, k % 2 == 0, **launch,
        )  # fmt: skip
        return out.to(x.dtype) if split_k > 1 else out
    assert path == "gemm", path
    out = x.new_empty(m, n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    w4a16_gemm_kernel[grid](
        x, qweight, scales, z, m, n, k, out, group, bool(symmetric), fp_exp, fp_man,
        block_m, block_n, block_k, k % 2 == 0, **launch,
    )  # fmt: skip
    return out


def launch_gemv_tc(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    n: int,
    stride_w: int,
    group: int,
    symmetric: bool,
    group_major: bool,
    block_n: int,
    block_k: int,
    split_k: int,
    block_m: int,
    deq_asm: bool,
    stream_k: int,
    launch: dict,
) -> torch.Tensor:
    """`w4a16_gemv_tc_kernel` on contiguous x (M, K): the output (M, N) in x's dtype. `weight`: packed bytes,
    (N, K / 2) rows `stride_w` bytes apart, or (`group_major`) a `GroupMajorWeight`'s words as bytes,
    `stride_w` bytes per column chunk; `group` as `gemv_tc_group` gives it."""
    m, k = x.shape
    m_pad = min(max(16, triton.next_power_of_2(m)), max(16, block_m))  # rows of x per program
    atomic = split_k > 1 or stream_k > 0
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else x.new_empty(m, n)
    is_bf16 = x.dtype == torch.bfloat16
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, m_pad))
    work_per_program = 0
    if stream_k > 0:
        steps = triton.cdiv(n, block_n) * triton.cdiv(k, block_k)
        programs = min(steps, stream_k * _multiprocessors(x.device))
        work_per_program = triton.cdiv(steps, programs)
        grid = (triton.cdiv(steps, work_per_program), 1, triton.cdiv(m, m_pad))
    w4a16_gemv_tc_kernel[grid](
        x, weight, scales, zeros, m, n, k, stride_w, out, work_per_program, group, bool(symmetric), block_n,
        block_k, split_k, m_pad, is_bf16, k % block_k != 0, bool(deq_asm) and not is_bf16,
        is_bf16 and _interpreting(), stream_k > 0, group_major, **launch,
    )  # fmt: skip
    return out.to(x.dtype) if atomic else out
