"""Decode attention of a whole batch in a fixed number of torch ops, batch-invariant.

A decode step's tokens (one per sequence) attend to their committed tokens (the cache as it reproduces
them: decompressed blocks, the fp16 tail, sink rows) and to their own exact K/V. Per sequence that is a
few small ops (a scratch, its copies, one SDPA); on a GPU their launches, not the arithmetic, are the
step's cost (an H100 profile of the runtime at 32 requests: per-sequence SDPA, scratch and cache-write
calls took most of the step). Here every sequence's keys and values are laid out as whole
`block_size`-token blocks of one padded `(2, B, NB, H, block, D)` tensor and attended in block form:

    s = q·Kᵀ per block (one bmm over all blocks), masked outside each sequence's tokens;
    m = max over blocks and tokens;  p = exp(s - m);  out = Σ_blocks p·V / Σ_blocks Σ_tokens p.

The token's own exact K/V sits in its tail block right after the committed tail tokens (a tail holds
fewer than `block` tokens, so there is always room).

Batch invariance (a sequence's numbers must not depend on which others share its step, the
runtime's rule for greedy outputs; see linear.py) holds because every reduction has a fixed shape or
order: the bmm's per-block products (a fixed (G, block) x (block, D) problem per batch item), the
token sums over exactly `block` entries, the block sums as a sequential `cumsum` (padding blocks add
exact zeros at the end). SDPA over padded keys is not invariant (its kernels change with the padded
length), and a bmm over D + 1 columns was not either, so the softmax sum is taken separately. This
holds on CPU. On an H100 one bmm call is not invariant (cuBLAS's batched GEMM changes with the batch
count), so the products can also run as bmm calls of one fixed size (`bmm_calls_of`, the softmax sums
as products too); `invariant_bmm_calls` probes the device at start and the runtime keeps the
per-sequence path where neither holds (the fixed-size variant is untested on a GPU so far).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeBatch:
    """A step's batched decode tokens: the same for every layer, so built once per step. Each sequence's
    row of blocks is [its fp16 tail, its compressed blocks 0..n-1, padding]: the tail at a fixed place,
    so it goes in with one slice copy."""

    seq_ids: list[int]
    index: torch.Tensor  # (B,) 0..B-1: the batch row of each sequence
    rows: torch.Tensor | slice  # rows of the step's token matrix (a slice where they are consecutive)
    starts: list[int]  # committed tokens per sequence
    slots: torch.Tensor  # (B,) tail slot per sequence
    tail_lens: torch.Tensor  # (B,) committed tokens in the tail: the own token goes right after them
    masked: torch.Tensor  # (B, NB, block) positions that are neither committed tokens nor the own one
    ranges: list[tuple[int, int, int]]  # (seq_id, 0, full blocks): the compressed blocks to read
    block_dest: torch.Tensor  # (blocks,) flat (row * NB + 1 + j) place of each block of `ranges`
    # (B * (NB - 1),) physical block of every block place after the tail's, so an elementwise codec
    # fills every place with one gather, without zeroing; padding places repeat the row's own last
    # block (masked keys get weight exactly 0, and a row never reads another sequence's data, so one
    # sequence's overflow cannot reach another), or the batch's first block for the rows in
    # `empty_rows`, which are zeroed after the gather; None where the batch has no full block
    padded_blocks: torch.Tensor | None = None
    first_blocks: torch.Tensor | None = None  # (B,) bool: rows whose block 0 is compressed (sink rows)
    empty_rows: torch.Tensor | None = None  # rows without a compressed block (None: there are none)

    @property
    def size(self) -> int:
        return len(self.seq_ids)

    @property
    def num_blocks(self) -> int:
        return self.masked.shape[1]


def as_rows(rows: list[int], device) -> torch.Tensor | slice:
    """Row indices of a token matrix: a slice (a view, no gather) where they are consecutive."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


def decode_batch(
    seq_ids: list[int],
    rows: list[int],
    starts: list[int],
    slots: torch.Tensor,
    block: int,
    device,
    tables: list[list[int]] | None = None,
) -> DecodeBatch:
    """`tables`: each sequence's physical block ids (for `padded_blocks`)."""
    full = [s // block for s in starts]
    nb = max(full) + 1  # the tail's block first (possibly empty)
    tail = torch.tensor([s - n * block for s, n in zip(starts, full, strict=True)])
    position = torch.arange(block)
    masked = torch.ones(len(starts), nb, block, dtype=torch.bool)
    masked[:, 0] = position[None] > tail[:, None]  # the tail's tokens, then the token itself
    masked[:, 1:] = (torch.arange(nb - 1)[None] >= torch.tensor(full)[:, None])[:, :, None]
    dest = [row * nb + 1 + j for row, n in enumerate(full) for j in range(n)]
    ranges = [(seq_id, 0, n) for seq_id, n in zip(seq_ids, full, strict=True)]
    as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    padded = first = empty = None
    if tables is not None and nb > 1:
        filler = next(t[0] for t, n in zip(tables, full, strict=True) if n)
        padded = as_index(
            [
                t[min(j, n - 1)] if n else filler
                for t, n in zip(tables, full, strict=True)
                for j in range(nb - 1)
            ]
        )
        first = torch.tensor(full, device=device) > 0
        empty_rows = [row for row, n in enumerate(full) if not n]
        empty = as_index(empty_rows) if empty_rows else None
    return DecodeBatch(
        list(seq_ids), as_index(list(range(len(starts)))), as_rows(rows, device), list(starts),
        slots.to(device, torch.long), tail.to(device), masked.to(device), ranges, as_index(dest),
        padded, first, empty,
    )  # fmt: skip


def chunk_decode_works(starts: list[int], block: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ranges of decode works whose padded batch (works x blocks of the longest x block)
    holds at most `max_tokens` tokens (a single work may exceed it)."""
    ranges, first, longest = [], 0, 0
    for i, start in enumerate(starts):
        blocks = start // block + 1
        if i > first and (i - first + 1) * max(longest, blocks) * block > max_tokens:
            ranges.append((first, i))
            first, longest = i, 0
        longest = max(longest, blocks)
    return [*ranges, (first, len(starts))]


def _bmm(a: torch.Tensor, b: torch.Tensor, calls_of: int) -> torch.Tensor:
    """torch.bmm(a, b); with `calls_of` > 0 as bmm calls of exactly that many matrices (the last one
    zero-padded), so that a GEMM library that picks its kernel by batch count always picks the same."""
    if calls_of <= 0:
        return torch.bmm(a, b)
    n = a.shape[0]
    pad = -n % calls_of
    if pad:
        a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
        b = torch.cat([b, b.new_zeros(pad, *b.shape[1:])])
    return torch.cat(
        [torch.bmm(a[i : i + calls_of], b[i : i + calls_of]) for i in range(0, n + pad, calls_of)]
    )[:n]


def batched_decode_attention(
    q: torch.Tensor, kv_blocks: torch.Tensor, masked: torch.Tensor, scale: float, bmm_calls_of: int = 0
) -> torch.Tensor:
    """q `(B, Hq, D)`, kv_blocks `(2, B, NB, H, block, D)` float32 (K, V), masked `(B, NB, block)` (True:
    not a key of that sequence) -> `(B, Hq, D)` float32 (query head j reads KV head j // (Hq / H)).
    `bmm_calls_of` > 0: every matrix product (the softmax sums too) in bmm calls of that fixed size."""
    _, bsz, nb, h, block, dim = kv_blocks.shape
    hq = q.shape[1]
    g = hq // h
    q_rows = (q * scale).view(bsz, 1, h, g, dim).expand(bsz, nb, h, g, dim).reshape(-1, g, dim)
    keys = kv_blocks[0].reshape(-1, block, dim)  # a view: K and V are contiguous halves
    s = _bmm(q_rows, keys.transpose(1, 2), bmm_calls_of).view(bsz, nb, h, g, block)
    s = s.masked_fill_(masked[:, :, None, None, :], float("-inf"))  # in place: s is the bmm's own output
    p = s.sub_(s.amax(dim=(1, 4), keepdim=True)).exp_()
    if bmm_calls_of > 0:  # the token sums as products too: no reduction kernel chosen by tensor size
        ones = p.new_ones(1, block, 1).expand(p.numel() // (g * block), block, 1)
        sums = _bmm(p.view(-1, g, block), ones, bmm_calls_of).view(bsz, nb, h, g)
    else:
        sums = p.sum(-1)
    total = sums.cumsum(1)[:, -1]  # sequential over blocks: padding adds exact zeros last
    values = kv_blocks[1].reshape(-1, block, dim)
    acc = _bmm(p.view(-1, g, block), values, bmm_calls_of).view(bsz, nb, h, g, dim).cumsum(1)[:, -1]
    return (acc / total[..., None]).view(bsz, hq, dim)


#: `bmm_calls_of` values tried in order by `invariant_bmm_calls`: one bmm call (CPU), then fixed-size calls
BMM_CALL_SIZES = (0, 256)


@functools.cache
def invariant_bmm_calls(device: torch.device, heads: int, q_heads: int, dim: int, block: int) -> int | None:
    """The first `bmm_calls_of` of BMM_CALL_SIZES for which `probe_invariance` holds, None if none does."""
    for calls_of in BMM_CALL_SIZES:
        if probe_invariance(device, heads, q_heads, dim, block, calls_of):
            return calls_of
    return None


@functools.cache
def probe_invariance(
    device: torch.device, heads: int, q_heads: int, dim: int, block: int, bmm_calls_of: int = 0
) -> bool:
    """Whether `batched_decode_attention` gives a sequence the same bits alone as in padded batches of 5,
    9, 33 and 64 sequences, on this device and for these shapes (random data, lengths that end inside,
    at the end of and just past a block; one all-padding block more than needed). Once per process."""
    gen = torch.Generator().manual_seed(0)
    checked = [1, block - 1, block, 2 * block + 5, 3 * block + block // 2]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def attend(q, kv, starts):
        nb = kv.shape[2]
        masked = torch.arange(nb * block).view(nb, block)[None] >= torch.tensor(starts)[:, None, None]
        return batched_decode_attention(q, kv, masked.to(device), dim**-0.5, bmm_calls_of)

    q, kv = rand(len(checked), q_heads, dim), rand(2, len(checked), 4, heads, block, dim)
    alone = [attend(q[i : i + 1], kv[:, i : i + 1, : s // block + 1], [s]) for i, s in enumerate(checked)]
    for size in (5, 9, 33, 64):
        extra = size - len(checked)
        starts = checked + torch.randint(1, 4 * block, (extra,), generator=gen).tolist()
        pad = rand(2, extra, 5, heads, block, dim)
        batch_kv = torch.cat([torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, 0, 0, 1)), pad], 1)
        batch = attend(torch.cat([q, rand(extra, q_heads, dim)]), batch_kv, starts)
        if not all(torch.equal(one, batch[i : i + 1]) for i, one in enumerate(alone)):
            return False
    return True
