"""Decode GEMV on 32-bit weight words (path "gemv_lop3"): Marlin's lop3 dequantization in Triton.

The packed INT4 weight (N, K / 2) bytes is read as int32 words, 8 codes each: word w of a row holds
columns 8w .. 8w + 7, nibble i = column 8w + i. One `lop3` (AND a mask, OR fp16's 1024 exponent) turns
two nibbles 16 bits apart into an fp16x2 pair 1024 + code, so a word takes one shift, four lop3 and
four fp16x2 corrections (sub 1032, or fma by 1/16 minus 72 for the high nibbles) to make code - 8 for
its 8 codes: 9 instructions, where `w4a16_gemv_h2_kernel` spends 12 (two byte permutes more, and one
more correction) and Triton's own packing of the pairs adds more. The pairs come out as columns (0, 4),
(1, 5), (2, 6), (3, 7) of the word, so x is paired the same way once per program and group (P_i =
(x[8w + i], x[8w + 4 + i]), shared by every row) instead of reordering the weight on disk. Per run of 4
words (16 bytes, one vector load) the 32 products are summed in fp16x2 by four fma per word and widened
to fp32 once; a zero point z adds (8 - z) * sum(x) per run; runs are scaled per group and summed in
fp32, and threads are reduced once at the end.

CUDA only for the PTX; under TRITON_INTERPRET the same sums are made with integer ops in fp32 (what the
CPU tests check, with a CPU emulation of the PTX itself; on a GPU benchmarks/gemv_graphs_gpu.py checks
the kernel against the reference before timing it). Range: each fp16x2 lane sums 16 products (code - 8)
* x, and the zero-point correction 32 x, in fp16 before widening: activations up to a few hundred in
magnitude are safe (|x| ~ 512 with extreme codes could overflow), as for `w4a16_gemv_h2_kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trtcompress.plugins.w4a16_gemm import kernel
from trtcompress.plugins.w4a16_gemm.kernel import CHUNK_BYTES, gemv_tc_group, launch_gemv_tc

RUN: tl.constexpr = tl.constexpr(4)  # words per vector load (16 bytes) and per fp16 partial sum: 32 products
CHUNK_WORDS: tl.constexpr = tl.constexpr(CHUNK_BYTES.value // 4)  # GroupMajorWeight: a row's words per chunk
CHUNK_COLUMNS: tl.constexpr = tl.constexpr(2 * CHUNK_BYTES.value)

# Operands of `_run_asm(rows)` (one instance per run, pack 1): $0 .. the fp32 sums of each row of x, then
# the run's 4 words, then each row's x pairs: P_i of word w in ${first + 4i + w} (`pair_operand`); one
# row: $0 the sum, $1..$4 the words, P_i of word w in ${5 + 4i + w}. The codes come out as code - 8
# (exact in fp16): 1024 + c - 1032 for the low nibbles, (1024 + 16 c) / 16 - 72 for the high ones.
_WORD = """lop3.b32 c0, $W, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 c1, $W, 0x00F000F0, 0x64006400, 0xEA;
shr.b32 t, $W, 8;
lop3.b32 c2, t, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 c3, t, 0x00F000F0, 0x64006400, 0xEA;
sub.f16x2 c0, c0, lo_bias;
fma.rn.f16x2 c1, c1, sixteenth, hi_bias;
sub.f16x2 c2, c2, lo_bias;
fma.rn.f16x2 c3, c3, sixteenth, hi_bias;
"""


def _widen(h: str, out: str) -> list[str]:
    """fp32 `out` = the sum of fp16x2 register `h`'s two halves."""
    return [
        f"mov.b32 {{ha, hb}}, {h};",
        "cvt.f32.f16 fa, ha;",
        "cvt.f32.f16 fb, hb;",
        f"add.f32 {out}, fa, fb;",
    ]


def word_operand(w: int, rows: int = 1) -> str:
    return f"${rows + w}"


def pair_operand(i: int, w: int, first: int = 5) -> str:
    return f"${first + 4 * i + w}"


def first_pair(row: int, rows: int = 1) -> int:
    """The operand number of row `row`'s first x pair in `_run_asm(rows)`."""
    return rows + RUN.value + 16 * row


def _run_asm(rows: int = 1) -> str:
    """Per row of x, the sum over a run of 4 words of (code - 8) * x: the codes made once, then 4 fp16x2
    fma per word and row, widened to fp32 once per row."""
    sums = [f"h{r}" for r in range(rows)]
    body = ["{", f".reg .b32 c0, c1, c2, c3, t, {', '.join(sums)}, lo_bias, hi_bias, sixteenth;"]
    body += [".reg .f16 ha, hb;", ".reg .f32 fa, fb;"]
    body += ["mov.b32 sixteenth, 0x2C002C00;"]  # 1/16: the high nibble sits 4 bits up
    body += ["mov.b32 lo_bias, 0x64086408;", "mov.b32 hi_bias, 0xD480D480;"]  # 1032, -72
    for w in range(RUN.value):
        body.append(_WORD.replace("$W", word_operand(w, rows)))
        for r, h in enumerate(sums):
            pairs = [pair_operand(i, w, first_pair(r, rows)) for i in range(4)]
            first = f"mul.f16x2 {h}, c0, {pairs[0]};" if w == 0 else f"fma.rn.f16x2 {h}, c0, {pairs[0]}, {h};"
            body += [first] + [f"fma.rn.f16x2 {h}, c{i}, {pairs[i]}, {h};" for i in (1, 2, 3)]
    for r, h in enumerate(sums):
        body += _widen(h, f"${r}")
    return "\n".join([*body, "}"])


def _x_sum_asm() -> str:
    """sum of a run's 32 x (its pairs: P_i of word w in ${1 + 4i + w}): the zero-point correction."""
    regs = [pair_operand(i, w, first=1) for i in range(4) for w in range(RUN.value)]
    body = [
        "{",
        ".reg .b32 h;",
        ".reg .f16 ha, hb;",
        ".reg .f32 fa, fb;",
        f"add.f16x2 h, {regs[0]}, {regs[1]};",
    ]
    body += [f"add.f16x2 h, h, {r};" for r in regs[2:]]
    return "\n".join(body + _widen("h", "$0") + ["}"])


_RUN_SUMS: tl.constexpr = tl.constexpr(_run_asm())
_RUN_SUMS2: tl.constexpr = tl.constexpr(_run_asm(2))  # two rows of x share the codes
_X_SUMS: tl.constexpr = tl.constexpr(_x_sum_asm())
_CONSTRAINTS_RUN: tl.constexpr = tl.constexpr(",".join(["=r"] + ["r"] * 20))  # out; 4 words, 16 pairs
_CONSTRAINTS_RUN2: tl.constexpr = tl.constexpr(",".join(["=r"] * 2 + ["r"] * 36))  # 2 outs; words, 2 x 16
_CONSTRAINTS_X: tl.constexpr = tl.constexpr(",".join(["=r"] + ["r"] * 16))  # out; 16 pairs

# prmt selectors: bytes 0-3 of a, 4-7 of b; (a.lo, b.lo) and (a.hi, b.hi)
LOW_HALVES: tl.constexpr = tl.constexpr("0x5410")
HIGH_HALVES: tl.constexpr = tl.constexpr("0x7632")


@triton.jit
def _interleave(a, b, SELECT: tl.constexpr):
    """int32 fp16x2 from two fp16x2 by one prmt (SELECT: LOW_HALVES or HIGH_HALVES)."""
    return tl.inline_asm_elementwise(
        asm="prmt.b32 $0, $1, $2, " + SELECT + ";", constraints="=r,r,r", args=[a, b], dtype=tl.int32,
        is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _x_at(x_ptr, xcol, i: tl.constexpr, x_ok, MASK_K: tl.constexpr):
    """x at column i of every word (zeros past K)."""
    if MASK_K:
        return tl.load(x_ptr + xcol + i, mask=x_ok, other=0.0)
    return tl.load(x_ptr + xcol + i)


@triton.jit
def _x_pairs(x_ptr, word, x_ok, MASK_K: tl.constexpr):
    """(P0, P1, P2, P3), each int32 (1, WORDS): P_i of word w = fp16x2 (x[8w + i], x[8w + 4 + i])."""
    ptr = x_ptr.to(tl.pointer_type(tl.int32)) + word[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    # (1, WORDS, 4): a word's 8 columns as 4 fp16x2, one 16-byte load
    quads = tl.load(ptr, mask=x_ok[:, :, None], other=0) if MASK_K else tl.load(ptr)
    even, odd = tl.split(tl.reshape(quads, (quads.shape[0], quads.shape[1], 2, 2)))
    a0, a2 = tl.split(even)  # (x0, x1), (x4, x5)
    a1, a3 = tl.split(odd)  # (x2, x3), (x6, x7)
    p0 = _interleave(a0, a2, LOW_HALVES)  # (x0, x4)
    p1 = _interleave(a0, a2, HIGH_HALVES)  # (x1, x5)
    p2 = _interleave(a1, a3, LOW_HALVES)  # (x2, x6)
    p3 = _interleave(a1, a3, HIGH_HALVES)  # (x3, x7)
    return p0, p1, p2, p3


@triton.jit
def _pair_parts(x_ptr, word, x_ok, MASK_K: tl.constexpr):
    """The x pairs of `_x_pairs` split per run like the words: 16 tensors (1, WORDS / 4), P_i of word w
    at 4 i + w."""
    p0, p1, p2, p3 = _x_pairs(x_ptr, word, x_ok, MASK_K)
    a0, a1, a2, a3 = _run_parts(p0)
    b0, b1, b2, b3 = _run_parts(p1)
    c0, c1, c2, c3 = _run_parts(p2)
    d0, d1, d2, d3 = _run_parts(p3)
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3


@triton.jit
def _x_run_sums(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3, zero):
    """(8 - zero) * the sum of each run's 32 x (its pairs, as `_pair_parts` gives them): the zero-point
    correction."""
    x_sums = tl.inline_asm_elementwise(
        asm=_X_SUMS, constraints=_CONSTRAINTS_X,
        args=[a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3],
        dtype=tl.float32, is_pure=True, pack=1,
    )  # fmt: skip
    return (8 - zero).to(tl.float32) * x_sums


@triton.jit
def _run_sums(words, x_ptr, K, word, x_ok, zero, SYMMETRIC: tl.constexpr, MASK_K: tl.constexpr,
              ROWS: tl.constexpr, row1_ok):  # fmt: skip
    """fp32 (BLOCK_N, WORDS / 4) per row of x (ROWS 1 or 2, the second K further on, `row1_ok`): per run
    of 4 words, the sum of (code - zero) * x by the lop3 PTX, which makes code - 8 (once for both
    rows); a zero point adds (8 - zero) * sum(x), summed once per run for all weight rows. The PTX runs
    once per run on its 4 words split out of the tile (elementwise, pack 1: which registers hold a
    run's words is then Triton's business, whatever layout it picks). One row: (sums, sums)."""
    w0, w1, w2, w3 = _run_parts(words)
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3 = _pair_parts(x_ptr, word, x_ok, MASK_K)
    if ROWS == 1:
        sums = tl.inline_asm_elementwise(
            asm=_RUN_SUMS, constraints=_CONSTRAINTS_RUN,
            args=[w0, w1, w2, w3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3],
            dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
        if not SYMMETRIC:
            sums += _x_run_sums(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3, zero)
        sums1 = sums
    else:
        e0, e1, e2, e3, f0, f1, f2, f3, g0, g1, g2, g3, h0, h1, h2, h3 = _pair_parts(
            x_ptr + K, word, x_ok & row1_ok, True
        )
        sums, sums1 = tl.inline_asm_elementwise(
            asm=_RUN_SUMS2, constraints=_CONSTRAINTS_RUN2,
            args=[w0, w1, w2, w3, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3,
                  e0, e1, e2, e3, f0, f1, f2, f3, g0, g1, g2, g3, h0, h1, h2, h3],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
        )  # fmt: skip
        if not SYMMETRIC:
            sums += _x_run_sums(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3, zero)
            sums1 += _x_run_sums(e0, e1, e2, e3, f0, f1, f2, f3, g0, g1, g2, g3, h0, h1, h2, h3, zero)
    return sums, sums1


@triton.jit
def _run_parts(t):
    """(R, WORDS) -> the 4 words of every run as 4 tensors (R, WORDS / 4)."""
    even, odd = tl.split(tl.reshape(t, (t.shape[0], t.shape[1] // 4, 2, 2)))
    first, third = tl.split(even)
    second, fourth = tl.split(odd)
    return first, second, third, fourth


@triton.jit
def _run_sums_int(words, x_ptr, xcol, x_ok, zero, MASK_K: tl.constexpr):
    """The same sums with integer ops in fp32 (TRITON_INTERPRET, where PTX cannot run)."""
    acc = tl.zeros(words.shape, dtype=tl.float32)
    for i in tl.static_range(8):
        xi = _x_at(x_ptr, xcol, i, x_ok, MASK_K).to(tl.float32)
        code = ((words >> (4 * i)) & 0xF).to(tl.float32)
        acc += (code - zero) * xi
    return tl.sum(tl.reshape(acc, (acc.shape[0], acc.shape[1] // 4, 4)), axis=2)


@triton.jit
def _load_words(w_rows, n_ok, kg, k_end, K, chunk_stride, WORDS: tl.constexpr,
                MASK_K: tl.constexpr, GROUP_MAJOR: tl.constexpr):  # fmt: skip
    """(BLOCK_N, WORDS) int32 words of columns kg .. kg + 8 * WORDS (zeros past K and from k_end on) of
    the rows that start at `w_rows`: at word kg / 8 of each row, or (GROUP_MAJOR) in column chunk
    kg / CHUNK_COLUMNS, `chunk_stride` words per chunk, of which each row holds CHUNK_WORDS."""
    word = (tl.multiple_of(kg // 8, 4) + tl.arange(0, WORDS))[None, :]
    mask = n_ok[:, None] & (kg < k_end)
    if MASK_K:
        mask = mask & (word * 8 < K)
    if GROUP_MAJOR:
        chunk = kg // CHUNK_COLUMNS
        in_chunk = tl.multiple_of((kg - chunk * CHUNK_COLUMNS) // 8, 4) + tl.arange(0, WORDS)
        word = (chunk * chunk_stride + in_chunk)[None, :]
    return tl.load(w_rows + word, mask=mask, other=0)


@triton.jit
def _group_sums(acc, acc1, words, x_row, s_ptr, z_ptr, rn, n_ok, kg, N, K, G, GROUP: tl.constexpr,
                WORDS: tl.constexpr, SYMMETRIC: tl.constexpr, MASK_K: tl.constexpr, DEQ_ASM: tl.constexpr,
                GROUP_MAJOR: tl.constexpr, ROWS: tl.constexpr, row1_ok):  # fmt: skip
    """(acc, acc1) plus the runs' sums of (code - zero) * x times the rows' scales, fp32 (BLOCK_N,
    WORDS / 4), per row of x (acc1: the second, with ROWS 2; scales and zeros (N, G), or (G, N) with
    GROUP_MAJOR: one group's rows side by side)."""
    g = kg // GROUP
    meta = rn[:, None] + g * N if GROUP_MAJOR else rn[:, None] * G + g
    g_ok = (n_ok & (kg < K))[:, None] if MASK_K else n_ok[:, None]  # no scale or zero past K to read
    word = (tl.multiple_of(kg // 8, 4) + tl.arange(0, WORDS))[None, :]
    x_ok = word * 8 < K
    if SYMMETRIC:
        zero = tl.full((words.shape[0], 1), 8, tl.int32)
    else:
        zero = tl.load(z_ptr + meta, mask=g_ok, other=0).to(tl.int32)
    if DEQ_ASM:
        sums, sums1 = _run_sums(words, x_row, K, word, x_ok, zero, SYMMETRIC, MASK_K, ROWS, row1_ok)
    else:
        sums = _run_sums_int(words, x_row, word * 8, x_ok, zero.to(tl.float32), MASK_K)
        sums1 = sums
        if ROWS == 2:
            sums1 = _run_sums_int(words, x_row + K, word * 8, x_ok & row1_ok, zero.to(tl.float32), True)
    # (BLOCK_N, 1) in the words' layout: no layout conversion through shared memory
    scale = tl.load(s_ptr + meta, mask=g_ok, other=0.0).to(tl.float32)
    if ROWS == 2:
        acc1 += sums1 * scale
    return acc + sums * scale, acc1


@triton.jit
def w4a16_gemv_lop3_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K, stride_words, out_ptr, part_ptr, count_ptr,
                           GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, MASK_K: tl.constexpr,
                           DEQ_ASM: tl.constexpr, PREFETCH: tl.constexpr, LAST_SUMS: tl.constexpr,
                           SPLIT_PAD: tl.constexpr, STAGES: tl.constexpr, GROUP_MAJOR: tl.constexpr,
                           ROWS: tl.constexpr):  # fmt: skip
    """Grid (cdiv(M, ROWS), cdiv(N, BLOCK_N), SPLIT_K); fp16 x; K a multiple of 8, rows `stride_words`
    int32 apart (GROUP_MAJOR: the `GroupMajorWeight` layout, `stride_words` words per column chunk).
    ROWS (1 or 2) rows of x per program: with 2 the weight is read and its codes made once for both.
    One step per sub-block of GB = min(GROUP, BLOCK_K) columns: (BLOCK_N, GB / 8) words, one scale (and
    zero) per row. PREFETCH 1 (2): the next step's (next two steps') words are loaded before this step's
    math, their latency hidden behind it, in registers. STAGES > 1 without PREFETCH: Triton's software
    pipeline instead, cp.async copies of the words (and x) STAGES - 1 steps ahead into shared memory
    (on sm_90 it also moves the math to one row per thread, which pairs x for 16 words a thread
    instead of 4: 396 instructions per step against 301, for a deeper queue of loads; which wins is a
    GPU measurement). Split-K: with LAST_SUMS each split stores its fp32 partial sums in `part`
    (SPLIT_K, M, N) and counts itself in `count` (cdiv(M, ROWS), cdiv(N, BLOCK_N), zero before the
    launch, left zero after it); the last split of a tile adds the partials and stores the output in
    x's dtype. So a decode step runs one kernel, where adding partials atomically into an fp32 `out`
    needs a zero fill before it and a cast after it."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    GB: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
    WORDS: tl.constexpr = GB // 8  # per row and step
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    G = (K + GROUP - 1) // GROUP
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(2) * span
    k_end = tl.minimum(k_start + span, K)
    w_rows = words_ptr + rn[:, None] * (CHUNK_WORDS if GROUP_MAJOR else stride_words)  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, WORDS // RUN), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, WORDS // RUN), dtype=tl.float32)  # the second row of x (ROWS 2)
    m0 = pid_m * ROWS
    row1_ok = m0 + 1 < M
    x_row = x_ptr + m0 * K
    if PREFETCH == 2:  # two steps of words in flight behind this step's math
        words = _load_words(w_rows, n_ok, k_start, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
        after = _load_words(w_rows, n_ok, k_start + GB, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
        for kg in range(k_start, k_end, GB):
            ahead = _load_words(w_rows, n_ok, kg + 2 * GB, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
            acc, acc1 = _group_sums(acc, acc1, words, x_row, s_ptr, z_ptr, rn, n_ok, kg, N, K, G, GROUP,
                                    WORDS, SYMMETRIC, MASK_K, DEQ_ASM, GROUP_MAJOR, ROWS,
                                    row1_ok)  # fmt: skip
            words = after
            after = ahead
    elif PREFETCH:
        words = _load_words(w_rows, n_ok, k_start, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
        for kg in range(k_start, k_end, GB):
            ahead = _load_words(w_rows, n_ok, kg + GB, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
            acc, acc1 = _group_sums(acc, acc1, words, x_row, s_ptr, z_ptr, rn, n_ok, kg, N, K, G, GROUP,
                                    WORDS, SYMMETRIC, MASK_K, DEQ_ASM, GROUP_MAJOR, ROWS,
                                    row1_ok)  # fmt: skip
            words = ahead
    elif STAGES > 0:  # Triton's software pipeline: cp.async copies of STAGES - 1 steps into shared memory
        for kg in tl.range(k_start, k_end, GB, num_stages=STAGES):
            words = _load_words(w_rows, n_ok, kg, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
            acc, acc1 = _group_sums(acc, acc1, words, x_row, s_ptr, z_ptr, rn, n_ok, kg, N, K, G, GROUP,
                                    WORDS, SYMMETRIC, MASK_K, DEQ_ASM, GROUP_MAJOR, ROWS,
                                    row1_ok)  # fmt: skip
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            for s in tl.static_range(BLOCK_K // GB):
                kg = k0 + s * GB
                words = _load_words(w_rows, n_ok, kg, k_end, K, stride_words, WORDS, MASK_K, GROUP_MAJOR)
                acc, acc1 = _group_sums(acc, acc1, words, x_row, s_ptr, z_ptr, rn, n_ok, kg, N, K, G, GROUP,
                                        WORDS, SYMMETRIC, MASK_K, DEQ_ASM, GROUP_MAJOR, ROWS,
                                        row1_ok)  # fmt: skip
    total = tl.sum(acc, axis=1)
    total1 = tl.sum(acc1, axis=1)
    ok1 = n_ok & row1_ok
    if SPLIT_K == 1:
        tl.store(out_ptr + m0 * N + rn, total.to(out_ptr.dtype.element_ty), mask=n_ok)
        if ROWS == 2:
            tl.store(out_ptr + (m0 + 1) * N + rn, total1.to(out_ptr.dtype.element_ty), mask=ok1)
    elif LAST_SUMS:
        tl.store(part_ptr + (tl.program_id(2) * M + m0) * N + rn, total, mask=n_ok)
        if ROWS == 2:
            tl.store(part_ptr + (tl.program_id(2) * M + m0 + 1) * N + rn, total1, mask=ok1)
        tl.debug_barrier()  # every thread's partials are written before the count (release, gpu scope)
        count = count_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            _add_partials(part_ptr, out_ptr, m0, M, N, rn, n_ok, SPLIT_K, SPLIT_PAD)
            if ROWS == 2:
                _add_partials(part_ptr, out_ptr, m0 + 1, M, N, rn, ok1, SPLIT_K, SPLIT_PAD)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        tl.atomic_add(out_ptr + m0 * N + rn, total, mask=n_ok)
        if ROWS == 2:
            tl.atomic_add(out_ptr + (m0 + 1) * N + rn, total1, mask=ok1)


@triton.jit
def _add_partials(part_ptr, out_ptr, m, M, N, rn, ok, SPLIT_K: tl.constexpr, SPLIT_PAD: tl.constexpr):
    """out[m, rn] = the sum of the SPLIT_K fp32 partials of row m, in out's dtype (the last split)."""
    splits = tl.arange(0, SPLIT_PAD)[:, None]  # SPLIT_K rounded up to a power of two
    parts = tl.load(
        part_ptr + (splits * M + m) * N + rn[None, :],
        mask=(splits < SPLIT_K) & ok[None, :],
        other=0.0,
        cache_modifier=".cg",
    )  # fmt: skip  (L2: never a stale L1 line)
    tl.store(out_ptr + m * N + rn, tl.sum(parts, axis=0).to(out_ptr.dtype.element_ty), mask=ok)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def split_counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for LAST_SUMS launches. Every launch leaves its counters at zero, so
    launches that run one after another can share them: one buffer per device and stream, grown on
    demand (a dropped buffer is freed in stream order, after the launches that used it). Under CUDA-graph
    capture a fresh buffer per launch instead: its zero fill is recorded in the graph (a fill node per
    replay), so a graph never depends on counters another graph or stream left, nor on a buffer that
    was never zeroed because its fill was captured, not run."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


@dataclass(frozen=True)
class GroupMajorWeight:
    """An INT4 weight laid out for the lop3 GEMV's loads: column chunks of CHUNK_COLUMNS (128 columns, a
    row's 16 words) outermost, every row's words of a chunk side by side, so that the (rows x 64 bytes)
    a program reads per step are one contiguous piece of memory (a warp's 16-byte loads cover 512
    contiguous bytes) instead of 64-byte pieces one row apart. Scales and zeros are stored (G, N) for
    the same reason. K is padded with zero codes to whole chunks (the matching x is masked to zero).
    The lop3 GEMV reads it (`gemv_lop3_group_major`, M <= 2) and so does the tensor-core GEMV
    (`gemv_tc_group_major`, more rows and prefill), so a runtime can hold this layout alone."""

    words: torch.Tensor  # int32 (chunks, N, CHUNK_WORDS)
    scales: torch.Tensor  # (G, N)
    zeros: torch.Tensor | None  # uint8 (G, N), None when symmetric
    k: int
    group_size: int

    @property
    def n(self) -> int:
        return self.words.shape[1]

    def step_group(self, x: torch.Tensor, block_k: int, kernel: str, dtypes: tuple) -> int:
        """The GROUP constexpr of a kernel reading this weight with x, whose steps (min(group, block_k)
        columns) must lie inside one chunk; a ValueError naming `kernel` where they cannot."""
        group = gemv_tc_group(x.shape[1], self.group_size, block_k)
        fits = group is not None and min(group, block_k) <= CHUNK_COLUMNS.value
        if x.shape[1] != self.k or x.dtype not in dtypes or not fits:
            names = " / ".join({torch.float16: "fp16", torch.bfloat16: "bf16"}[d] for d in dtypes)
            raise ValueError(
                f"{kernel} takes {names} x with K = {self.k} and a power-of-two group and block_k (steps "
                f"of at most {CHUNK_COLUMNS.value} columns); got x {tuple(x.shape)} {x.dtype}, group "
                f"{self.group_size}, block_k {block_k}"
            )
        return group

    @property
    def op_args(self) -> tuple:
        """The weight arguments of `torch.ops.trtcompress.w4a16_gemm_group_major`."""
        return self.words, self.scales, self.zeros, self.k, self.group_size

    @classmethod
    def from_packed(
        cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int
    ) -> GroupMajorWeight:
        """From the op's layout: `qweight` uint8 (N, K / 2) (two codes a byte, low nibble first), scales and
        zeros (N, G)."""
        n, row_bytes = qweight.shape
        if qweight.dtype != torch.uint8 or row_bytes != (k + 1) // 2 or k % 8:
            raise ValueError(
                f"expected a uint8 (N, K / 2) weight with K a multiple of 8, got {tuple(qweight.shape)} "
                f"{qweight.dtype} for K = {k}"
            )
        groups = -(-k // (group_size if group_size > 0 else k))
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t is not None and tuple(t.shape) != (n, groups):
                raise ValueError(
                    f"{name} must be (N, groups) = ({n}, {groups}) for K = {k} and group size "
                    f"{group_size}, got {tuple(t.shape)}"
                )
        chunk_bytes = 4 * CHUNK_WORDS.value
        chunks = -(-row_bytes // chunk_bytes)
        padded = qweight  # read in place as int32 where it can be: K in whole chunks, aligned rows
        if row_bytes % chunk_bytes or not qweight.is_contiguous() or qweight.data_ptr() % 4:
            padded = torch.zeros(n, chunks * chunk_bytes, dtype=torch.uint8, device=qweight.device)
            padded[:, :row_bytes] = qweight
        words = padded.view(torch.int32).view(n, chunks, CHUNK_WORDS.value).transpose(0, 1).contiguous()
        return cls(
            words,
            scales.t().contiguous(),
            None if zeros is None else zeros.t().contiguous(),
            k,
            group_size if group_size > 0 else k,
        )

    def to_packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The op's layout back: (qweight (N, K / 2) uint8, scales (N, G), zeros (N, G) or None)."""
        rows = self.words.transpose(0, 1).reshape(self.n, -1).contiguous().view(torch.uint8)
        qweight = rows[:, : (self.k + 1) // 2].contiguous()
        zeros = None if self.zeros is None else self.zeros.t().contiguous()
        return qweight, self.scales.t().contiguous(), zeros


def gemv_lop3_group_major(
    x: torch.Tensor,
    weight: GroupMajorWeight,
    block_n: int = 128,
    block_k: int = 256,
    split_k: int = 8,
    num_warps: int = 4,
    num_stages: int | None = None,
    prefetch: bool | int = True,
    last_sums: bool = True,
    stages: int = 0,
    rows: int = 1,
) -> torch.Tensor:
    """x (M, K) fp16 @ Wᵀ for a `GroupMajorWeight`: `w4a16_gemv_lop3_kernel` with GROUP_MAJOR (launch
    options as `w4a16_gemm_triton`'s for path "gemv_lop3"). The group (and block_k) must be powers of
    two from 32 with a step of at most one chunk: min(group, block_k) <= 128."""
    group = weight.step_group(x, block_k, "gemv_lop3_group_major", (torch.float16,))
    x = x.contiguous()
    if x.data_ptr() % 4:  # x is read as int32 words
        x = x.clone()
    launch = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    return launch_lop3(
        x,
        weight.words,
        weight.scales,
        weight.words if weight.zeros is None else weight.zeros,  # any pointer when symmetric: never read
        n=weight.n,
        stride_words=weight.n * CHUNK_WORDS.value,
        group=group,
        symmetric=weight.zeros is None,
        group_major=True,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
        launch=launch,
        prefetch=prefetch,
        last_sums=last_sums,
        stages=stages,
        rows=rows,
    )


def gemv_tc_group_major(
    x: torch.Tensor,
    weight: GroupMajorWeight,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int = 1,
    block_m: int = 16,
    num_warps: int = 4,
    num_stages: int | None = None,
    deq_asm: bool = False,
    stream_k: int = 0,
) -> torch.Tensor:
    """x (M, K) fp16 / bf16 @ Wᵀ for a `GroupMajorWeight` on the tensor-core GEMV (`w4a16_gemv_tc_kernel`
    with GROUP_MAJOR; launch options as `w4a16_gemm_triton`'s for path "gemv_tc"): up to `block_m` rows
    of x per program share one read of the weight, prefill in `block_m`-row tiles. The group (and
    block_k) must be powers of two from 32 with a step of at most one chunk: min(group, block_k) <= 128."""
    group = weight.step_group(x, block_k, "gemv_tc_group_major", (torch.float16, torch.bfloat16))
    launch = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    return launch_gemv_tc(
        x.contiguous(),
        weight.words.view(torch.uint8),
        weight.scales,
        weight.words if weight.zeros is None else weight.zeros,  # any pointer when symmetric: never read
        n=weight.n,
        stride_w=weight.n * CHUNK_BYTES.value,
        group=group,
        symmetric=weight.zeros is None,
        group_major=True,
        block_n=block_n,
        block_k=block_k,
        split_k=split_k,
        block_m=block_m,
        deq_asm=deq_asm,
        stream_k=stream_k,
        launch=launch,
    )


def launch_lop3(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    n: int,
    stride_words: int,
    group: int,
    symmetric: bool,
    group_major: bool,
    block_n: int,
    block_k: int,
    split_k: int,
    launch: dict,
    prefetch: bool | int,
    last_sums: bool,
    stages: int,
    rows: int = 1,
) -> torch.Tensor:
    """`w4a16_gemv_lop3_kernel` on contiguous fp16 x (M, K): the output (M, N) in x's dtype (split-K
    partials added atomically into fp32 and cast, or by the last split with `last_sums`); `rows` (1 or
    2) rows of x per program."""

    if prefetch not in (0, 1, 2):  # False / True count as 0 / 1
        raise ValueError(f"prefetch is 0, 1 or 2 steps ahead, not {prefetch!r}")
    if rows not in (1, 2):
        raise ValueError(f"the lop3 GEMV takes 1 or 2 rows of x per program, not {rows!r}")
    m, k = x.shape
    atomic = split_k > 1 and not last_sums
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if atomic else x.new_empty(m, n)
    grid = (triton.cdiv(m, rows), triton.cdiv(n, block_n), split_k)
    part = counts = out  # any pointer where they are not used
    if split_k > 1 and last_sums:
        part = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
        counts = split_counters(x.device, grid[0] * grid[1])
    w4a16_gemv_lop3_kernel[grid](
        x, words, scales, zeros, m, n, k, stride_words, out, part, counts, group, bool(symmetric), block_n,
        block_k, split_k, k % block_k != 0, not kernel._interpreting(), int(prefetch), bool(last_sums),
        triton.next_power_of_2(split_k), 0 if prefetch else stages, group_major, rows, **launch,
    )  # fmt: skip
    return out.to(x.dtype) if atomic else out
