"""Decode attention straight from an fp16 paged cache: one OpenAI Triton launch per layer.

The GPU counterpart of `decode_attention.py` for the fp16 codec. One program per (sequence, KV head)
walks the sequence's blocks in order (block table), then its fp16 tail, with an online softmax; the
GQA group's query heads share each block's loads. A program reads only its own sequence and always
visits its blocks in the same order with the same arithmetic, so a sequence's result does not depend
on the batch: batch invariance holds by construction, where `torch.bmm` on an H100 broke it (cuBLAS
picks its kernel by batch count, so the batched torch path is probed and kept off there). Products
are fp32 FMA (`input_precision="ieee"`: no TF32, the fp16 keys and values are exact in fp32).

Like the fused GEAR kernel (`fused_attention.py`), it returns the attention over the committed tokens
with its softmax normaliser lse, and the caller merges the token's own exact K/V. Sink tokens: the
codec compressed block 0 with its sink rows replaced, so those rows are read from the sink slot.
Tested on CPU under `TRITON_INTERPRET=1` against `batched_decode_attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _attend_rows(q, k, v, valid, m, denom, acc):
    """One online-softmax update of the query rows `q` (GP, D) over keys / values (BS, D), `valid` (BS,)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (GP, BS)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: no -inf - -inf = NaN
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, denom, acc


# W (the block table's width) grows with the longest sequence: left unspecialized, so a serving run does
# not recompile the kernel when it leaves 1 or reaches a multiple of 16 (as the GEAR kernel)
@triton.jit(do_not_specialize=["W"])
def paged_fp16_decode_kernel(
    q_ptr,  # (B, H * G, D) float32, pre-scaled
    k_pool,  # (blocks, H, BS, D) fp16: one layer's pool
    v_pool,
    k_tail,  # (slots, H, BS, D) fp16
    v_tail,
    k_sink,  # (slots, H, SINK, D) fp16 (any tensor when SINK == 0)
    v_sink,
    table_ptr,  # (B, W) int32 block ids
    nblk_ptr,  # (B,) int32 full blocks per sequence
    tail_ptr,  # (B,) int32 committed tokens in the tail
    slot_ptr,  # (B,) int32 tail slot per sequence
    out_ptr,  # (B, H * G, D) float32
    lse_ptr,  # (B, H * G) float32
    W,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    SINK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    gi = tl.arange(0, GP)
    di = tl.arange(0, D)
    ti = tl.arange(0, BS)
    rows = (b * H + h) * G + gi
    q = tl.load(q_ptr + rows[:, None] * D + di[None, :], mask=(gi < G)[:, None], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    denom = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    nblk = tl.load(nblk_ptr + b)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    tile = ti[:, None] * D + di[None, :]
    all_rows = ti >= 0
    for j in range(0, nblk):
        blk = tl.load(table_ptr + b * W + j).to(tl.int64)
        base = (blk * H + h) * BS * D
        k = tl.load(k_pool + base + tile).to(tl.float32)
        v = tl.load(v_pool + base + tile).to(tl.float32)
        if SINK > 0:  # block 0's sink rows: exact, from the sink slot
            sink = (ti < SINK) & (j == 0)
            at = ((slot * H + h) * SINK + ti[:, None]) * D + di[None, :]
            k = tl.where(sink[:, None], tl.load(k_sink + at, mask=sink[:, None], other=0.0).to(tl.float32), k)
            v = tl.where(sink[:, None], tl.load(v_sink + at, mask=sink[:, None], other=0.0).to(tl.float32), v)
        m, denom, acc = _attend_rows(q, k, v, all_rows, m, denom, acc)
    tail = tl.load(tail_ptr + b)
    base = (slot * H + h) * BS * D
    k = tl.load(k_tail + base + tile).to(tl.float32)
    v = tl.load(v_tail + base + tile).to(tl.float32)
    m, denom, acc = _attend_rows(q, k, v, ti < tail, m, denom, acc)
    # a sequence with no committed token (never a decode step) has denom 0: output 0, lse -inf, so the
    # caller's merge gives the token's own value
    safe = tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + rows[:, None] * D + di[None, :], acc / safe[:, None], mask=(gi < G)[:, None])
    tl.store(lse_ptr + rows, m + tl.log(safe), mask=gi < G)


def paged_fp16_decode(q, k_pool, v_pool, k_tail, v_tail, block_table, num_blocks, tail_lens, slots, scale,
                      k_sink=None, v_sink=None, num_warps: int = 4):  # fmt: skip
    """q `(B, Hq, D)`; pools `(blocks, H, BS, D)` and tails `(slots, H, BS, D)` fp16 (one layer);
    block_table `(B, W)`, num_blocks / tail_lens / slots `(B,)` (int) -> out `(B, Hq, D)` float32 over
    the committed tokens and lse `(B, Hq)` (natural log of Σ exp(scale·q·k))."""
    import torch

    bsz, hq, dim = q.shape
    heads, block = k_pool.shape[1], k_pool.shape[2]
    if hq % heads or dim & (dim - 1) or block & (block - 1) or dim < 16 or block < 16:
        raise ValueError(
            f"paged fp16 decode needs Hq % H == 0 and power-of-two D, block >= 16: {q.shape}, {k_pool.shape}"
        )
    g = hq // heads
    sink = 0 if k_sink is None else k_sink.shape[2]
    out = torch.empty(bsz, hq, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(bsz, hq, device=q.device, dtype=torch.float32)
    if bsz == 0:
        return out, lse
    as_int = lambda t: t.to(q.device, torch.int32).contiguous()  # noqa: E731
    table = as_int(block_table)
    paged_fp16_decode_kernel[(bsz, heads)](
        (q.float() * scale).contiguous(), k_pool, v_pool, k_tail, v_tail,
        k_tail if k_sink is None else k_sink, v_tail if v_sink is None else v_sink,
        table, as_int(num_blocks), as_int(tail_lens), as_int(slots), out, lse, table.shape[1],
        H=heads, G=g, GP=max(16, triton.next_power_of_2(g)), BS=block, D=dim, SINK=sink, num_warps=num_warps,
    )  # fmt: skip
    return out, lse
