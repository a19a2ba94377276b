"""Decode attention of a whole batch in a fixed number of torch ops, batch-invariant.

A decode step's tokens (one per sequence) attend to their committed tokens (the cache as it reproduces
them: decompressed blocks, the fp16 tail, sink rows) and to their own exact K/V. Per sequence that is a
few small ops (a scratch, its copies, one SDPA); on a GPU their launches, not the arithmetic, are the
step's cost (an H100 profile of the runtime at 32 requests: per-sequence SDPA, scratch and cache-write
calls took most of the step). Here every sequence's keys and values are laid out as whole
`block_size`-token blocks of one padded `(B, NB, 2, H, block, D)` tensor and attended in block form:

    s = q·Kᵀ per block (one bmm over all blocks), masked past each sequence's length;
    m = max over blocks, tokens and the own score;  p = exp(s - m);
    l = Σ_blocks Σ_tokens p + exp(s_own - m);  out = (Σ_blocks p·V + exp(s_own - m)·v_own) / l.

Batch invariance (a sequence's numbers must not depend on which others share its step, the
runtime's rule for greedy outputs; see linear.py) holds because every reduction has a fixed shape or
order: the bmm's per-block products (a fixed (G, block) x (block, D) problem per batch item), the
token sums over exactly `block` entries, the block sums as a sequential `cumsum` (padding blocks add
exact zeros at the end). SDPA over padded keys is not invariant (its kernels change with the padded
length), and a bmm over D + 1 columns was not either, so l is summed separately. `probe_invariance`
checks this on the device at start; where it fails the runtime keeps the per-sequence path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeBatch:
    """A step's batched decode tokens: the same for every layer, so built once per step."""

    works: list[int]  # indices into the step's works
    rows: torch.Tensor  # (B,) rows of the step's token matrix
    starts: list[int]  # committed tokens per sequence
    tail_block: torch.Tensor  # (B,) index of the block the fp16 tail fills
    slots: torch.Tensor  # (B,) tail slot per sequence
    valid: torch.Tensor  # (B, NB, block) committed-token mask

    @property
    def size(self) -> int:
        return len(self.works)

    @property
    def num_blocks(self) -> int:
        return self.valid.shape[1]


def decode_batch(
    works: list[int], rows: list[int], starts: list[int], slots: torch.Tensor, block: int, device
) -> DecodeBatch:
    n_full = torch.tensor([s // block for s in starts], dtype=torch.long)
    nb = int(n_full.max()) + 1  # the tail's block included (possibly empty)
    positions = torch.arange(nb * block).view(nb, block)
    valid = positions[None] < torch.tensor(starts)[:, None, None]
    as_device = lambda x: x.to(device)  # noqa: E731
    rows_t = torch.tensor(rows, dtype=torch.long)
    return DecodeBatch(
        works, as_device(rows_t), list(starts), as_device(n_full), as_device(slots), as_device(valid)
    )


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


def batched_decode_attention(
    q: torch.Tensor,
    kv_blocks: torch.Tensor,
    valid: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q `(B, Hq, D)`, kv_blocks `(B, NB, 2, H, block, D)` float32, valid `(B, NB, block)`, the tokens'
    own K/V `(B, H, D)` -> `(B, Hq, D)` float32 (query head j reads KV head j // (Hq / H))."""
    bsz, nb, _, h, block, dim = kv_blocks.shape
    hq = q.shape[1]
    g = hq // h
    qg = q.float().view(bsz, h, g, dim)
    q_rows = qg[:, None].expand(bsz, nb, h, g, dim).reshape(-1, g, dim)
    keys = kv_blocks[:, :, 0].reshape(-1, block, dim)
    s = torch.bmm(q_rows, keys.transpose(1, 2)).view(bsz, nb, h, g, block) * scale
    s = s.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    s_own = (qg * k_own.float()[:, :, None]).sum(-1) * scale  # (B, H, G)
    m = torch.maximum(s.amax(dim=(1, 4)), s_own)
    p = torch.exp(s - m[:, None, :, :, None])
    w_own = torch.exp(s_own - m)
    total = p.sum(-1).cumsum(1)[:, -1] + w_own  # sequential over blocks: padding adds exact zeros last
    values = kv_blocks[:, :, 1].reshape(-1, block, dim)
    acc = torch.bmm(p.reshape(-1, g, block), values).view(bsz, nb, h, g, dim).cumsum(1)[:, -1]
    out = (acc + w_own[..., None] * v_own.float()[:, :, None]) / total[..., None]
    return out.view(bsz, hq, dim)


def probe_invariance(device: torch.device, heads: int, q_heads: int, dim: int, block: int) -> bool:
    """Whether `batched_decode_attention` gives every sequence the same bits alone as in a padded batch,
    on this device and for these shapes (random data, lengths straddling blocks)."""
    gen = torch.Generator().manual_seed(0)
    checked = [1, block - 1, block, 3 * block + 5, 7 * block + block // 2]
    starts = checked + torch.randint(1, 16 * block, (27,), generator=gen).tolist()  # a 32-sequence step
    nb = max(s // block for s in starts) + 2  # one all-padding block more than needed
    bsz = len(starts)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    q, kv = rand(bsz, q_heads, dim), rand(bsz, nb, 2, heads, block, dim)
    k_own, v_own = rand(bsz, heads, dim), rand(bsz, heads, dim)
    valid = (torch.arange(nb * block).view(nb, block)[None] < torch.tensor(starts)[:, None, None]).to(device)
    scale = dim**-0.5
    batch = batched_decode_attention(q, kv, valid, k_own, v_own, scale)
    for i, start in enumerate(checked):
        own = start // block + 1
        one = batched_decode_attention(
            q[i : i + 1],
            kv[i : i + 1, :own],
            valid[i : i + 1, :own],
            k_own[i : i + 1],
            v_own[i : i + 1],
            dim**-0.5,
        )
        if not torch.equal(one, batch[i : i + 1]):
            return False
    return True
