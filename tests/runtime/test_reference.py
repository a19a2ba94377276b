"""The runtime against the uncompressed-path references: HF `generate` (greedy, lossless) on the real
SmolLM2-135M, and `trtcompress.kv.decode.CachedDecoder` (the evaluation's decoder) with a GEAR cache."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_loud
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


def _tiny_model(model_type: str, **config) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return make_loud(
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **config})).eval()
    )


def _deploy(max_seq_len: int) -> DeployConfig:
    return DeployConfig(
        max_batch_size=2, max_num_tokens=32, context_chunk_size=16, max_seq_len=max_seq_len,
        max_tokens_in_paged_kv_cache=256,
    )  # fmt: skip


def _assert_greedy_matches_hf(model, tokenizer, max_seq_len: int, prompt_len: int, new: int) -> None:
    engine = Engine(model, tokenizer, _deploy(max_seq_len), block_size=16)
    prompt = torch.randint(1, 512, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    out = engine.generate([prompt], SamplingParams(max_tokens=new, end_id=-1))[0]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert out.token_ids == ref[0, prompt_len:].tolist()


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_sliding_window_shorter_than_the_context_is_refused(tiny_model, model_type):
    """The runtime attends to every committed token: a model whose attention sees only the last
    `sliding_window` tokens is refused when a sequence could outgrow the window (Mistral's attention
    reads the window from the config, where the runtime did not look: it served it, silently wrong), and
    served where it cannot (then the window changes nothing)."""
    window = {"sliding_window": 16}
    if model_type == "qwen2":
        window |= {"use_sliding_window": True, "max_window_layers": 0}
    model = _tiny_model(model_type, **window)
    with pytest.raises(NotImplementedError, match=r"sliding window of 16 tokens.*max_seq_len <= 16"):
        Engine(model, tiny_model.tokenizer, _deploy(64), block_size=16)
    _assert_greedy_matches_hf(model, tiny_model.tokenizer, 16, 7, 9)


def test_eval_kv_refuses_a_context_past_the_sliding_window():
    """`eval --kv` decodes with the same full-attention cache: a Mistral window was ignored there too."""
    from trtcompress.kv import get_codec
    from trtcompress.kv.decode import CachedDecoder, cache_for_model

    model = _tiny_model("mistral", sliding_window=16)
    cache = cache_for_model(model, get_codec("fp16"), 64, max_seqs=1, block_size=16)
    with pytest.raises(NotImplementedError, match=r"sliding window of 16 tokens.*context of at most 16"):
        CachedDecoder(model, cache, context=32)
    dec = CachedDecoder(model, cache, context=16)
    ids = torch.randint(1, 512, (16,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(dec.logits(dec.prefill(0, ids)), ref, atol=2e-3, rtol=0)


def test_longrope_is_served_only_within_its_original_length(tiny_model):
    """LongRoPE switches every token of a forward call to the long factors once the call's longest
    position passes original_max_position_embeddings: a cached sequence (and a batch mixing short and
    long sequences) cannot follow that, so the runtime refuses a context beyond it (it gave logits 2e-2
    off the model's forward) and matches the model within it."""
    rope = {
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
        "original_max_position_embeddings": 32,
    }  # fmt: skip
    model = _tiny_model("llama", rope_scaling=rope)
    with pytest.raises(NotImplementedError, match=r"'longrope' .* max_seq_len <= 32"):
        Engine(model, tiny_model.tokenizer, _deploy(64), block_size=16)
    _assert_greedy_matches_hf(model, tiny_model.tokenizer, 32, 10, 22)


def test_an_engine_leaves_a_bf16_model_as_it_was(tiny_model):
    """The runtime computes in float32 from its own copies: building an engine must not turn the model's
    bf16 norms into float32 in place (the model's own forward then failed on a dtype mismatch)."""
    from trtcompress.builders.compress import cast_dense

    model = tiny_model.model
    cast_dense(model, torch.bfloat16)
    ids = torch.randint(1, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    engine = Engine(model, tiny_model.tokenizer, _deploy(64), block_size=16)
    out = engine.generate([ids[0].tolist()], SamplingParams(max_tokens=4, end_id=-1))[0]
    assert len(out.token_ids) == 4
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
