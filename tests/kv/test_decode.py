"""Decoding with a compressed cache on the tiny random LLaMA: equal to HF with an fp16 cache, and
teacher-forced `extend` exactly equal to token-by-token `decode`."""

from __future__ import annotations

import pytest
import torch

from trtcompress.kv import get_codec
from trtcompress.kv.decode import CachedDecoder, cache_for_model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(seed))


def _decoder(model, codec: str = "gear-2bit", seqs: int = 2, tokens: int = 256, **kw) -> CachedDecoder:
    return CachedDecoder(model, cache_for_model(model, get_codec(codec, **kw), tokens, max_seqs=seqs))


def test_fp16_cache_matches_hf(tiny_model) -> None:
    model = tiny_model.model
    ids = _ids(150)
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=False).logits[0]
    dec = _decoder(model, "fp16")
    hidden = torch.cat([dec.prefill(0, ids[:20]), dec.extend(0, ids[20:140])])
    hidden = torch.cat([hidden, *(dec.decode([0], ids[i : i + 1]) for i in range(140, 150))])
    torch.testing.assert_close(dec.logits(hidden), ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    ("codec", "options", "atol"),
    [
        ("gear-2bit", {"scale_dtype": "fp16"}, 1e-3),
        ("kivi-2bit", {}, 1e-3),
        # fp8 group scales (gear-2bit's default) have 3 mantissa bits: a ~1e-4 difference in a group's
        # range can round its scale one fp8 step (6%) apart, which moves the logits by a few 1e-3
        ("gear-2bit", {}, 2e-2),
    ],
)
def test_extend_equals_token_by_token(tiny_model, codec: str, options: dict, atol: float) -> None:
    model = tiny_model.model
    ids = _ids(140, 1)
    a = _decoder(model, codec, **options)
    b = _decoder(model, codec, **options)
    ha = torch.cat([a.prefill(0, ids[:10]), a.extend(0, ids[10:])])
    hb = torch.cat([b.prefill(0, ids[:10]), *(b.decode([0], ids[i : i + 1]) for i in range(10, 140))])
    # Equal up to fp32 summation order (a 1-token and a 54-token matmul round differently; ~1e-4),
    # far below the effect of the compression itself (checked below).
    la, lb = a.logits(ha), b.logits(hb)
    torch.testing.assert_close(la, lb, atol=atol, rtol=0)
    assert a.cache.bytes_used() == b.cache.bytes_used()
    c = _decoder(model, "fp16")
    lc = c.logits(torch.cat([c.prefill(0, ids[:10]), c.extend(0, ids[10:])]))
    torch.testing.assert_close(la[:64], lc[:64], atol=1e-3, rtol=0)  # block 0 still in the fp16 tail
    assert (la[64:] - lc[64:]).abs().max() > 2e-2  # later tokens see block 0 compressed


def test_prefill_is_exact_whatever_the_codec(tiny_model) -> None:
    model = tiny_model.model
    ids = _ids(130, 2)
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=False).logits[0]
    dec = _decoder(model, "kivi-2bit")
    torch.testing.assert_close(dec.logits(dec.prefill(0, ids)), ref, atol=1e-3, rtol=0)
    assert len(dec.cache.seqs[0].blocks) == 2  # but what is stored is compressed


def test_batched_decode_equals_single(tiny_model) -> None:
    model = tiny_model.model
    p0, p1, gen = _ids(70, 3), _ids(33, 4), _ids(8, 5)
    batch = _decoder(model)
    batch.prefill(0, p0)
    batch.prefill(1, p1)
    out = torch.stack([batch.decode([0, 1], torch.stack([gen[i], gen[i]])) for i in range(8)], 1)
    for seq, prompt in ((0, p0), (1, p1)):
        single = _decoder(model, seqs=1)
        single.prefill(0, prompt)
        alone = torch.cat([single.decode([0], gen[i : i + 1]) for i in range(8)])
        torch.testing.assert_close(out[seq], alone, atol=1e-3, rtol=0)
    batch.cache.free(0)
    assert 0 not in batch.cache.seqs and batch.cache.free_blocks > 0


def test_compressed_linear_model_decodes(tiny_model) -> None:
    """A weight-compressed model (CompressedLinear modules) runs through the same decoder."""
    from trtcompress.builders.compress import compress_model
    from trtcompress.recipe import load_recipe

    model, tok = tiny_model.model, tiny_model.tokenizer
    compress_model(model, tok, load_recipe("int4-g128-rtn"), log=lambda m: None)
    ids = _ids(40, 6)
    with torch.no_grad():
        ref = model(input_ids=ids[None], use_cache=False).logits[0]
    dec = _decoder(model, "fp16")
    hidden = torch.cat([dec.prefill(0, ids[:5]), dec.extend(0, ids[5:])])
    torch.testing.assert_close(dec.logits(hidden), ref, atol=2e-3, rtol=0)


def test_reusing_decompressed_blocks_changes_nothing(tiny_model) -> None:
    model = tiny_model.model
    ids = _ids(200, 7)
    outs = []
    for reuse in (True, False):
        dec = CachedDecoder(
            model, cache_for_model(model, get_codec("gear-2bit"), 256), reuse_decompressed=reuse
        )
        outs.append(torch.cat([dec.prefill(0, ids[:70]), dec.extend(0, ids[70:])]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    dec.forget(0)
    assert 0 not in dec.cache.seqs


def test_extend_reads_a_segments_earlier_tokens_from_the_fp16_tail(tiny_model) -> None:
    """Token-by-token decoding reads the earlier tokens of the block being filled back from the cache's
    fp16 tail (only a token's own K/V is exact); `extend` attended to them in the model's float32, a
    ~1e-4 logit difference on this model (fp16 rounding), now down to fp32 summation order."""
    model = tiny_model.model
    ids = _ids(140, 0)
    a, b = _decoder(model, "fp16"), _decoder(model, "fp16")
    ha = torch.cat([a.prefill(0, ids[:1]), a.extend(0, ids[1:])])
    hb = torch.cat([b.prefill(0, ids[:1]), *(b.decode([0], ids[i : i + 1]) for i in range(1, 140))])
    torch.testing.assert_close(a.logits(ha), b.logits(hb), atol=4e-5, rtol=0)
    with torch.no_grad():  # the prefill still attends to its own exact K/V
        ref = model(input_ids=ids[None, :70], use_cache=False).logits[0]
    c = _decoder(model, "fp16")
    torch.testing.assert_close(c.logits(c.prefill(0, ids[:70])), ref, atol=1e-4, rtol=0)
