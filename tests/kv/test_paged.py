"""The paged compressed cache: allocation, byte accounting, block tables, sequences that come and go."""

from __future__ import annotations

import pytest
import torch

from trtcompress.errors import CompressionError
from trtcompress.kv import get_codec
from trtcompress.kv.paged import CacheFullError, PagedKVCache

H, D, BS = 2, 64, 64


def _cache(codec: str = "gear-2bit", blocks: int = 6, seqs: int = 3, layers: int = 2) -> PagedKVCache:
    return PagedKVCache(get_codec(codec), layers, H, D, num_blocks=blocks, block_size=BS, max_seqs=seqs)


def _append(cache: PagedKVCache, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
    cache.reserve(seq, k.shape[1])
    for layer in range(cache.num_layers):
        cache.write(layer, seq, k + layer, v - layer)
    cache.commit(seq, k.shape[1])


def test_allocated_bytes_match_the_tensors_and_the_codec() -> None:
    cache = _cache()
    codec = cache.codec
    per_block = sum(codec.block_bytes(kind, BS, D, H) for kind in ("k", "v")) * 2  # 2 layers
    assert cache.block_bytes == per_block
    tails = 2 * 2 * 3 * H * BS * D * 2  # K+V, layers, slots, fp16
    assert cache.bytes_allocated() == 6 * per_block + tails
    pool_bytes = sum(t.numel() * t.element_size() for pool in cache.pools.values() for t in pool.values())
    assert pool_bytes == 6 * per_block


def test_bytes_used_tracks_blocks_and_tail() -> None:
    cache = _cache()
    cache.add_sequence(7)
    assert cache.bytes_used() == 0
    _append(cache, 7, torch.randn(H, 50, D), torch.randn(H, 50, D))
    assert cache.seqs[7].blocks == []  # no full block yet
    assert cache.bytes_used(7) == 50 * cache.token_bytes_fp16
    _append(cache, 7, torch.randn(H, 100, D), torch.randn(H, 100, D))  # 150 tokens: 2 blocks + 22
    assert len(cache.seqs[7].blocks) == 2
    assert cache.bytes_used(7) == 2 * cache.block_bytes + 22 * cache.token_bytes_fp16
    assert cache.free_blocks == 4


def test_gather_returns_what_the_codec_reproduces() -> None:
    cache = _cache("fp16")
    cache.add_sequence(0)
    k, v = torch.randn(H, 130, D), torch.randn(H, 130, D)
    for chunk in (1, 63, 1, 64, 1):  # crosses block boundaries inside and at the edge of writes
        start = cache.seqs[0].length
        _append(cache, 0, k[:, start : start + chunk], v[:, start : start + chunk])
    for layer in range(2):
        kk, vv = cache.gather(layer, 0)
        torch.testing.assert_close(kk, (k + layer).half().float())
        torch.testing.assert_close(vv, (v - layer).half().float())


def test_gear_blocks_match_direct_compression() -> None:
    cache = _cache("gear-2bit")
    cache.add_sequence(0)
    k, v = torch.randn(H, 128, D), torch.randn(H, 128, D)
    _append(cache, 0, k, v)
    codec = cache.codec
    expect = codec.decompress(codec.compress(k.half().float()[:, 64:], "k"), "k", BS, D)
    got, _ = cache.gather(0, 0)
    torch.testing.assert_close(got[:, 64:], expect)


def test_sequences_are_isolated_and_freed() -> None:
    cache = _cache("kivi-4bit", blocks=4)
    data = {s: (torch.randn(H, 64 + 10 * s, D), torch.randn(H, 64 + 10 * s, D)) for s in (1, 2)}
    for s in (1, 2):
        cache.add_sequence(s)
    # interleave appends token by token-ish
    for start in range(0, 84, 7):
        for s, (k, v) in data.items():
            if start < k.shape[1]:
                _append(cache, s, k[:, start : start + 7], v[:, start : start + 7])
    for s, (k, _) in data.items():
        got, _ = cache.gather(0, s)
        assert got.shape == k.shape
        assert ((got - k).norm() / k.norm()) < 0.15
    table, lengths = cache.block_table([1, 2])
    assert lengths.tolist() == [74, 84] and table.shape == (2, 1)
    assert set(table.flatten().tolist()).isdisjoint({-1}) and table[0, 0] != table[1, 0]
    used = cache.free_blocks
    cache.free(1)
    assert cache.free_blocks == used + 1 and 1 not in cache.seqs
    cache.add_sequence(3)  # the freed slot and block are reusable
    _append(cache, 3, torch.randn(H, 64, D), torch.randn(H, 64, D))


def test_full_cache_fails_before_changing_anything() -> None:
    cache = _cache(blocks=2, seqs=2)
    cache.add_sequence(0)
    cache.add_sequence(1)
    _append(cache, 0, torch.randn(H, 100, D), torch.randn(H, 100, D))
    before = (list(cache.seqs[0].blocks), list(cache.seqs[1].blocks), cache.free_blocks)
    assert cache.can_reserve([0, 1], 27) and not cache.can_reserve([0, 1], 64)
    with pytest.raises(CacheFullError, match="need 2 blocks, 1 free"):
        cache.reserve([0, 1], 64)
    assert (cache.seqs[0].blocks, cache.seqs[1].blocks, cache.free_blocks) == before
    with pytest.raises(CacheFullError, match="slots"):
        cache.add_sequence(2)
    with pytest.raises(RuntimeError, match="reserve"):
        cache.write(0, 1, torch.randn(H, 70, D), torch.randn(H, 70, D))
    with pytest.raises(ValueError, match="already"):
        cache.add_sequence(0)


def test_sink_tokens_are_kept_exact_and_counted() -> None:
    cache = PagedKVCache(
        get_codec("kivi-2bit"), 2, H, D, num_blocks=4, block_size=BS, max_seqs=2, sink_tokens=2
    )
    cache.add_sequence(0)
    k, v = torch.randn(H, 150, D), torch.randn(H, 150, D)
    k[:, 0] *= 40  # a sink-like first token: kept out of block 0's quantization ranges
    _append(cache, 0, k[:, :30], v[:, :30])
    assert cache.bytes_used(0) == (30 + 2) * cache.token_bytes_fp16  # the sink slot holds them all along
    _append(cache, 0, k[:, 30:], v[:, 30:])
    assert (
        cache.bytes_used(0)
        == cache.bytes_at(150)
        == 2 * cache.block_bytes + (22 + 2) * cache.token_bytes_fp16
    )
    kg, vg = cache.gather(1, 0)
    torch.testing.assert_close(kg[:, :2], (k[:, :2] + 1).half().float(), rtol=0, atol=0)
    torch.testing.assert_close(vg[:, :2], (v[:, :2] - 1).half().float(), rtol=0, atol=0)
    plain = PagedKVCache(get_codec("kivi-2bit"), 2, H, D, num_blocks=4, block_size=BS, max_seqs=2)
    plain.add_sequence(0)
    _append(plain, 0, k, v)
    rest = slice(2, 64)  # block 0's other tokens no longer share their channel ranges with the sink
    err_sink = (kg[:, rest] - (k[:, rest] + 1)).square().mean()
    err_plain = (plain.gather(1, 0)[0][:, rest] - (k[:, rest] + 1)).square().mean()
    assert err_sink < 0.2 * err_plain
    sinks = 2 * 2 * 2 * H * 2 * D * 2  # K+V, layers, slots, sink tokens, fp16
    assert cache.bytes_allocated() == plain.bytes_allocated() + sinks
    with pytest.raises(ValueError, match="sink_tokens"):
        PagedKVCache(get_codec("fp16"), 1, H, D, num_blocks=1, block_size=BS, sink_tokens=BS)


def test_reserving_again_before_commit_allocates_nothing_twice() -> None:
    """A reservation not (fully) committed already holds its blocks: reserving again (or one sequence
    twice in a call) must neither count them as negative need nor pop from an empty free list."""
    cache = PagedKVCache(get_codec("kivi-2bit"), 1, 1, 64, num_blocks=3, max_seqs=2)
    cache.add_sequence(0)
    cache.add_sequence(1)
    cache.reserve(0, 128)  # two blocks for a step of 128 tokens, of which one is committed
    cache.commit(0, 1)
    cache.reserve([1, 1], 63)
    cache.commit(1, 63)
    assert cache.blocks_needed(0, 1) == 0 and cache.free_blocks == 1
    assert not cache.can_reserve([0, 1], 66)  # sequence 1 needs 2 blocks, 1 is free
    with pytest.raises(CacheFullError):
        cache.reserve([0, 1], 66)
    assert cache.free_blocks == 1 and len(cache.seqs[0].blocks) == 2 and not cache.seqs[1].blocks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_keys_or_values_are_refused_by_name(bad: float) -> None:
    cache = _cache()
    cache.add_sequence(0)
    k, v = torch.randn(2, 70, 64), torch.randn(2, 70, 64)
    v[1, 10, 7] = bad
    cache.reserve(0, 70)
    # a one-line CLI error (a TrtcompressError), not a traceback: `eval --kv` on a model whose keys
    # overflow fp16 printed a ValueError's traceback, which the CLI reserves for bugs
    with pytest.raises(CompressionError, match="non-finite values in layer 0, block 0"):
        cache.write(0, 0, k, v)
