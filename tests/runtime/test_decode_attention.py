"""`batched_decode_attention` (decode_attention.py): equals exact attention over each sequence's keys,
for GQA and lengths that end anywhere in a block; gives every sequence the same bits alone as in a
padded batch of any size (the runtime's batch invariance); a step's block layout; batches are cut to a
token budget; and the paged cache's batched token writes equal per-sequence writes."""

from __future__ import annotations

import pytest
import torch

from trtcompress.kv import get_codec
from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.decode_attention import (
    batched_decode_attention,
    chunk_decode_works,
    decode_batch,
    invariant_bmm_calls,
    probe_invariance,
)

BLOCK = 16


def _case(lengths: list[int], heads: int, q_heads: int, dim: int, extra_blocks: int, seed: int):
    """Random blocks of sequences with `lengths` keys each (the first `length` positions of their row of
    blocks), `extra_blocks` all-padding blocks after the longest."""
    gen = torch.Generator().manual_seed(seed)
    nb = max((n - 1) // BLOCK + 1 for n in lengths) + extra_blocks
    q = torch.randn(len(lengths), q_heads, dim, generator=gen)
    kv = torch.randn(2, len(lengths), nb, heads, BLOCK, dim, generator=gen)
    masked = torch.arange(nb * BLOCK).view(nb, BLOCK)[None] >= torch.tensor(lengths)[:, None, None]
    return q, kv, masked


@pytest.mark.parametrize(("heads", "q_heads", "dim"), [(2, 6, 32), (1, 1, 16), (4, 8, 64)])
def test_matches_exact_attention(heads: int, q_heads: int, dim: int) -> None:
    lengths = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3, 5 * BLOCK]
    q, kv, masked = _case(lengths, heads, q_heads, dim, extra_blocks=1, seed=heads + dim)
    out = batched_decode_attention(q, kv, masked, dim**-0.5)
    g = q_heads // heads
    for i, n in enumerate(lengths):
        keys = kv[0, i].transpose(0, 1).reshape(heads, -1, dim)[:, :n].repeat_interleave(g, 0)  # (Hq, n, D)
        values = kv[1, i].transpose(0, 1).reshape(heads, -1, dim)[:, :n].repeat_interleave(g, 0)
        want = torch.softmax(q[i][:, None] @ keys.transpose(1, 2) * dim**-0.5, -1) @ values
        torch.testing.assert_close(out[i], want[:, 0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("seed", range(4))
def test_batch_invariant(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    bsz = int(torch.randint(2, 40, (), generator=gen))
    lengths = torch.randint(1, 30 * BLOCK, (bsz,), generator=gen).tolist()
    q, kv, masked = _case(lengths, 3, 9, 64, extra_blocks=seed % 3, seed=seed)
    batch = batched_decode_attention(q, kv, masked, 0.125)
    for i, n in enumerate(lengths):
        own = (n - 1) // BLOCK + 1  # only its own blocks
        one = batched_decode_attention(q[i : i + 1], kv[:, i : i + 1, :own], masked[i : i + 1, :own], 0.125)
        assert torch.equal(one, batch[i : i + 1])
    assert probe_invariance(torch.device("cpu"), 3, 9, 64, 64)


def test_decode_batch_layout() -> None:
    """Row of blocks = [tail + the token itself, compressed blocks, padding]; masks and destinations."""
    batch = decode_batch([7, 9], [0, 4], [BLOCK + 2, 0 * BLOCK + 5], torch.tensor([1, 0]), BLOCK, "cpu")
    assert batch.num_blocks == 2 and batch.tail_lens.tolist() == [2, 5]
    assert (~batch.masked[0, 0]).sum() == 3 and not batch.masked[
        0, 1
    ].any()  # 2 tail tokens + itself; block 0
    assert (~batch.masked[1, 0]).sum() == 6 and batch.masked[1, 1].all()
    assert batch.ranges == [(7, 0, 1), (9, 0, 0)] and batch.block_dest.tolist() == [1]
    assert batch.rows.tolist() == [0, 4]  # not consecutive: an index tensor
    assert batch.padded_blocks is None  # no block tables given (a codec that is not elementwise)
    # with block tables (elementwise codecs): every place after the tail's names a physical block,
    # padding places the row's own last block (rows without one: the batch's first, then zeroed);
    # consecutive rows are a slice (no gather)
    starts = [2 * BLOCK + 1, 3, BLOCK]
    batch = decode_batch(
        [1, 2, 3], [5, 6, 7], starts, torch.tensor([0, 1, 2]), BLOCK, "cpu", [[4, 8], [], [6]]
    )
    assert batch.rows == slice(5, 8) and batch.num_blocks == 3
    assert batch.padded_blocks.tolist() == [4, 8, 4, 4, 6, 6]  # own last block; row 1: zeroed later
    assert batch.first_blocks.tolist() == [True, False, True] and batch.empty_rows.tolist() == [1]


@pytest.mark.parametrize("codec", ["fp16", "int8", "gear-2bit"])
def test_decompress_blocks_into_equals_the_block_ranges(codec: str) -> None:
    """The padded gather of the elementwise path reproduces `decompress_block_ranges` bit for bit,
    written into a strided destination (repeats allowed)."""
    cache = PagedKVCache(get_codec(codec), 2, 2, 64, num_blocks=6, block_size=64, max_seqs=2)
    gen = torch.Generator().manual_seed(5)
    for s, n in enumerate([130, 64]):
        cache.add_sequence(s)
        cache.reserve(s, n)
        for layer in (0, 1):
            cache.write(layer, s, *torch.randn(2, 2, n, 64, generator=gen))
        cache.commit(s, n)
    ids = cache.seqs[0].blocks[:2] + cache.seqs[1].blocks[:1] + cache.seqs[0].blocks[:1]
    k_want, v_want = cache.decompress_block_ranges(1, [(0, 0, 2), (1, 0, 1), (0, 0, 1)])
    out = torch.full((2, 4, 2, 2, 64, 64), float("nan"))  # every other place of a wider layout
    cache.decompress_blocks_into(1, torch.tensor(ids), out[0, :, 0], out[1, :, 0])
    assert torch.equal(out[0, :, 0], k_want) and torch.equal(out[1, :, 0], v_want)
    assert out[:, :, 1].isnan().all()


def test_chunks_fit_the_token_budget() -> None:
    starts = [10, 100, 20, 300, 5, 5]  # blocks of 16: 1, 7, 2, 19, 1, 1
    assert chunk_decode_works(starts, BLOCK, 10**6) == [(0, 6)]
    assert chunk_decode_works(starts, BLOCK, 1) == [(i, i + 1) for i in range(6)]
    chunks = chunk_decode_works(starts, BLOCK, 2 * 7 * BLOCK)  # two works of up to 7 blocks
    assert chunks == [(0, 2), (2, 3), (3, 4), (4, 6)]
    for lo, hi in chunks:
        longest = max(s // BLOCK + 1 for s in starts[lo:hi])
        assert hi - lo == 1 or (hi - lo) * longest * BLOCK <= 2 * 7 * BLOCK


@pytest.mark.parametrize("sink", [0, 2])
def test_token_writes_equal_per_sequence_writes(sink: int) -> None:
    """Tails, sink slots and compressed blocks after batched one-token writes are those of `write`,
    bit for bit, across block boundaries (a tail filled mid-batch is compressed)."""
    gen = torch.Generator().manual_seed(sink)

    def cache():
        c = PagedKVCache(
            get_codec("kivi-2bit"), 2, 2, 64, num_blocks=8, block_size=64, max_seqs=3, sink_tokens=sink
        )
        for s, n in enumerate([0, 62, 63]):  # the third fills its first block at the second token
            c.add_sequence(s)
            c.reserve(s, n + 2)
            c.write(0, s, *torch.randn(2, 2, n, 64, generator=torch.Generator().manual_seed(s)))
            c.write(1, s, *torch.randn(2, 2, n, 64, generator=torch.Generator().manual_seed(s)))
            c.commit(s, n)
        return c

    one, batch = cache(), cache()
    for _ in range(2):
        k, v = torch.randn(2, 3, 2, 64, generator=gen)
        writes = batch.token_writes([0, 1, 2])
        for layer in (0, 1):
            batch.write_tokens(layer, writes, k, v)
            for s in range(3):
                one.write(layer, s, k[s][:, None], v[s][:, None])
        for s in range(3):
            one.commit(s, 1)
            batch.commit(s, 1)
    for kind in ("k", "v"):
        assert torch.equal(one.tails[kind], batch.tails[kind])
        assert torch.equal(one.sinks[kind], batch.sinks[kind])
        for name in one.pools[kind]:
            assert torch.equal(one.pools[kind][name], batch.pools[kind][name])
    short = PagedKVCache(get_codec("fp16"), 1, 2, 64, num_blocks=2, block_size=64, max_seqs=1)
    short.add_sequence(0)
    short.reserve(0, 63)  # no block yet: the 64th token would fill one
    short.commit(0, 63)
    with pytest.raises(RuntimeError, match="reserve"):
        short.token_writes([0])


@pytest.mark.parametrize("calls_of", [1, 7, 256])
def test_fixed_size_bmm_calls(calls_of: int) -> None:
    """The variant for GEMM libraries that pick kernels by batch count (`bmm_calls_of`): bmm calls of a
    fixed size, the last zero-padded, the softmax sums as products; the same attention, and
    batch-invariant too."""
    lengths = [1, BLOCK, BLOCK + 1, 3 * BLOCK + 7, 2]
    q, kv, masked = _case(lengths, 2, 6, 32, extra_blocks=1, seed=calls_of)
    plain = batched_decode_attention(q, kv, masked, 0.2)
    fixed = batched_decode_attention(q, kv, masked, 0.2, bmm_calls_of=calls_of)
    torch.testing.assert_close(fixed, plain, rtol=0, atol=2e-6)
    for i, n in enumerate(lengths):
        own = (n - 1) // BLOCK + 1
        one = batched_decode_attention(q[i : i + 1], kv[:, i : i + 1, :own], masked[i : i + 1, :own], 0.2,
                                       bmm_calls_of=calls_of)  # fmt: skip
        assert torch.equal(one, fixed[i : i + 1])
    assert probe_invariance(torch.device("cpu"), 2, 6, 32, BLOCK, calls_of)
    assert invariant_bmm_calls(torch.device("cpu"), 2, 6, 32, BLOCK) == 0  # one call is invariant on CPU
