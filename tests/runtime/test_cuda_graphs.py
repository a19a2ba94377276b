"""All-decode steps through `DecodeGraphs` (the CUDA-graph path), run eagerly on CPU (`capture=False`:
the same static step, the paged fp16 kernel or the fused GEAR kernel interpreted): the same logits as
`BatchedModel.forward` step after step, padding rows included, across block boundaries (compressed
blocks filled during graph steps included); the cache writes it splits off
(`write_token_tails` + `finish_token_writes`) equal `write_tokens`; configuration errors."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported

from tests.runtime.test_fused_decode import _model, run_steps
from trtcompress.kv import get_codec
from trtcompress.kv.decode import cache_for_model
from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.config import DeployConfig
from trtcompress.runtime.cuda_graphs import DecodeGraphs, batch_buckets
from trtcompress.runtime.model import BatchedModel


def _run(graphs: bool, monkeypatch, codec: str = "fp16") -> tuple[list[torch.Tensor], int]:
    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")  # the fused (paged / GEAR kernel) path on CPU
    model = _model()
    cache = cache_for_model(model, get_codec(codec), 256, 3, 64, 1)  # 2 sequences + the padding slot
    runtime = BatchedModel(model, cache, 16)
    pad_slot = cache.take_slot()
    if graphs:  # one bucket of 4: every all-decode step carries 2 or 3 padding rows
        runtime.graphs = DecodeGraphs(runtime, pad_slot, (4,), max_blocks=4, capture=False)
    return run_steps(runtime, cache), runtime.graphs.replays if graphs else 0


@pytest.mark.parametrize("codec", ["fp16", "gear-2bit"])
def test_graph_steps_give_the_forward_logits(monkeypatch, codec) -> None:
    """gear-2bit: the fused GEAR kernel reads compressed blocks; the blocks that fill during graph steps
    are compressed after the replay, the eager path compresses them layer by layer: same logits."""
    want, _ = _run(False, monkeypatch, codec)
    got, replays = _run(True, monkeypatch, codec)
    assert replays >= 60  # most steps were all-decode steps of the static path
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_tail_writes_then_finish_equal_write_tokens() -> None:
    """A sink token (position 1 of 2 sink tokens) and a token that fills its block, for two layers."""
    gen = torch.Generator().manual_seed(0)

    def cache_with_sequences() -> PagedKVCache:
        cache = PagedKVCache(
            get_codec("fp16"), 2, 2, 16, num_blocks=8, block_size=16, max_seqs=2, sink_tokens=2
        )
        for seq_id, length in ((0, 1), (1, 15)):
            cache.add_sequence(seq_id)
            cache.reserve(seq_id, length + 1)
            cache.commit(seq_id, length)
        return cache

    k = torch.randn(2, 2, 2, 16, generator=gen)  # (layer, row, H, D)
    v = torch.randn(2, 2, 2, 16, generator=gen)
    a, b = cache_with_sequences(), cache_with_sequences()
    writes_a, writes_b = a.token_writes([0, 1]), b.token_writes([0, 1])
    assert writes_a.sinks and writes_a.full  # both cases are exercised
    for layer in range(2):
        a.write_tokens(layer, writes_a, k[layer], v[layer])
        b.write_token_tails(layer, writes_b.slots, writes_b.offsets, k[layer], v[layer])
    b.finish_token_writes(writes_b)
    for kind in ("k", "v"):
        assert torch.equal(a.tails[kind], b.tails[kind]) and torch.equal(a.sinks[kind], b.sinks[kind])
        assert all(torch.equal(a.pools[kind][n], b.pools[kind][n]) for n in a.pools[kind])


def test_buckets_and_configuration_errors(monkeypatch) -> None:
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32) and batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(1) == (1,)
    with pytest.raises(ValueError, match="cuda_graphs needs device: cuda"):
        DeployConfig(cuda_graphs=True)
    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    model = _model()
    int8 = BatchedModel(model, cache_for_model(model, get_codec("int8"), 128, 2, 64, 0), 16)
    with pytest.raises(ValueError, match="a KV cache one of them reads"):  # no fused kernel reads int8
        DecodeGraphs(int8, 1, (1,), 2, capture=False)
    gear = BatchedModel(model, cache_for_model(model, get_codec("gear-2bit"), 256, 2, 128, 0), 16)
    with pytest.raises(ValueError, match="blocks of one key group"):  # blocks of 128, groups of 64
        DecodeGraphs(gear, 1, (1,), 2, capture=False)
    fp16 = BatchedModel(model, cache_for_model(model, get_codec("fp16"), 128, 2, 64, 0), 16)
    with pytest.raises(ValueError, match="need a CUDA device"):
        DecodeGraphs(fp16, 1, (1,), 2, capture=True)
    cache = fp16.cache
    assert {cache.take_slot(), cache.take_slot()} == {0, 1}
    with pytest.raises(Exception, match="no free tail slot"):
        cache.take_slot()
