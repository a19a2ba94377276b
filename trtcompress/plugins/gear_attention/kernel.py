"""OpenAI Triton kernels for a paged KIVI/GEAR cache.

`gear_decode_kernel`: one program per (sequence, KV head, split). It walks its share of the
sequence's compressed blocks. Per block: the packed key and value bytes are read as stored (16-byte
vector loads) and the codes of each bit position become exact fp16 (inline PTX on a GPU: `prmt` +
`sub.f16x2`, no int-to-float conversion); keys are never dequantized: their per-channel scale is
folded into the queries ((q∘s)·c + q·z, one `tl.dot` per bit position, the score tiles interleaved
back into token order); values are scaled by one fp16 fma. Then the sparse outliers (in-group ones by
compare-and-select; block-scope ones in factored form, their score term q[:, d_j]·ov_j added at token
t_j and their output term p[:, t_j]·ov_j at channel d_j, by default (`outlier_sums="runs"`) by a
gather and prefix sums over the codec's sorted outliers, or by one-hot products on the tensor cores),
the low-rank term in factored form ((q·B)·Aᵀ for keys, (P·A)·Bᵀ for values), and an online softmax
update. Without outliers the next block's loads are issued before this block's math. The last split
also takes the fp16 tail, the first the exact sink tokens. K and V never exist in memory in
dequantized form. Splits write (m, l, acc) partials that `gear_reduce_kernel` combines (split-K over
the sequence for long contexts); with one split the program normalizes and writes the output itself
(the form compiled AOT for TensorRT).

`quant_pack_kernel`: the quantize-and-pack kernel used when a block fills: per row (group) of G
elements, min/max over the non-outlier elements, fp16 scale/zero, `floor(x / s + 0.5)` codes packed
LSB-first into bytes — bit-identical to `trtcompress.kv.quant` (`minmax_params`: KIVI, and GEAR with
`range_search=0`; GEAR's default range search, `quant.search_params`, runs in torch).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _magic(c):
    """int16 codes (0..255) -> fp16 1024 + c, exactly: the code OR-ed into the mantissa of 1024.0. No
    int-to-float conversion instruction (those run at a quarter of the FP32 rate on Hopper and would
    bound the kernel)."""
    return (c | 0x6400).to(tl.float16, bitcast=True)


def _unpack_asm(bits: int) -> tuple[str, str]:
    """PTX for `tl.inline_asm_elementwise(pack=4)`: one 32-bit register of 4 packed bytes in, for each
    of the 8 / bits bit positions 4 exact fp16 codes out (2 registers of f16x2). Per position: shift,
    mask, two `prmt` that put each byte's code under the 0x64 exponent byte of 1024.0 (halves
    0x64cc = 1024 + c), one `sub.f16x2` each: 1.5 instructions per code instead of 4."""
    mask = {2: "0x03030303", 4: "0x0F0F0F0F"}[bits]
    per = 8 // bits
    lines = [
        "{",
        ".reg .b32 w, t, m, k;",
        f"mov.b32 w, ${2 * per};",  # copy the input first: outputs may share its register
        "mov.b32 m, 0x64646464;",
        "mov.b32 k, 0x64006400;",
    ]
    for i in range(per):
        lines.append(f"shr.b32 t, w, {i * bits};" if i else "mov.b32 t, w;")
        lines += [
            f"and.b32 t, t, {mask};",
            f"prmt.b32 ${2 * i}, t, m, 0x4140;",  # bytes (c0, 0x64, c1, 0x64): halves 1024 + c0, 1024 + c1
            f"prmt.b32 ${2 * i + 1}, t, m, 0x4342;",
            f"sub.f16x2 ${2 * i}, ${2 * i}, k;",
            f"sub.f16x2 ${2 * i + 1}, ${2 * i + 1}, k;",
        ]
    lines.append("}")
    return "\n".join(lines), ",".join(["=r"] * (2 * per) + ["r"])


_ASM2, _CONSTRAINTS2 = (tl.constexpr(x) for x in _unpack_asm(2))  # jit code reads constexpr globals
_ASM4, _CONSTRAINTS4 = (tl.constexpr(x) for x in _unpack_asm(4))


@triton.jit
def _split_codes(packed, BITS: tl.constexpr, ASM: tl.constexpr):
    """uint8 packed bytes -> the codes at each bit position i (exact fp16, same shape), for i < 8 / BITS
    (2-bit: four tiles; 4-bit: two, returned twice). ASM: the PTX path (GPU); else plain integer ops."""
    if ASM:
        if BITS == 2:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                _ASM2, _CONSTRAINTS2, [packed], dtype=(tl.float16,) * 4, is_pure=True, pack=4
            )
        else:
            c0, c1 = tl.inline_asm_elementwise(
                _ASM4, _CONSTRAINTS4, [packed], dtype=(tl.float16,) * 2, is_pure=True, pack=4
            )
            c2 = c0
            c3 = c1
    else:
        x = packed.to(tl.int16)
        c0 = _codes(x, 0, BITS)
        c1 = _codes(x, 1, BITS)
        if BITS == 2:
            c2 = _codes(x, 2, BITS)
            c3 = _codes(x, 3, BITS)
        else:
            c2 = c0
            c3 = c1
    return c0, c1, c2, c3


@triton.jit
def _interleave(x0, x1, x2, x3, PER: tl.constexpr):
    """PER (2 or 4) tiles (R, C) whose column j holds element PER*j + i of tile i -> (R, PER*C) in
    natural order (tl.join keeps the new axis in-thread; the reshape is a relabelling)."""
    rows: tl.constexpr = x0.shape[0]
    cols: tl.constexpr = x0.shape[1] * PER
    if PER == 4:  # [.., j, a, b] = x_{2a+b}[.., j]: flat j*4 + 2a + b
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (rows, cols))
    else:
        return tl.reshape(tl.join(x0, x1), (rows, cols))


@triton.jit
def _codes(packed, i: tl.constexpr, BITS: tl.constexpr):
    """The codes at bit position i of int16 packed bytes, as exact fp16 values."""
    return _magic((packed >> i * BITS) & ((1 << BITS) - 1)) - 1024.0


@triton.jit
def _load_backbone(kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bh, d, t, D: tl.constexpr,
                   T: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """One block's quantized backbone as stored: key bytes (D, T/PER) (channel rows, 16-byte vectors),
    per-channel key scale/zero (D,), value bytes (T, D/PER), per-token value scale/zero ((T,) or
    (T, VG)). Separate from the math so that the loop can issue the next block's loads first."""
    PER: tl.constexpr = 8 // BITS
    kb = tl.load(kc_ptr + (bh * D + d)[:, None] * (T // PER) + tl.arange(0, T // PER)[None, :])
    ks = tl.load(ks_ptr + bh * D + d)
    kz = tl.load(kz_ptr + bh * D + d)
    vb = tl.load(vc_ptr + (bh * T + t)[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :])
    if VG == 1:
        vs = tl.load(vs_ptr + bh * T + t)
        vz = tl.load(vz_ptr + bh * T + t)
    else:
        grp = (bh * T + t)[:, None] * VG + tl.arange(0, VG)[None, :]
        vs = tl.load(vs_ptr + grp)
        vz = tl.load(vz_ptr + grp)
    return kb, ks, kz, vb, vs, vz


@triton.jit
def _key_scores(qf, q_real, kb, ks, kz, BITS: tl.constexpr, ASM: tl.constexpr):
    """qf·deq(Kq)ᵀ for one block (qf: fp32 queries), (G_PAD, T), without dequantizing: keys have one
    scale/zero per channel, so q·(s∘c + z) = (q∘s)·c + q·z. The codes at bit position i of the key
    bytes (D, T/PER) are those of tokens PER*j + i (one dot each); the PER score tiles are
    interleaved back into token order."""
    PER: tl.constexpr = 8 // BITS
    G_PAD: tl.constexpr = qf.shape[0]
    qs = _pad_rows(q_real * ks.to(tl.float32)[None, :], G_PAD).to(tl.float16)
    bias = tl.sum(_pad_rows(q_real * kz.to(tl.float32)[None, :], G_PAD), 1)
    c0, c1, c2, c3 = _split_codes(kb, BITS, ASM)
    s0 = tl.dot(qs, c0)
    s1 = tl.dot(qs, c1)
    if PER == 4:
        s2 = tl.dot(qs, c2)
        s3 = tl.dot(qs, c3)
    else:
        s2 = s0
        s3 = s1
    return _interleave(s0, s1, s2, s3, PER) + bias[:, None]


@triton.jit
def _value_tile(vb, vs, vz, D: tl.constexpr, T: tl.constexpr, VG: tl.constexpr, BITS: tl.constexpr,
                ASM: tl.constexpr):  # fmt: skip
    """deq(Vq) for one block, (T, D) fp16: rows are tokens, VG groups of D / VG channels. Bit position
    i of the value bytes (T, D/PER) holds channels PER*j + i; the code tiles are interleaved back into
    channel order and scaled in fp16 (one fma, one rounding: what the fp32 dequantization rounded to
    fp16 gives)."""
    PER: tl.constexpr = 8 // BITS
    c0, c1, c2, c3 = _split_codes(vb, BITS, ASM)
    codes = _interleave(c0, c1, c2, c3, PER)  # (T, D)
    if VG == 1:
        scale = vs.to(tl.float16)[:, None]
        zero = vz.to(tl.float16)[:, None]
    else:  # (T, VG) broadcast over each group's channels
        scale = tl.reshape(tl.broadcast_to(vs[:, :, None], (T, VG, D // VG)), (T, D)).to(tl.float16)
        zero = tl.reshape(tl.broadcast_to(vz[:, :, None], (T, VG, D // VG)), (T, D)).to(tl.float16)
    return tl.fma(codes, scale, zero)


@triton.jit
def _run_sums(x, keys, NUM: tl.constexpr):
    """Segmented sums of the columns of x (R, C) whose `keys` (C,), sorted ascending, are equal:
    out[:, k] = sum of x[:, j] over keys[j] == k, for k < NUM. Prefix sums along the columns, the run
    of each key from a histogram, and the difference of the prefix sums at the two ends of the run:
    a scatter-add without one-hot products."""
    rows: tl.constexpr = x.shape[0]
    prefix = tl.cumsum(x, axis=1)
    counts = tl.histogram(keys, NUM)
    end = tl.cumsum(counts, 0)  # slots with key <= k
    start = end - counts
    hi = tl.gather(prefix, tl.broadcast_to(tl.maximum(end - 1, 0)[None, :], (rows, NUM)), axis=1)
    lo = tl.gather(prefix, tl.broadcast_to(tl.maximum(start - 1, 0)[None, :], (rows, NUM)), axis=1)
    return tl.where((end > 0)[None, :], hi, 0.0) - tl.where((start > 0)[None, :], lo, 0.0)


@triton.jit
def _real_rows(x, GP: tl.constexpr):
    """The first GP rows of x (R, C) (R a multiple of GP): the GQA group's real query rows of a tile
    padded to 16 rows for the tensor cores, so that work without `tl.dot` skips the padding."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if GP == R:
        return x
    else:
        first = (tl.arange(0, R // GP) == 0)[:, None, None]
        return tl.sum(tl.where(first, tl.reshape(x, (R // GP, GP, C)), 0.0), axis=0)


@triton.jit
def _pad_rows(x, R: tl.constexpr):
    """x (GP, C) as the first rows of an (R, C) tile of zeros."""
    GP: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1]
    if GP == R:
        return x
    else:
        first = (tl.arange(0, R // GP) == 0)[:, None, None]
        return tl.reshape(tl.where(first, tl.broadcast_to(x[None, :, :], (R // GP, GP, C)), 0.0), (R, C))


@triton.jit
def _outlier_runs(src, oi_ptr, ov_ptr, oscale, base, N_OUT: tl.constexpr, PAD: tl.constexpr, M: tl.constexpr,
                  src_ptr, src_mask, src_scale, FROM_MEMORY: tl.constexpr):  # fmt: skip
    """Block-scope outliers whose flat index a * M + r is stored sorted by r, in chunks of <= 128:
    out[:, r] += src[:, a] * value, summed per run of equal r (`_run_sums`). Keys (channel * T + token,
    M = T): their score terms per token, src = the queries, read from memory (FROM_MEMORY: `src` holds
    the real rows' offsets at `src_ptr`, masked by `src_mask`, times `src_scale`; L1-resident, and a
    gather from registers would go through shared memory). Values (token * D + channel, M = D): their
    output terms per channel, src = the probabilities (registers, `tl.gather`). Slots past N_OUT read
    r = M - 1 and value 0, so a chunk stays sorted and they add nothing. `oscale`: the block's scale of
    one-byte values (1.0 for fp16 ones). Chunks of 128: on sm_90 fewer instructions per block than 64
    (2,166 against 2,848 with the key path from memory, 74 barriers against 104) or 256 (2,868: longer
    scans) for gear-2bit at head dim 128 (benchmarks/gear_kernel_sass.py)."""
    OC: tl.constexpr = 128 if PAD > 128 else PAD
    rows: tl.constexpr = src.shape[0]
    out = tl.zeros([rows, M], tl.float32)
    for c in tl.static_range((N_OUT + OC - 1) // OC):
        j = c * OC + tl.arange(0, OC)
        jm = j < N_OUT
        oi = tl.load(oi_ptr + base * N_OUT + j, mask=jm, other=M - 1).to(tl.int32)
        ov = tl.load(ov_ptr + base * N_OUT + j, mask=jm, other=0.0).to(tl.float32) * oscale
        if FROM_MEMORY:
            picked = tl.load(src_ptr + src[:, None] + (oi // M)[None, :], mask=src_mask[:, None], other=0.0)
            picked = picked.to(tl.float32) * src_scale
        else:
            picked = tl.gather(src, tl.broadcast_to((oi // M)[None, :], (rows, OC)), axis=1)
        out += _run_sums(picked * ov[None, :], oi % M, M)
    return out


@triton.jit
def _key_outlier_scores_onehot(
    q_ptr, q_rows, qmask, qscale, oi_ptr, ov_ptr, oscale, base, N_OUT: tl.constexpr, PAD: tl.constexpr,
    t, T: tl.constexpr, G_PAD: tl.constexpr,
):  # fmt: skip
    """Block-scope key outliers (flat index = channel * T + token) as their score term, in chunks of
    <= 64: s[g, t_j] += q[g, d_j] * ov_j, i.e. (q gathered at the outliers' channels x values) times
    a one-hot (chunk, T) on the tensor cores. Never forms the dense (T, D) correction. Slots past
    N_OUT load value 0, so their one-hot rows need no mask."""
    OC: tl.constexpr = 64 if PAD > 64 else PAD
    s = tl.zeros([G_PAD, T], tl.float32)
    for c in tl.static_range((N_OUT + OC - 1) // OC):
        j = c * OC + tl.arange(0, OC)
        jm = j < N_OUT
        oi = tl.load(oi_ptr + base * N_OUT + j, mask=jm, other=0).to(tl.int32)
        ov = tl.load(ov_ptr + base * N_OUT + j, mask=jm, other=0.0).to(tl.float32) * oscale
        qd = tl.load(q_ptr + q_rows[:, None] + (oi // T)[None, :], mask=qmask[:, None], other=0.0)
        contrib = (qd.to(tl.float32) * (qscale * ov)[None, :]).to(tl.float16)  # (G_PAD, OC)
        onehot = tl.where((oi % T)[:, None] == t[None, :], 1.0, 0.0).to(tl.float16)  # (OC, T)
        s += tl.dot(contrib, onehot)
    return s


@triton.jit
def _value_outlier_acc_onehot(
    p16, oi_ptr, ov_ptr, oscale, base, N_OUT: tl.constexpr, PAD: tl.constexpr, t, d, T: tl.constexpr,
    D: tl.constexpr, G_PAD: tl.constexpr,
):  # fmt: skip
    """Block-scope value outliers (flat index = token * D + channel) as their output term, in chunks
    of <= 64: acc[g, d_j] += p[g, t_j] * ov_j = (p x one-hot (T, chunk)) x (one-hot (chunk, D) * ov).
    Slots past N_OUT load value 0 (their picks multiply a zero row)."""
    OC: tl.constexpr = 64 if PAD > 64 else PAD
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c in tl.static_range((N_OUT + OC - 1) // OC):
        j = c * OC + tl.arange(0, OC)
        jm = j < N_OUT
        oi = tl.load(oi_ptr + base * N_OUT + j, mask=jm, other=0).to(tl.int32)
        ov = (tl.load(ov_ptr + base * N_OUT + j, mask=jm, other=0.0).to(tl.float32) * oscale).to(tl.float16)
        pick_t = tl.where(t[:, None] == (oi // D)[None, :], 1.0, 0.0).to(tl.float16)
        pj = tl.dot(p16, pick_t)  # (G_PAD, OC): p at the outliers' tokens (exact: one term each)
        put_d = tl.where((oi % D)[:, None] == d[None, :], ov[:, None], 0.0).to(tl.float16)
        acc += tl.dot(pj.to(tl.float16), put_d)
    return acc


@triton.jit
def _attend_fp16(q, m_i, l_i, acc, k_ptr, v_ptr, offs, t, n_valid):
    """Online-softmax update with an exact fp16 tile of keys/values (rows t < n_valid are valid)."""
    tmask = (t < n_valid)[:, None]
    kt = tl.load(k_ptr + offs, mask=tmask, other=0.0).to(tl.float16)
    s = tl.dot(q, tl.trans(kt))
    s = tl.where((t < n_valid)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = tl.load(v_ptr + offs, mask=tmask, other=0.0).to(tl.float16)
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vt)
    return m_new, l_i, acc


@triton.jit
def _factor_column(ptr, bh, idx, r, N: tl.constexpr, R: tl.constexpr, INT4: tl.constexpr):
    """Column r of a block-head's low-rank factor `(N, R)` at rows `idx`, as float32 codes (values
    for fp16 factors): int8 / fp16 one per element, or int4 two per byte along the rows (row 2i in the
    low nibble, 2i + 1 in the high one, each stored as code + 8)."""
    if INT4:
        byte = tl.load(ptr + (bh * (N // 2) + idx // 2) * R + r).to(tl.int32)
        return (((byte >> ((idx % 2) * 4)) & 0xF) - 8).to(tl.float32)
    return tl.load(ptr + (bh * N + idx) * R + r).to(tl.float32)


@triton.jit
def _stored_scale_zero(s, z, sm_ptr, zm_ptr, bh, FP8: tl.constexpr):
    """A block-head's fp16 group scales and zeros: as stored, or fp16(fp8 code x its fp16 maximum),
    the numbers the codec's decompression forms."""
    if FP8:  # (one return: the compiler types every return statement)
        scale = (s.to(tl.float32) * tl.load(sm_ptr + bh).to(tl.float32)).to(tl.float16)
        zero = (z.to(tl.float32) * tl.load(zm_ptr + bh).to(tl.float32)).to(tl.float16)
    else:
        scale = s
        zero = z
    return scale, zero


@triton.jit
def _gear_decode(
    q_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    block_table_ptr,
    num_blocks_ptr,
    tail_len_ptr,
    slot_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    kov_ptr,
    koi_ptr,
    ka_ptr,
    kas_ptr,
    kb_ptr,
    kbs_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    vov_ptr,
    voi_ptr,
    va_ptr,
    vas_ptr,
    vb_ptr,
    vbs_ptr,
    kt_ptr,
    vt_ptr,
    ksink_ptr,
    vsink_ptr,
    kos_ptr,
    vos_ptr,
    ksm_ptr,
    kzm_ptr,
    vsm_ptr,
    vzm_ptr,
    sm_scale,
    max_blocks,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    T: tl.constexpr,
    VG: tl.constexpr,
    BITS: tl.constexpr,
    OUT_K: tl.constexpr,
    OUT_V: tl.constexpr,
    RANK_K: tl.constexpr,
    RANK_V: tl.constexpr,
    INT8_FACTORS: tl.constexpr,
    INT4_FACTORS: tl.constexpr,
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
    SINK: tl.constexpr,
    SPLITS: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    OUT_RUNS: tl.constexpr,
    OUT_SCALED: tl.constexpr,
    SCALES_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    t = tl.arange(0, T)
    gmask = g < GROUP
    qh = h * GROUP + g  # query heads served by KV head h (HF repeat_kv order)
    q = tl.load(q_ptr + (b * H * GROUP + qh)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    q_scale = sm_scale * 1.4426950408889634
    q32 = q.to(tl.float32) * q_scale  # exp2-domain scores
    q = q32.to(tl.float16)
    q_rows = (b * H * GROUP + qh) * D  # row offsets of this program's queries (outlier gathers)
    GP: tl.constexpr = 2 if GROUP <= 2 else (4 if GROUP <= 4 else (8 if GROUP <= 8 else G_PAD))
    q_real = _real_rows(q32, GP)  # elementwise work runs on the group's real rows only

    n_blocks = tl.load(num_blocks_ptr + b)
    per_split = tl.cdiv(n_blocks, SPLITS)
    start = split * per_split
    stop = tl.minimum(start + per_split, n_blocks)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if PREFETCH:  # the first block's loads; each iteration then issues the next block's first
        blk = tl.load(block_table_ptr + b * max_blocks + start, mask=start < stop, other=0).to(tl.int64)
        kb, ks, kz, vb, vs, vz = _load_backbone(
            kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, blk * H + h, d, t, D, T, VG, BITS
        )
    for j in range(start, stop):
        if PREFETCH:
            bh = blk * H + h
            nxt = tl.load(block_table_ptr + b * max_blocks + j + 1, mask=j + 1 < stop, other=0).to(tl.int64)
            kb_n, ks_n, kz_n, vb_n, vs_n, vz_n = _load_backbone(
                kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, nxt * H + h, d, t, D, T, VG, BITS
            )
        else:
            blk = tl.load(block_table_ptr + b * max_blocks + j).to(tl.int64)
            bh = blk * H + h
            kb, ks, kz, vb, vs, vz = _load_backbone(
                kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bh, d, t, D, T, VG, BITS
            )
        # ---- keys: rows are channels (D), per-channel scale/zero over the block's T tokens
        k_scale, k_zero = _stored_scale_zero(ks, kz, ksm_ptr, kzm_ptr, bh, SCALES_FP8)
        s = _key_scores(q32, q_real, kb, k_scale, k_zero, BITS, ASM)  # (G_PAD, T)
        k_osc = 1.0  # one-byte outlier values carry one fp16 scale per block and head
        v_osc = 1.0
        if OUT_SCALED:  # (a kind without outliers has no scales: its placeholder is never read)
            if OUT_K > 0:
                k_osc = tl.load(kos_ptr + bh).to(tl.float32)
            if OUT_V > 0:
                v_osc = tl.load(vos_ptr + bh).to(tl.float32)
        if not OUT_BLOCK and OUT_K > 0:  # in-group outliers: OUT_K (token, value) pairs per channel
            sk = tl.zeros([T, D], tl.float32)
            for o in tl.static_range(OUT_K):
                oi = tl.load(koi_ptr + (bh * D + d) * OUT_K + o).to(tl.int32)
                ov = tl.load(kov_ptr + (bh * D + d) * OUT_K + o).to(tl.float32)
                sk += tl.where(t[:, None] == oi[None, :], ov[None, :], 0.0)
            s += tl.dot(q, tl.trans(sk.to(tl.float16)))
        if OUT_BLOCK:
            if OUT_RUNS:
                g_real = tl.arange(0, GP)  # the group's real query rows, read from memory
                k_runs = _outlier_runs((b * H * GROUP + h * GROUP + g_real) * D, koi_ptr, kov_ptr, k_osc, bh,
                                       OUT_K, OUT_PAD, T, q_ptr, g_real < GROUP, q_scale, True)  # fmt: skip
                s += _pad_rows(k_runs, G_PAD)
            else:
                s += _key_outlier_scores_onehot(
                    q_ptr, q_rows, gmask, q_scale, koi_ptr, kov_ptr, k_osc, bh, OUT_K, OUT_PAD, t, T, G_PAD
                )
        for r in tl.static_range(RANK_K):  # (q·B)·Aᵀ
            fb = _factor_column(kb_ptr, bh, d, r, D, RANK_K, INT4_FACTORS)
            fa = _factor_column(ka_ptr, bh, t, r, T, RANK_K, INT4_FACTORS)
            if INT8_FACTORS:
                fb = fb * tl.load(kbs_ptr + bh * RANK_K + r).to(tl.float32)
                fa = fa * tl.load(kas_ptr + bh * RANK_K + r).to(tl.float32)
            qb = tl.sum(q.to(tl.float32) * fb[None, :], 1)
            s += qb[:, None] * fa[None, :]
        if SINK > 0:  # the first block's sink rows are attended to exactly, from the sink slot
            s = tl.where((t[None, :] < SINK) & (j == 0), float("-inf"), s)
        # ---- online softmax
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        # ---- values: rows are tokens, groups of D / VG channels
        v_scale, v_zero = _stored_scale_zero(vs, vz, vsm_ptr, vzm_ptr, bh, SCALES_FP8)
        v = _value_tile(vb, v_scale, v_zero, D, T, VG, BITS, ASM)  # (T, D) fp16
        if not OUT_BLOCK:
            for o in tl.static_range(OUT_V * VG):
                oi = tl.load(voi_ptr + (bh * T + t) * (OUT_V * VG) + o).to(tl.int32) + (o // OUT_V) * (
                    D // VG
                )
                ov = tl.load(vov_ptr + (bh * T + t) * (OUT_V * VG) + o)
                v += tl.where(d[None, :] == oi[:, None], ov[:, None], 0.0).to(tl.float16)
        p16 = p.to(tl.float16)
        acc += tl.dot(p16, v)
        if OUT_BLOCK:
            if OUT_RUNS:
                p_real = _real_rows(p, GP)
                v_runs = _outlier_runs(p_real, voi_ptr, vov_ptr, v_osc, bh, OUT_V, OUT_PAD, D, q_ptr, gmask,
                                       1.0, False)  # fmt: skip
                acc += _pad_rows(v_runs, G_PAD)
            else:
                acc += _value_outlier_acc_onehot(
                    p16, voi_ptr, vov_ptr, v_osc, bh, OUT_V, OUT_PAD, t, d, T, D, G_PAD
                )
        for r in tl.static_range(RANK_V):  # (P·A)·Bᵀ
            fb = _factor_column(vb_ptr, bh, d, r, D, RANK_V, INT4_FACTORS)
            fa = _factor_column(va_ptr, bh, t, r, T, RANK_V, INT4_FACTORS)
            if INT8_FACTORS:
                fb = fb * tl.load(vbs_ptr + bh * RANK_V + r).to(tl.float32)
                fa = fa * tl.load(vas_ptr + bh * RANK_V + r).to(tl.float32)
            pa = tl.sum(p * fa[None, :], 1)
            acc += pa[:, None] * fb[None, :]
        if PREFETCH:
            blk = nxt
            kb, ks, kz, vb, vs, vz = kb_n, ks_n, kz_n, vb_n, vs_n, vz_n

    if split == SPLITS - 1:  # the fp16 tail (tokens of the block being filled)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        tail = ((slot * H + h) * T + t)[:, None] * D + d[None, :]
        m_i, l_i, acc = _attend_fp16(q, m_i, l_i, acc, kt_ptr, vt_ptr, tail, t, tl.load(tail_len_ptr + b))
    if SINK > 0:  # noqa: SIM102  (a constexpr test: the code is not compiled in without a sink)
        # The exact sink tokens, once, by the split that holds the first block (before the first
        # block is compressed they are still in the tail).
        if (split == 0) & (n_blocks > 0):
            slot = tl.load(slot_ptr + b).to(tl.int64)
            rows = tl.minimum(t, SINK - 1)  # rows >= SINK are masked; keep their addresses in bounds
            sink = ((slot * H + h) * SINK + rows)[:, None] * D + d[None, :]
            m_i, l_i, acc = _attend_fp16(q, m_i, l_i, acc, ksink_ptr, vsink_ptr, sink, t, SINK)

    if SPLITS == 1:
        o_ptr = out_ptr + (b * H * GROUP + qh)[:, None] * D + d[None, :]
        # an empty sequence (no blocks, no tail: a CUDA-graph padding row) gives zeros, as the reference
        tl.store(o_ptr, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], mask=gmask[:, None])
    else:
        row = (b * H + h) * SPLITS + split  # only the group's real rows (G_PAD pads to 16)
        tl.store(part_m_ptr + row * G_PAD + g, m_i, mask=gmask)
        tl.store(part_l_ptr + row * G_PAD + g, l_i, mask=gmask)
        tl.store(part_acc_ptr + (row * G_PAD + g)[:, None] * D + d[None, :], acc, mask=gmask[:, None])


# max_blocks (the block table's width) grows with the longest sequence: left unspecialized, one compiled
# kernel serves every width instead of a recompile when it leaves 1 or reaches a multiple of 16
@triton.jit(do_not_specialize=["max_blocks"])
def gear_decode_kernel(
    q_ptr,
    out_ptr,
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    block_table_ptr,
    num_blocks_ptr,
    tail_len_ptr,
    slot_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    kov_ptr,
    koi_ptr,
    ka_ptr,
    kas_ptr,
    kb_ptr,
    kbs_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    vov_ptr,
    voi_ptr,
    va_ptr,
    vas_ptr,
    vb_ptr,
    vbs_ptr,
    kt_ptr,
    vt_ptr,
    ksink_ptr,
    vsink_ptr,
    kos_ptr,
    vos_ptr,
    ksm_ptr,
    kzm_ptr,
    vsm_ptr,
    vzm_ptr,
    sm_scale,
    max_blocks,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    T: tl.constexpr,
    VG: tl.constexpr,
    BITS: tl.constexpr,
    OUT_K: tl.constexpr,
    OUT_V: tl.constexpr,
    RANK_K: tl.constexpr,
    RANK_V: tl.constexpr,
    INT8_FACTORS: tl.constexpr,
    INT4_FACTORS: tl.constexpr,
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
    SINK: tl.constexpr,
    SPLITS: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    OUT_RUNS: tl.constexpr,
    OUT_SCALED: tl.constexpr,
    SCALES_FP8: tl.constexpr,
):
    """Grid (batch, KV heads, splits); the torch launcher's entry point."""
    _gear_decode(
        q_ptr,
        out_ptr,
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        block_table_ptr,
        num_blocks_ptr,
        tail_len_ptr,
        slot_ptr,
        kc_ptr,
        ks_ptr,
        kz_ptr,
        kov_ptr,
        koi_ptr,
        ka_ptr,
        kas_ptr,
        kb_ptr,
        kbs_ptr,
        vc_ptr,
        vs_ptr,
        vz_ptr,
        vov_ptr,
        voi_ptr,
        va_ptr,
        vas_ptr,
        vb_ptr,
        vbs_ptr,
        kt_ptr,
        vt_ptr,
        ksink_ptr,
        vsink_ptr,
        kos_ptr,
        vos_ptr,
        ksm_ptr,
        kzm_ptr,
        vsm_ptr,
        vzm_ptr,
        sm_scale,
        max_blocks,
        H,
        GROUP,
        G_PAD,
        D,
        T,
        VG,
        BITS,
        OUT_K,
        OUT_V,
        RANK_K,
        RANK_V,
        INT8_FACTORS,
        INT4_FACTORS,
        OUT_BLOCK,
        OUT_PAD,
        SINK,
        SPLITS,
        ASM,
        PREFETCH,
        OUT_RUNS,
        OUT_SCALED,
        SCALES_FP8,
    )


@triton.jit
def gear_decode_trt_kernel(
    q_ptr,
    block_table_ptr,
    num_blocks_ptr,
    tail_len_ptr,
    slot_ptr,
    kc_ptr,
    ks_ptr,
    kz_ptr,
    kov_ptr,
    koi_ptr,
    ka_ptr,
    kas_ptr,
    kb_ptr,
    kbs_ptr,
    kos_ptr,
    ksm_ptr,
    kzm_ptr,
    vc_ptr,
    vs_ptr,
    vz_ptr,
    vov_ptr,
    voi_ptr,
    va_ptr,
    vas_ptr,
    vb_ptr,
    vbs_ptr,
    vos_ptr,
    vsm_ptr,
    vzm_ptr,
    kt_ptr,
    vt_ptr,
    ksink_ptr,
    vsink_ptr,
    max_blocks,
    out_ptr,
    SM_SCALE: tl.constexpr,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    T: tl.constexpr,
    VG: tl.constexpr,
    BITS: tl.constexpr,
    OUT_K: tl.constexpr,
    OUT_V: tl.constexpr,
    RANK_K: tl.constexpr,
    RANK_V: tl.constexpr,
    INT8_FACTORS: tl.constexpr,
    INT4_FACTORS: tl.constexpr,
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
    SINK: tl.constexpr,
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,
    OUT_RUNS: tl.constexpr,
    OUT_SCALED: tl.constexpr,
    SCALES_FP8: tl.constexpr,
):
    """TensorRT AOT entry: parameters in QDP order (inputs, int32 extra args, output), one split,
    grid (batch, KV heads, 1). The partial-result pointers are never touched with SPLITS == 1. The sink
    slots (SINK > 0), one-byte outlier scales (OUT_SCALED) and fp8 group scales' maxima (SCALES_FP8) are
    plugin inputs too; placeholders, never read, where the cache has none."""
    _gear_decode(
        q_ptr,
        out_ptr,
        out_ptr,
        out_ptr,
        out_ptr,
        block_table_ptr,
        num_blocks_ptr,
        tail_len_ptr,
        slot_ptr,
        kc_ptr,
        ks_ptr,
        kz_ptr,
        kov_ptr,
        koi_ptr,
        ka_ptr,
        kas_ptr,
        kb_ptr,
        kbs_ptr,
        vc_ptr,
        vs_ptr,
        vz_ptr,
        vov_ptr,
        voi_ptr,
        va_ptr,
        vas_ptr,
        vb_ptr,
        vbs_ptr,
        kt_ptr,
        vt_ptr,
        ksink_ptr,
        vsink_ptr,
        kos_ptr,
        vos_ptr,
        ksm_ptr,
        kzm_ptr,
        vsm_ptr,
        vzm_ptr,
        SM_SCALE,
        max_blocks,
        H,
        GROUP,
        G_PAD,
        D,
        T,
        VG,
        BITS,
        OUT_K,
        OUT_V,
        RANK_K,
        RANK_V,
        INT8_FACTORS,
        INT4_FACTORS,
        OUT_BLOCK,
        OUT_PAD,
        SINK,
        1,
        ASM,
        PREFETCH,
        OUT_RUNS,
        OUT_SCALED,
        SCALES_FP8,
    )


@triton.jit
def gear_reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    lse_ptr,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """Combines the splits' (m, l, acc) partials of one query row (grid: batch, KV heads, GQA group);
    with WRITE_LSE also its natural-log softmax normaliser (so a caller can merge this attention with
    other keys). All splits are read by one load per tensor, not one after another: a loop over the
    splits would wait out a memory round trip per split (at batch 1 with 32 splits, 64 of them)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLITS_PAD)  # SPLITS rounded up to a power of two
    smask = sp < SPLITS
    row = ((b * H + h) * SPLITS + sp) * G_PAD + g  # this query row in every split's partials
    m_all = tl.load(part_m_ptr + row, mask=smask, other=float("-inf"))
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_all - m_safe)  # splits without tokens (m = -inf) weigh 0
    l_tot = tl.sum(w * tl.load(part_l_ptr + row, mask=smask, other=0.0), 0)
    CHUNK: tl.constexpr = 32 if SPLITS_PAD > 32 else SPLITS_PAD  # (CHUNK, D) fp32 tiles stay in registers
    acc = tl.zeros([D], tl.float32)
    for c in tl.static_range(SPLITS_PAD // CHUNK):  # unrolled: the chunks' loads are independent
        spc = c * CHUNK + tl.arange(0, CHUNK)
        rowc = ((b * H + h) * SPLITS + spc) * G_PAD + g
        mc = tl.load(part_m_ptr + rowc, mask=spc < SPLITS, other=float("-inf"))
        part = tl.load(part_acc_ptr + rowc[:, None] * D + d[None, :], mask=(spc < SPLITS)[:, None], other=0.0)
        acc += tl.sum(tl.exp2(mc - m_safe)[:, None] * part, 0)
    qh = b * H * GROUP + h * GROUP + g
    if WRITE_LSE:  # scores are in log2 units (q carries log2(e)): back to natural logs
        has = l_tot > 0  # a row with at least one token (an empty sequence has none)
        lse = tl.where(has, (m_safe + tl.log2(tl.where(has, l_tot, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + qh, lse)
    tl.store(out_ptr + qh * D + d, acc / tl.where(l_tot > 0, l_tot, 1.0))  # an empty sequence: zeros


@triton.jit
def quant_pack_kernel(
    x_ptr,
    exclude_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    G: tl.constexpr,
    BITS: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, G)
    x = tl.load(x_ptr + row * G + i).to(tl.float32)
    lo = tl.min(x, 0)
    hi = tl.max(x, 0)
    if HAS_EXCLUDE:  # as `quant.row_range`: a row with every element excluded keeps its whole range
        ex = tl.load(exclude_ptr + row * G + i) != 0
        kept = tl.sum((~ex).to(tl.int32), 0) > 0
        lo = tl.where(kept, tl.min(tl.where(ex, float("inf"), x), 0), lo)
        hi = tl.where(kept, tl.max(tl.where(ex, float("-inf"), x), 0), hi)
    levels: tl.constexpr = (1 << BITS) - 1
    scale = tl.maximum((hi - lo) / levels, 1e-5).to(tl.float16)
    zero = lo.to(tl.float16)
    code = tl.floor((x - zero.to(tl.float32)) / scale.to(tl.float32) + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), levels).to(tl.int32)
    per_byte: tl.constexpr = 8 // BITS
    packed = tl.sum(tl.reshape(code << ((i % per_byte) * BITS), [G // per_byte, per_byte]), 1)
    tl.store(codes_ptr + row * (G // per_byte) + tl.arange(0, G // per_byte), packed.to(tl.uint8))
    tl.store(scale_ptr + row, scale)
    tl.store(zero_ptr + row, zero)


# ------------------------------------------------------------------------------------------ launchers

FIELD_ORDER = ("codes", "scale", "zero", "out_val", "out_idx", "lr_a", "lr_a_scale", "lr_b", "lr_b_scale")


def _field_args(fields: dict, like) -> list:
    """The kernel's pointer arguments for one of K/V; absent fields get a 1-element placeholder."""
    import torch

    placeholder = torch.zeros(1, dtype=torch.float16, device=like.device)
    return [fields[name].contiguous() if name in fields else placeholder for name in FIELD_ORDER]


def _sink_args(k_sink, v_sink, layout, like) -> list:
    """The sink slots `(S, H, sink, D)` fp16, or placeholders when the cache keeps no sink."""
    import torch

    if not layout.sink:
        placeholder = torch.zeros(1, dtype=torch.float16, device=like.device)
        return [placeholder, placeholder]
    if k_sink is None or v_sink is None or k_sink.shape[2] != layout.sink:
        raise ValueError(f"the layout has {layout.sink} sink tokens: pass k_sink/v_sink (S, H, sink, D)")
    return [k_sink.to(torch.float16).contiguous(), v_sink.to(torch.float16).contiguous()]


def _outlier_scale_args(k_fields: dict, v_fields: dict, layout, like) -> list:
    """The per-block-head scales of one-byte outlier values `(blocks, H, 1)`, or placeholders."""
    import torch

    placeholder = torch.zeros(1, dtype=torch.float16, device=like.device)
    if not layout.outlier_scaled:
        return [placeholder, placeholder]
    return [
        fields["out_scale"].contiguous() if "out_scale" in fields else placeholder
        for fields in (k_fields, v_fields)
    ]


def _scale_max_args(k_fields: dict, v_fields: dict, like) -> list:
    """The fp16 maxima of fp8 group scales and zeros (`scale_dtype: fp8`), K then V, or placeholders."""
    import torch

    placeholder = torch.zeros(1, dtype=torch.float16, device=like.device)
    return [
        fields[name].contiguous() if name in fields else placeholder
        for fields in (k_fields, v_fields)
        for name in ("scale_max", "zero_max")
    ]


def layout_constants(
    layout, heads: int, group: int, dim: int, *, splits: int, asm: bool, prefetch: bool, outlier_sums: str
) -> dict:
    """The constexprs `gear_decode_kernel` is specialized on, for a cache layout, `heads` KV heads with
    `group` query heads each of head dim `dim`, and the launch choices (see `gear_attention_triton`)."""
    return {
        "H": heads,
        "GROUP": group,
        "G_PAD": max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
        "D": dim,
        "T": layout.block,
        "VG": dim // layout.group if dim % layout.group == 0 else 1,
        "BITS": layout.bits,
        "OUT_K": layout.outliers[0],
        "OUT_V": layout.outliers[1],
        "RANK_K": layout.rank[0],
        "RANK_V": layout.rank[1],
        "INT8_FACTORS": layout.int8_factors,
        "INT4_FACTORS": layout.int4_factors,
        "OUT_BLOCK": layout.outlier_scope == "block",
        "OUT_PAD": max(16, triton.next_power_of_2(max(layout.outliers))),
        "SINK": layout.sink,
        "SPLITS": splits,
        "ASM": asm,
        "PREFETCH": prefetch,
        "OUT_RUNS": outlier_sums == "runs",
        "OUT_SCALED": layout.outlier_scaled,
        "SCALES_FP8": layout.scales_fp8,
    }


# 2 warps a program: the H200 timed it fastest for every 32k-token case (kivi-2bit and gear-2bit, batch
# 1 and 8, benchmarks/results/gear_attention_gpu_h200_2warps.json; 1.47-1.78x faster than 4 warps at 2
# programs per SM for gear-2bit, 1.17-1.48x for kivi-2bit). About 6 programs per SM: a sweep of the split
# count (8..256, 16k and 32k, both layer shapes, batch 1 and 8, caches read from HBM;
# benchmarks/results/gear_attention_splits_gpu_h200.json) put the 8B-class layer's batch-1 best at 64
# splits, where 8 per SM picked 128 (1.07-1.20x slower); its geometric mean over the 16 cases is 1.039x
# of each case's best split, against 1.073x for 8 per SM
DEFAULT_WARPS = 2
DEFAULT_PROGRAMS = 792


def default_splits(max_blocks: int, batch_heads: int, target_programs: int = DEFAULT_PROGRAMS) -> int:
    """Enough splits that batch x heads x splits fills the GPU (`target_programs`; 792 = 6 per SM on
    132 SMs), >= 2 blocks each; a power of two, so few kernel variants get compiled."""
    want = max(1, min(target_programs // max(batch_heads, 1), max_blocks // 2 or 1, 256))
    return 1 << (want.bit_length() - 1)


def gear_attention_triton(
    q,
    k_fields,
    v_fields,
    k_tail,
    v_tail,
    block_table,
    num_blocks,
    tail_lens,
    slots,
    layout,
    scale: float,
    splits: int | None = None,
    k_sink=None,
    v_sink=None,
    num_warps: int = DEFAULT_WARPS,
    num_stages: int | None = None,
    fast_unpack: bool | None = None,
    prefetch: bool | None = None,
    outlier_sums: str = "runs",
    return_lse: bool = False,
):
    """Launch the fused decode attention; same contract as `reference.gear_attention_reference`.
    `splits`/`num_warps`/`num_stages`: launch tuning (None: `default_splits`, Triton's default).
    `fast_unpack`: unpack codes with inline PTX (None: on a GPU, not under TRITON_INTERPRET).
    `prefetch`: issue the next block's backbone loads before this block's math (register double
    buffering, so that a program's memory latency overlaps its own arithmetic). None: for caches
    without outliers (KIVI: 1.15-1.29x faster on an H100 at 32k); with GEAR's outlier chunks the
    extra live registers cost more than the overlap gains (8-21% slower), so off.
    `outlier_sums`: how block-scope outliers reach their tokens / channels: "runs" (the default: a
    gather, prefix sums and a histogram over the codec's sorted outliers, on the GQA group's real
    query rows only; on an H100 at 32k 2.0-2.2x faster than "onehot"; since then the keys' queries
    come from memory and the chunks hold 128: 3.1x fewer sm_90 instructions per gear-2bit block than
    "onehot", not yet timed on a GPU) or "onehot" (one-hot products on the tensor cores).
    `return_lse`: also return each query row's natural-log softmax normaliser `(B, Hq)` over the
    cache's tokens (log Σ exp(scale·q·k)), to merge with attention over other keys (split-K is then
    used even for short sequences: the reduce kernel writes it)."""
    import torch

    if layout.bits not in (2, 4):  # 3-bit codes straddle bytes: one byte is not a whole number of codes
        raise ValueError(
            f"the fused GEAR/KIVI attention kernel reads 2- and 4-bit codes, not {layout.bits}-bit "
            "(kivi-3bit): use gear_attention_reference for this cache"
        )
    if fast_unpack is None:
        fast_unpack = q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    if prefetch is None:
        prefetch = not any(layout.outliers)
    if outlier_sums not in ("onehot", "runs"):
        raise ValueError(f"outlier_sums must be 'onehot' or 'runs', not {outlier_sums!r}")
    bsz, hq, dim = q.shape
    h = k_tail.shape[1]
    group = hq // h
    max_blocks = block_table.shape[1]
    splits = splits or default_splits(max_blocks, bsz * h)  # a shape: no device sync, graph-capturable
    if return_lse:
        splits = max(splits, 2)  # the normaliser comes out of the reduce kernel
    constants = layout_constants(
        layout, h, group, dim, splits=splits, asm=fast_unpack, prefetch=prefetch, outlier_sums=outlier_sums
    )
    g_pad = constants["G_PAD"]
    out = torch.empty(bsz, hq, dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(bsz * h * splits * g_pad, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(bsz * h * splits * g_pad * dim, dtype=torch.float32, device=q.device)
    gear_decode_kernel[(bsz, h, splits)](
        q.contiguous(),
        out,
        part_m,
        part_l,
        part_acc,
        block_table.to(torch.int32).contiguous(),
        num_blocks.to(torch.int32).contiguous(),
        tail_lens.to(torch.int32).contiguous(),
        slots.to(torch.int32).contiguous(),
        *_field_args(k_fields, q),
        *_field_args(v_fields, q),
        k_tail.contiguous(),
        v_tail.contiguous(),
        *_sink_args(k_sink, v_sink, layout, q),
        *_outlier_scale_args(k_fields, v_fields, layout, q),
        *_scale_max_args(k_fields, v_fields, q),
        scale,
        max_blocks,
        **constants,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device) if return_lse else out
    if splits > 1:
        gear_reduce_kernel[(bsz, h, group)](
            part_m, part_l, part_acc, out, lse, H=h, GROUP=group, G_PAD=g_pad, D=dim, SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), WRITE_LSE=return_lse,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def quant_pack_triton(x, bits: int, exclude=None):
    """Rows `(R, G)` -> (packed codes `(R, G * bits / 8)` uint8, scale `(R,)` fp16, zero `(R,)` fp16)."""
    import torch

    rows, g = x.shape
    codes = torch.empty(rows, g * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float16, device=x.device)
    zero = torch.empty(rows, dtype=torch.float16, device=x.device)
    ex = exclude.to(torch.uint8).contiguous() if exclude is not None else codes
    quant_pack_kernel[(rows,)](
        x.float().contiguous(), ex, codes, scale, zero, G=g, BITS=bits, HAS_EXCLUDE=exclude is not None
    )
    return codes, scale, zero
