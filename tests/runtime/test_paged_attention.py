"""The paged fp16 decode kernel (`runtime/paged_attention.py`, interpreted on CPU): attention and its
softmax normaliser over each sequence's committed tokens as the cache reproduces them (blocks, fp16
tail, sink rows from the sink slot), for GQA and lengths that end anywhere in a block; and a
sequence's bits alone equal its bits in any batch (batch invariance by construction)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported

from trtcompress.kv import get_codec
from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.paged_attention import paged_fp16_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK, HEADS, DIM = 16, 2, 32
LENGTHS = [1, 5, BLOCK, BLOCK + 1, 2 * BLOCK + 7, 3 * BLOCK]


def _cache(sink: int) -> PagedKVCache:
    cache = PagedKVCache(get_codec("fp16"), 1, HEADS, DIM, 24, BLOCK, len(LENGTHS), DEVICE, sink)
    gen = torch.Generator().manual_seed(sink)
    for s, n in enumerate(LENGTHS):
        cache.add_sequence(s)
        cache.reserve(s, n)
        cache.write(0, s, *torch.randn(2, HEADS, n, DIM, generator=gen).to(DEVICE))
        cache.commit(s, n)
    return cache


def _attend(cache: PagedKVCache, seq_ids: list[int], q: torch.Tensor):
    table, lengths = cache.block_table(seq_ids)
    full = lengths // BLOCK
    sinks = {}
    if cache.sink_tokens:
        sinks = {"k_sink": cache.sinks["k"][0], "v_sink": cache.sinks["v"][0]}
    k_pool, v_pool = cache.pools["k"]["data"][0], cache.pools["v"]["data"][0]
    return paged_fp16_decode(
        q, k_pool, v_pool, cache.tails["k"][0], cache.tails["v"][0], table, full, lengths - full * BLOCK,
        cache.tail_slots(seq_ids), DIM**-0.5, **sinks,
    )  # fmt: skip


@pytest.mark.parametrize(("sink", "q_heads"), [(0, 6), (1, 2), (2, 4)])
def test_matches_attention_over_the_gathered_cache(sink: int, q_heads: int) -> None:
    cache = _cache(sink)
    ids = list(range(len(LENGTHS)))
    q = torch.randn(len(ids), q_heads, DIM, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, lse = _attend(cache, ids, q)
    g = q_heads // HEADS
    for s in ids:
        keys, values = (x.repeat_interleave(g, 0) for x in cache.gather(0, s))  # sink rows included
        scores = (q[s][:, None] @ keys.transpose(1, 2))[:, 0] * DIM**-0.5
        want = (torch.softmax(scores, -1)[:, None] @ values)[:, 0]
        torch.testing.assert_close(out[s], want, rtol=0, atol=2e-6)
        torch.testing.assert_close(lse[s], torch.logsumexp(scores, -1), rtol=0, atol=2e-6)


def test_a_sequence_gets_the_same_bits_in_any_batch() -> None:
    cache = _cache(1)
    ids = list(range(len(LENGTHS)))
    q = torch.randn(len(ids), 4, DIM, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, lse = _attend(cache, ids, q)
    for s in ids:
        one, one_lse = _attend(cache, [s], q[s : s + 1])
        assert torch.equal(one[0], out[s]) and torch.equal(one_lse[0], lse[s])
    order = ids[::-1]
    shuffled, _ = _attend(cache, order, q[order])
    assert torch.equal(shuffled, out[order])


def test_shapes_the_kernel_cannot_tile_are_refused() -> None:
    cache = PagedKVCache(get_codec("fp16"), 1, HEADS, 24, 4, BLOCK, 1, DEVICE)  # head dim 24
    with pytest.raises(ValueError, match="power-of-two D"):
        paged_fp16_decode(torch.zeros(1, 2, 24), cache.pools["k"]["data"][0], cache.pools["v"]["data"][0],
                          cache.tails["k"][0], cache.tails["v"][0], torch.zeros(1, 1), torch.zeros(1),
                          torch.ones(1), torch.zeros(1), 1.0)  # fmt: skip
