"""The runtime serves an artifact's own compressed weights, whatever their format: greedy tokens of a batch
of concurrent requests equal the loaded artifact model's (`native.load_artifact`, CompressedLinear
forward, what `trtcompress eval ARTIFACT` scores), one preset per kind of weight (INT4 with zero points
and partial groups, NVFP4 block scales, a 2:4 mask over fp16 values, low-rank factors, W4A4 activation
quantization), and do not depend on the batch.

The tiny random model's layers are scaled up 5x first (`tiny_loud_dir`): as initialised (std 0.02, tied
embeddings) its greedy output repeats one token whatever its layers compute, so dropping a layer's
low-rank branch or activation quantizer in the runtime went unnoticed by token comparisons."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.conftest import write_artifact
from trtcompress.runtime import Engine, SamplingParams
from trtcompress.runtime.config import DeployConfig

NEW_TOKENS = 16
CALIBRATION = {"num_samples": 4, "seq_len": 64}


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _fp16_kv_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by the model's own forward over a cache holding K/V in fp16, as the runtime's
    fp16 cache does (the evaluation decoder, `trtcompress eval --kv fp16`)."""
    from trtcompress.kv import get_codec
    from trtcompress.kv.decode import CachedDecoder, cache_for_model

    dec = CachedDecoder(model, cache_for_model(model, get_codec("fp16"), max_tokens=256, block_size=16))
    with torch.no_grad():
        out = [int(dec.logits(dec.prefill(0, torch.tensor(prompt))[-1:])[0].argmax())]
        while len(out) < n:
            out.append(int(dec.logits(dec.decode([0], torch.tensor(out[-1:])))[0].argmax()))
    return out


@pytest.mark.parametrize(
    "preset", ["int4-g128-asym-rtn", "nvfp4", "sparse24-magnitude", "w3a16-gptq-eora32", "w4a4-minmax-fp4"]
)
def test_runtime_greedy_equals_the_artifact_model(tiny_loud_dir, tmp_path, preset):
    from trtcompress.checkpoints.native import load_artifact

    artifact = write_artifact(tiny_loud_dir, tmp_path / preset, preset, CALIBRATION)
    loaded = load_artifact(artifact)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 512, (k,), generator=g).tolist() for k in (5, 23, 70)]  # 70: two chunks
    config = DeployConfig(
        max_batch_size=3, max_num_tokens=67, context_chunk_size=64, max_seq_len=128,
        max_tokens_in_paged_kv_cache=1024,
    )  # fmt: skip
    params = SamplingParams(max_tokens=NEW_TOKENS, end_id=-1)
    engine = Engine(loaded.model, loaded.tokenizer, config, block_size=16)
    batched = [out.token_ids for out in engine.generate(prompts, params)]
    assert max(s.batch_size for s in engine.steps) == len(prompts)
    solo = Engine(loaded.model, loaded.tokenizer, config, block_size=16)
    assert batched == [solo.generate([p], params)[0].token_ids for p in prompts]
    w4a4 = any(m.state.act_quant is not None for m in loaded.model.modules() if hasattr(m, "state"))
    for prompt, tokens in zip(prompts, batched, strict=True):
        if w4a4:
            # Run-time activation quantization turns the fp16 cache's rounding of K/V (~5e-4) into
            # whole-code flips (logits ~5e-2 off an fp32 cache): the reference is the same forward over
            # fp16 K/V (the runtime matches it within 1e-6). The first token reads no cache.
            assert tokens[0] == _hf_greedy(loaded.model, prompt, 1)[0]
            assert tokens == _fp16_kv_greedy(loaded.model, prompt, NEW_TOKENS)
        else:
            assert tokens == _hf_greedy(loaded.model, prompt, NEW_TOKENS)
