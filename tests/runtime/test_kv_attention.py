"""The runtime's attention straight from the paged compressed cache (no per-sequence decompressed view).

On the tiny random LLaMA (4 query heads over 2 KV heads: GQA; head_dim 24), two sequences run in the
same ragged steps (prompt chunks, then one teacher-forced token per step) across several 64-token
blocks, ending in a partially filled block. Their logits are compared with `CachedDecoder` driven
through the same chunks, decompressing the whole cache at every step (`reuse_decompressed=False`): the
semantics the runtime's old per-sequence view implemented. Both decode the same codec blocks, so only
float rounding separates them (different GEMM paths: the runtime's batch-invariant tiles vs the HF
modules). The bounded decompressed-block cache must change nothing, bit for bit.
"""

from __future__ import annotations

import functools

import pytest
import torch

from trtcompress.kv import get_codec
from trtcompress.kv.decode import CachedDecoder, cache_for_model
from trtcompress.runtime.model import BatchedModel
from trtcompress.runtime.sampling import SamplingParams
from trtcompress.runtime.scheduler import Work
from trtcompress.runtime.sequence import Sequence, TextStream

BLOCK, CHUNK, CAP = 64, 48, 256  # prompt chunks cross block boundaries
LENGTHS = ((100, 200), (30, 140))  # (prompt, total) per sequence: 3 and 2 full blocks, partial last block
# Logits of the tiny model are O(1) (max |logit| about 2); the two GEMM paths differ by a few 1e-6. A
# lossy codec can turn such a difference of its input into a different code for one element (seen:
# 7.5e-5 with int8), hence a looser bound there. The codec itself moves the logits by far more than
# that (checked below, so the comparison cannot pass with the cache bypassed).
ATOL = {"fp16": 2e-5, "int8": 2e-4, "fp8": 3e-4, "kivi-2bit": 3e-4, "gear-2bit": 3e-4}


def _tokens() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, 512, (total,), generator=g).tolist() for _, total in LENGTHS]


def _runtime_logits(
    tiny_model_dir, codec: str, sink: int, budget: int, scratch: int = CAP, batched: bool = True,
    decode_scratch: int = 64 << 20,
) -> tuple[list, BatchedModel]:  # fmt: skip
    """Logits after every token of both sequences (prompt: at its end only), from BatchedModel; decode
    tokens through the batched decode attention (`batched`, in batches of `decode_scratch` bytes) or
    the per-sequence scratch + SDPA."""
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    cache = cache_for_model(loaded.model, get_codec(codec), CAP, 2, BLOCK, sink)
    model = BatchedModel(
        loaded.model, cache, 16, decompressed_cache_bytes=budget, scratch_tokens=scratch,
        decode_scratch_bytes=decode_scratch,
    )  # fmt: skip
    assert model.batched_decode  # the probe finds it batch-invariant on CPU
    model.batched_decode = batched
    seqs = []
    for i, ((prompt, _), toks) in enumerate(zip(LENGTHS, _tokens(), strict=True)):
        seqs.append(
            Sequence(i, str(i), toks[:prompt], SamplingParams(), TextStream(loaded.tokenizer, ()), None,
                     frozenset(), CAP)
        )  # fmt: skip
        cache.add_sequence(i)
    logits: list[list[torch.Tensor]] = [[], []]
    peak = 0
    while any(s.num_computed < total for s, (_, total) in zip(seqs, LENGTHS, strict=True)):
        work = []
        for s, (_, total) in zip(seqs, LENGTHS, strict=True):
            if s.num_computed < total:
                n = min(CHUNK, s.prompt_len - s.num_computed) if s.num_computed < s.prompt_len else 1
                work.append(Work(s, s.num_computed, n))
        for w in work:
            cache.reserve(w.seq.seq_id, w.n)
        out = model.forward(work)
        peak = max(peak, model.decompressed_bytes)
        sampled = [w for w in work if w.samples]
        for w, row in zip(sampled, out, strict=True):
            logits[w.seq.seq_id].append(row)
        for w in work:
            w.seq.num_computed += w.n
            toks = _tokens()[w.seq.seq_id]
            if w.samples and len(w.seq.tokens) < len(toks):
                w.seq.tokens.append(toks[len(w.seq.tokens)])  # teacher forcing
    assert peak <= budget
    return [torch.stack(rows) for rows in logits], model


@functools.cache
def _decoder_logits(tiny_model_dir, codec: str, sink: int) -> list[torch.Tensor]:
    from trtcompress.models import load_model

    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    out = []
    for i, ((prompt, total), toks) in enumerate(zip(LENGTHS, _tokens(), strict=True)):
        cache = cache_for_model(loaded.model, get_codec(codec), CAP, 1, BLOCK, sink)
        dec = CachedDecoder(loaded.model, cache, reuse_decompressed=False)
        ids = torch.tensor(toks)
        for a in range(0, prompt, CHUNK):  # the runtime's prompt chunks
            hidden = dec.prefill(i, ids[a : min(a + CHUNK, prompt)])
        rows = [dec.logits(hidden[-1:])[0]]
        for t in range(prompt, total):
            rows.append(dec.logits(dec.decode([i], ids[t : t + 1]))[0])
        out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize(
    ("codec", "sink", "batched"),
    [
        ("fp16", 0, True), ("int8", 0, True), ("fp8", 1, True), ("kivi-2bit", 0, True),
        ("gear-2bit", 0, True), ("gear-2bit", 1, True), ("fp16", 0, False), ("gear-2bit", 1, False),
    ],
)  # fmt: skip
def test_attention_from_compressed_blocks_matches_cached_decoder(tiny_model_dir, codec, sink, batched):
    got, _ = _runtime_logits(tiny_model_dir, codec, sink, budget=0, batched=batched)
    want = _decoder_logits(tiny_model_dir, codec, sink)
    for g, w, (prompt, total) in zip(got, want, LENGTHS, strict=True):
        assert g.shape == w.shape == (total - prompt + 1, 512)
        torch.testing.assert_close(g, w, rtol=0, atol=ATOL[codec])
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    if codec != "fp16":  # the compressed blocks really were what the runtime attended to
        exact = _decoder_logits(tiny_model_dir, "fp16", 0)
        # (seen: int8 1.1e-3, fp8 4.9e-3, kivi-2bit 9.5e-2, gear-2bit 6.0e-2)
        assert max((g - e).abs().max().item() for g, e in zip(got, exact, strict=True)) > 4 * ATOL[codec]


@pytest.mark.parametrize("codec", ["fp16", "gear-2bit"])
def test_decompressed_block_cache_and_grouping_change_nothing(tiny_model_dir, codec):
    # everything: both sequences, both layers, every block read by a later step (the last step starts
    # at total - 1), K and V of 2 heads x 24 channels, float32: 24,576 bytes per block and layer
    everything = sum((total - 1) // BLOCK for _, total in LENGTHS) * 2 * 24_576
    none, _ = _runtime_logits(tiny_model_dir, codec, 1, budget=0)
    some, part = _runtime_logits(tiny_model_dir, codec, 1, budget=everything // 2)
    every, full = _runtime_logits(tiny_model_dir, codec, 1, budget=1 << 30)
    alone, _ = _runtime_logits(tiny_model_dir, codec, 1, budget=0, scratch=1)  # one sequence per codec call
    # batch invariance of the batched decode attention: one sequence per decode batch, same bits
    single, _ = _runtime_logits(tiny_model_dir, codec, 1, budget=everything // 2, decode_scratch=1)
    for a, b, c, d, e in zip(none, some, every, alone, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d) and torch.equal(a, e)
    if codec == "fp16":  # elementwise: decode steps decompress every block, only prompt chunks keep copies
        assert 0 < part.decompressed_bytes <= full.decompressed_bytes < everything
    else:
        assert 0 < part.decompressed_bytes <= everything // 2
        assert full.decompressed_bytes == everything == 245_760
    for seq_id in (0, 1):
        full.forget(seq_id)
    assert full.decompressed_bytes == 0 and not full.blocks.entries


def test_recipe_sink_tokens_reach_the_served_cache(tiny_loud_dir, tmp_path):
    """`serve` of an artifact whose recipe has a GEAR kv_cache uses the cache `eval --kv` uses:
    same codec, block size and exact fp16 sink tokens; greedy tokens equal CachedDecoder's."""
    from tests.runtime.conftest import write_artifact
    from trtcompress.checkpoints.native import load_artifact
    from trtcompress.recipe import load_recipe
    from trtcompress.runtime import Engine
    from trtcompress.runtime.config import DeployConfig

    recipe = tmp_path / "gear.yaml"
    recipe.write_text(
        "name: gear\npasses: []\nkv_cache: {codec: gear-2bit, block_size: 64, sink_tokens: 2}\n"
    )
    kv = load_recipe(str(recipe)).kv_cache
    artifact = write_artifact(tiny_loud_dir, tmp_path / "art", str(recipe))
    config = DeployConfig(
        max_batch_size=2,
        max_num_tokens=50,
        context_chunk_size=48,
        max_seq_len=CAP,
        kv_decompressed_cache_mb=0.1,
    )
    engine = Engine.from_path(artifact, config)
    assert engine.cache.sink_tokens == kv.sink_tokens == 2 and engine.cache.block_size == 64
    assert engine.cache.codec.describe() == kv.build_codec().describe()
    prompt = _tokens()[0][:100]
    out = engine.generate([prompt], SamplingParams(max_tokens=80, end_id=-1))[0]  # 3 blocks, 1 tail
    steps = list(engine.steps)  # the cache's bytes after each step: 178 tokens, then freed
    assert (steps[-2].kv_bytes, steps[-1].kv_bytes) == (engine.cache.bytes_at(178), 0)
    assert 0 < max(s.decompressed_bytes for s in engine.steps) <= 0.1 * 2**20

    model = load_artifact(artifact).model
    dec = CachedDecoder(model, cache_for_model(model, kv.build_codec(), CAP, 1, 64, sink_tokens=2))
    ids = torch.tensor(prompt)
    for a in range(0, len(prompt), 48):
        hidden = dec.prefill(0, ids[a : a + 48])
    ref = [int(dec.logits(hidden[-1:])[0].argmax())]
    while len(ref) < 80:
        ref.append(int(dec.logits(dec.decode([0], torch.tensor(ref[-1:])))[0].argmax()))
    assert out.token_ids == ref
