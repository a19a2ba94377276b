"""The runtime against the uncompressed-path references: HF `generate` (greedy, lossless) on the real
SmolLM2-135M, and `trtcompress.kv.decode.CachedDecoder` (the evaluation's decoder) with a GEAR cache."""

from __future__ import annotations

import pytest
import torch

from trtcompress.runtime import Engine, SamplingParams
from trtcompress.runtime.config import DeployConfig

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16


@pytest.mark.model
def test_greedy_matches_hf_generate_on_smollm2(smollm2_dir):
    from trtcompress.models import load_model

    loaded = load_model(str(smollm2_dir), log=lambda m: None)
    model, tok = loaded.model, loaded.tokenizer
    config = DeployConfig(
        max_batch_size=4, max_num_tokens=132, max_seq_len=256, max_tokens_in_paged_kv_cache=1024
    )
    engine = Engine(model, tok, config)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS))
    assert max(s.batch_size for s in engine.steps) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
        assert out.token_ids == ref
        assert out.text == tok.decode(ref, skip_special_tokens=True)


def _cached_decoder_greedy(model, codec, prompt: list[int], n: int, block: int) -> list[int]:
    from trtcompress.kv.decode import CachedDecoder, cache_for_model

    dec = CachedDecoder(model, cache_for_model(model, codec, max_tokens=256, block_size=block))
    logits = dec.logits(dec.prefill(0, torch.tensor(prompt))[-1:])
    out = [int(logits[0].argmax())]
    while len(out) < n:
        out.append(int(dec.logits(dec.decode([0], torch.tensor(out[-1:])))[0].argmax()))
    return out


@pytest.mark.parametrize("codec_name", ["fp16", "gear-2bit"])
def test_kv_codec_matches_cached_decoder(tiny_int4_artifact, codec_name):
    from trtcompress.checkpoints.native import load_artifact
    from trtcompress.kv import get_codec

    loaded = load_artifact(tiny_int4_artifact)
    config = DeployConfig(max_batch_size=4, max_num_tokens=132, context_chunk_size=128, max_seq_len=256)
    engine = Engine(loaded.model, loaded.tokenizer, config, kv_codec=get_codec(codec_name), block_size=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (k,), generator=g).tolist() for k in (5, 70, 30)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=80, end_id=-1))  # crosses block boundaries
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _cached_decoder_greedy(loaded.model, get_codec(codec_name), prompt, 80, 64)


def test_int4_artifact_greedy_matches_hf_generate(tiny_int4_artifact):
    """The artifact's CompressedLinear model under HF `generate` (fp32 cache) is the reference path."""
    from trtcompress.checkpoints.native import load_artifact

    loaded = load_artifact(tiny_int4_artifact)
    config = DeployConfig(max_batch_size=4, max_num_tokens=132, context_chunk_size=128, max_seq_len=256)
    engine = Engine(loaded.model, loaded.tokenizer, config, block_size=16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (k,), generator=g).tolist() for k in (4, 19, 33)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, end_id=-1))
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = loaded.model.generate(
                torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out.token_ids == ref[0, len(prompt) :].tolist()
