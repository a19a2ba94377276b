"""OpenAI Triton kernels for a paged KIVI/GEAR cache.

`gear_decode_kernel`: one program per (sequence, KV head, split). It walks its share of the
sequence's compressed blocks; per block it unpacks the codes and applies the group scale/zero in
registers, adds the sparse outliers (compare-and-select against in-group indices; block-scope
outliers in factored form too: their score term q[:, d_j]·ov_j scattered to token t_j, and their
output term p[:, t_j]·ov_j scattered to channel d_j, each a small one-hot product on the tensor
cores), takes the scores with the GQA group's queries (one `tl.dot`), adds the low-rank term in factored form
((q·B)·Aᵀ for keys, (P·A)·Bᵀ for values), and updates an online softmax. The last split also takes
the fp16 tail. K and V never exist in memory in dequantized form. Splits write (m, l, acc) partials
that `gear_reduce_kernel` combines (split-K over the sequence for long contexts); with one split the
program normalizes and writes the output itself (the form compiled AOT for TensorRT).

`quant_pack_kernel`: the quantize-and-pack kernel used when a block fills: per row (group) of G
elements, min/max over the non-outlier elements, fp16 scale/zero, `floor(x / s + 0.5)` codes packed
LSB-first into bytes — bit-identical to `trtcompress.kv.quant` (`minmax_params`: KIVI, and GEAR with
`range_search=0`; GEAR's default range search, `quant.search_params`, runs in torch).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack(codes_ptr, row_stride, rows, cols, BITS: tl.constexpr):
    """codes[r, c] for the (rows x cols) index tensors, packed LSB-first along c."""
    per_byte: tl.constexpr = 8 // BITS
    byte = tl.load(codes_ptr + rows * row_stride + cols // per_byte)
    return ((byte.to(tl.int32) >> ((cols % per_byte) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _key_outlier_scores(
    q_ptr, q_rows, qmask, qscale, oi_ptr, ov_ptr, base, N_OUT: tl.constexpr, PAD: tl.constexpr,
    t, T: tl.constexpr, G_PAD: tl.constexpr,
):  # fmt: skip
    """Block-scope key outliers (flat index = channel * T + token) as their score term, in chunks of
    <= 64: s[g, t_j] += q[g, d_j] * ov_j, i.e. (q gathered at the outliers' channels x values) times
    a one-hot (chunk, T) on the tensor cores. Never forms the dense (T, D) correction."""
    OC: tl.constexpr = 64 if PAD > 64 else PAD
    s = tl.zeros([G_PAD, T], tl.float32)
    for c in tl.static_range(PAD // OC):
        j = c * OC + tl.arange(0, OC)
        jm = j < N_OUT
        oi = tl.load(oi_ptr + base * N_OUT + j, mask=jm, other=0).to(tl.int32)
        ov = tl.load(ov_ptr + base * N_OUT + j, mask=jm, other=0.0).to(tl.float32)
        qd = tl.load(
            q_ptr + q_rows[:, None] + (oi // T)[None, :], mask=qmask[:, None] & jm[None, :], other=0.0
        )
        contrib = (qd.to(tl.float32) * qscale * ov[None, :]).to(tl.float16)  # (G_PAD, OC)
        onehot = tl.where(((oi % T)[:, None] == t[None, :]) & jm[:, None], 1.0, 0.0).to(tl.float16)
        s += tl.dot(contrib, onehot)
    return s


@triton.jit
def _value_outlier_acc(
    p16, oi_ptr, ov_ptr, base, N_OUT: tl.constexpr, PAD: tl.constexpr, t, d, T: tl.constexpr,
    D: tl.constexpr, G_PAD: tl.constexpr,
):  # fmt: skip
    """Block-scope value outliers (flat index = token * D + channel) as their output term, in chunks
    of <= 64: acc[g, d_j] += p[g, t_j] * ov_j = (p x one-hot (T, chunk)) x (one-hot (chunk, D) * ov)."""
    OC: tl.constexpr = 64 if PAD > 64 else PAD
    acc = tl.zeros([G_PAD, D], tl.float32)
    for c in tl.static_range(PAD // OC):
        j = c * OC + tl.arange(0, OC)
        jm = j < N_OUT
        oi = tl.load(oi_ptr + base * N_OUT + j, mask=jm, other=0).to(tl.int32)
        ov = tl.load(ov_ptr + base * N_OUT + j, mask=jm, other=0.0)
        pick_t = tl.where((t[:, None] == (oi // D)[None, :]) & jm[None, :], 1.0, 0.0).to(tl.float16)
        pj = tl.dot(p16, pick_t)  # (G_PAD, OC): p at the outliers' tokens (exact: one term each)
        put_d = tl.where(((oi % D)[:, None] == d[None, :]) & jm[:, None], ov[:, None], 0.0).to(tl.float16)
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
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
    SINK: tl.constexpr,
    SPLITS: tl.constexpr,
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
    q = (q.to(tl.float32) * q_scale).to(tl.float16)  # exp2-domain scores
    q_rows = (b * H * GROUP + qh) * D  # row offsets of this program's queries (outlier gathers)

    n_blocks = tl.load(num_blocks_ptr + b)
    per_split = tl.cdiv(n_blocks, SPLITS)
    start = split * per_split
    stop = tl.minimum(start + per_split, n_blocks)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    kbytes: tl.constexpr = T * BITS // 8
    vbytes: tl.constexpr = D * BITS // 8
    for j in range(start, stop):
        blk = tl.load(block_table_ptr + b * max_blocks + j).to(tl.int64)
        bh = blk * H + h
        # ---- keys: rows are channels (D), per-channel scale/zero over the block's T tokens
        kq = _unpack(kc_ptr + bh * D * kbytes, kbytes, d[None, :], t[:, None], BITS)  # (T, D)
        k = kq * tl.load(ks_ptr + bh * D + d)[None, :].to(tl.float32)
        k += tl.load(kz_ptr + bh * D + d)[None, :].to(tl.float32)
        if not OUT_BLOCK:
            for o in tl.static_range(OUT_K):  # sparse outliers: exact corrections at (channel, token)
                oi = tl.load(koi_ptr + (bh * D + d) * OUT_K + o).to(tl.int32)
                ov = tl.load(kov_ptr + (bh * D + d) * OUT_K + o).to(tl.float32)
                k += tl.where(t[:, None] == oi[None, :], ov[None, :], 0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float16)))  # (G_PAD, T)
        if OUT_BLOCK:
            s += _key_outlier_scores(
                q_ptr, q_rows, gmask, q_scale, koi_ptr, kov_ptr, bh, OUT_K, OUT_PAD, t, T, G_PAD
            )
        for r in tl.static_range(RANK_K):  # (q·B)·Aᵀ
            kb = tl.load(kb_ptr + (bh * D + d) * RANK_K + r).to(tl.float32)
            ka = tl.load(ka_ptr + (bh * T + t) * RANK_K + r).to(tl.float32)
            if INT8_FACTORS:
                kb = kb * tl.load(kbs_ptr + bh * RANK_K + r).to(tl.float32)
                ka = ka * tl.load(kas_ptr + bh * RANK_K + r).to(tl.float32)
            qb = tl.sum(q.to(tl.float32) * kb[None, :], 1)
            s += qb[:, None] * ka[None, :]
        if SINK > 0:  # the first block's sink rows are attended to exactly, from the sink slot
            s = tl.where((t[None, :] < SINK) & (j == 0), float("-inf"), s)
        # ---- online softmax
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
        # ---- values: rows are tokens, groups of 64 channels
        vq = _unpack(vc_ptr + bh * T * vbytes, vbytes, t[:, None], d[None, :], BITS)  # (T, D)
        vgrp = (bh * T + t)[:, None] * VG + (d // (D // VG))[None, :]
        v = vq * tl.load(vs_ptr + vgrp).to(tl.float32) + tl.load(vz_ptr + vgrp).to(tl.float32)
        if not OUT_BLOCK:
            for o in tl.static_range(OUT_V * VG):
                oi = tl.load(voi_ptr + (bh * T + t) * (OUT_V * VG) + o).to(tl.int32) + (o // OUT_V) * (
                    D // VG
                )
                ov = tl.load(vov_ptr + (bh * T + t) * (OUT_V * VG) + o).to(tl.float32)
                v += tl.where(d[None, :] == oi[:, None], ov[:, None], 0.0)
        p16 = p.to(tl.float16)
        acc += tl.dot(p16, v.to(tl.float16))
        if OUT_BLOCK:
            acc += _value_outlier_acc(p16, voi_ptr, vov_ptr, bh, OUT_V, OUT_PAD, t, d, T, D, G_PAD)
        for r in tl.static_range(RANK_V):  # (P·A)·Bᵀ
            vb = tl.load(vb_ptr + (bh * D + d) * RANK_V + r).to(tl.float32)
            va = tl.load(va_ptr + (bh * T + t) * RANK_V + r).to(tl.float32)
            if INT8_FACTORS:
                vb = vb * tl.load(vbs_ptr + bh * RANK_V + r).to(tl.float32)
                va = va * tl.load(vas_ptr + bh * RANK_V + r).to(tl.float32)
            pa = tl.sum(p * va[None, :], 1)
            acc += pa[:, None] * vb[None, :]

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
        tl.store(o_ptr, acc / l_i[:, None], mask=gmask[:, None])
    else:
        row = (b * H + h) * SPLITS + split
        tl.store(part_m_ptr + row * G_PAD + g, m_i)
        tl.store(part_l_ptr + row * G_PAD + g, l_i)
        tl.store(part_acc_ptr + (row * G_PAD + g)[:, None] * D + d[None, :], acc)


@triton.jit
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
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
    SINK: tl.constexpr,
    SPLITS: tl.constexpr,
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
        OUT_BLOCK,
        OUT_PAD,
        SINK,
        SPLITS,
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
    OUT_BLOCK: tl.constexpr,
    OUT_PAD: tl.constexpr,
):
    """TensorRT AOT entry: parameters in QDP order (inputs, int32 extra args, output), one split,
    grid (batch, KV heads, 1). The partial-result pointers are never touched with SPLITS == 1.
    No sink inputs: the plugin serves caches built with `sink_tokens=0` (SINK = 0 here)."""
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
        kt_ptr,  # no sink slots: the TensorRT plugin serves caches without sink tokens
        vt_ptr,
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
        OUT_BLOCK,
        OUT_PAD,
        0,
        1,
    )


@triton.jit
def gear_reduce_kernel(
    part_m_ptr,
    part_l_ptr,
    part_acc_ptr,
    out_ptr,
    H: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    for sp in range(SPLITS):
        m = tl.maximum(m, tl.load(part_m_ptr + ((b * H + h) * SPLITS + sp) * G_PAD + g))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_tot = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for sp in range(SPLITS):
        row = (b * H + h) * SPLITS + sp
        w = tl.exp2(tl.load(part_m_ptr + row * G_PAD + g) - m_safe)
        l_tot += w * tl.load(part_l_ptr + row * G_PAD + g)
        acc += w[:, None] * tl.load(part_acc_ptr + (row * G_PAD + g)[:, None] * D + d[None, :])
    qh = h * GROUP + g
    tl.store(
        out_ptr + (b * H * GROUP + qh)[:, None] * D + d[None, :],
        acc / l_tot[:, None],
        mask=(g < GROUP)[:, None],
    )


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
    if HAS_EXCLUDE:
        ex = tl.load(exclude_ptr + row * G + i) != 0
        lo = tl.min(tl.where(ex, float("inf"), x), 0)
        hi = tl.max(tl.where(ex, float("-inf"), x), 0)
    else:
        lo = tl.min(x, 0)
        hi = tl.max(x, 0)
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


def default_splits(max_blocks: int, batch_heads: int, target_programs: int = 264) -> int:
    """Enough splits that batch x heads x splits fills the GPU (~2 waves on 132 SMs), >= 2 blocks each;
    a power of two, so few kernel variants get compiled."""
    want = max(1, min(target_programs // max(batch_heads, 1), max_blocks // 2 or 1, 64))
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
):
    """Launch the fused decode attention; same contract as `reference.gear_attention_reference`."""
    import torch

    bsz, hq, dim = q.shape
    h = k_tail.shape[1]
    group = hq // h
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    max_blocks = block_table.shape[1]
    splits = splits or default_splits(max_blocks, bsz * h)  # a shape: no device sync, graph-capturable
    out = torch.empty(bsz, hq, dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(bsz * h * splits * g_pad, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(bsz * h * splits * g_pad * dim, dtype=torch.float32, device=q.device)
    vg = dim // layout.group if dim % layout.group == 0 else 1
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
        scale,
        max_blocks,
        H=h,
        GROUP=group,
        G_PAD=g_pad,
        D=dim,
        T=layout.block,
        VG=vg,
        BITS=layout.bits,
        OUT_K=layout.outliers[0],
        OUT_V=layout.outliers[1],
        RANK_K=layout.rank[0],
        RANK_V=layout.rank[1],
        INT8_FACTORS=layout.int8_factors,
        OUT_BLOCK=layout.outlier_scope == "block",
        OUT_PAD=max(16, triton.next_power_of_2(max(layout.outliers))),
        SINK=layout.sink,
        SPLITS=splits,
    )
    if splits > 1:
        gear_reduce_kernel[(bsz, h)](
            part_m, part_l, part_acc, out, H=h, GROUP=group, G_PAD=g_pad, D=dim, SPLITS=splits
        )
    return out


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
