"""Decode tokens through the fused GEAR/KIVI kernel or the paged fp16 kernel (interpreted on CPU) in the
runtime: the same logits as the runtime's scratch + SDPA path over the same cache, step after step.

A small random LLaMA with a kernel-sized head (head dim 32, GQA 4/2), two sequences in the same ragged
steps: prompt chunks (scratch path), then one token per step per sequence (fused path when enabled),
across 64-token blocks and a partial last block, with the exact sink token."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported

from trtcompress.kv import get_codec
from trtcompress.kv.decode import cache_for_model
from trtcompress.runtime.model import BatchedModel
from trtcompress.runtime.sampling import SamplingParams
from trtcompress.runtime.scheduler import Work
from trtcompress.runtime.sequence import Sequence, TextStream

LENGTHS = ((70, 140), (20, 90))  # (prompt, total): decode steps cross block boundaries


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


class _Tokenizer:  # TextStream decodes generated ids; the step-level forward never uses its text
    def decode(self, ids, **kwargs) -> str:
        return ""


def _chunk(seq) -> int:
    """Prompt chunks of 48 tokens, then one token per step."""
    return min(48, seq.prompt_len - seq.num_computed) if seq.num_computed < seq.prompt_len else 1


def _logits(codec: str, fused: bool, monkeypatch, **options) -> tuple[list[torch.Tensor], bool]:
    if fused:
        monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    else:
        monkeypatch.delenv("TRTCOMPRESS_GEAR_TRITON", raising=False)
    model = _model()
    cache = cache_for_model(model, get_codec(codec, **options), 256, 2, 64, 1)
    runtime = BatchedModel(model, cache, 16)
    return run_steps(runtime, cache), runtime.fused_decode


def run_steps(runtime: BatchedModel, cache) -> list[torch.Tensor]:
    """LENGTHS' two sequences through `runtime.forward` in ragged steps (48-token prompt chunks, then one
    token per step, teacher-forced random tokens); the logits of every sampled token, per sequence."""
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(1, 256, (total,), generator=g).tolist() for _, total in LENGTHS]
    seqs = []
    for i, ((prompt, _), toks) in enumerate(zip(LENGTHS, tokens, strict=True)):
        seqs.append(Sequence(i, str(i), toks[:prompt], SamplingParams(), TextStream(_Tokenizer(), ()), None,
                             frozenset(), 256))  # fmt: skip
        cache.add_sequence(i)
    logits: list[list[torch.Tensor]] = [[], []]
    while any(s.num_computed < total for s, (_, total) in zip(seqs, LENGTHS, strict=True)):
        work = [
            Work(s, s.num_computed, _chunk(s))
            for s, (_, total) in zip(seqs, LENGTHS, strict=True)
            if s.num_computed < total
        ]
        for w in work:
            cache.reserve(w.seq.seq_id, w.n)
        out = runtime.forward(work)
        for w, row in zip([w for w in work if w.samples], out, strict=True):
            logits[w.seq.seq_id].append(row)
        for w in work:
            w.seq.num_computed += w.n
            if w.samples and len(w.seq.tokens) < len(tokens[w.seq.seq_id]):
                w.seq.tokens.append(tokens[w.seq.seq_id][len(w.seq.tokens)])  # teacher forcing
    return [torch.stack(rows) for rows in logits]


@pytest.mark.parametrize(
    ("codec", "options"),
    [
        ("gear-2bit", {"outlier_dtype": "fp16"}),
        ("gear-2bit", {}),  # fp8 outlier values
        ("gear-2bit", {"key_rank": 1, "factor_dtype": "int4"}),
        ("gear-2bit", {"scale_dtype": "fp8"}),
        ("kivi-2bit", {}),
        ("fp16", {}),
    ],
)
def test_fused_decode_matches_the_scratch_path(codec: str, options: dict, monkeypatch) -> None:
    want, fused_want = _logits(codec, False, monkeypatch, **options)
    got, fused_got = _logits(codec, True, monkeypatch, **options)
    assert fused_got and not fused_want  # the two runs really took different attention paths
    for g, w in zip(got, want, strict=True):
        # fp16 MMA operands in the GEAR/KIVI kernel vs float32 SDPA over the decompressed scratch: logits
        # of about 1 differ by up to 1.9e-3 after two layers (gear-2bit and kivi-2bit); leaving out the
        # token's own key and value (no merge) moves them by 3.7e-2. The fp16 kernel computes in fp32.
        atol = 1e-5 if codec == "fp16" else 5e-3
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
        # the same greedy token wherever the top two logits are further apart than twice that (this
        # random model has near ties: one step of the fp8-scale cache sits 1e-3 from one)
        top2 = w.topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * atol
        assert clear.float().mean() > 0.75 and torch.equal(g.argmax(-1)[clear], w.argmax(-1)[clear])


def test_fused_decode_is_not_used_where_the_kernel_cannot_read_the_cache(monkeypatch) -> None:
    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    from trtcompress.runtime.fused_attention import fused_decode_supported

    model = _model()
    for codec in ("gear-2bit", "fp16"):
        assert fused_decode_supported(cache_for_model(model, get_codec(codec), 128, 1, 64, 0))
    for codec in ("int8", "kivi-3bit"):  # neither packed 2/4-bit codes nor fp16
        assert not fused_decode_supported(cache_for_model(model, get_codec(codec), 128, 1, 64, 0))
    assert not fused_decode_supported(cache_for_model(model, get_codec("gear-2bit"), 128, 1, 128, 0))
    assert not fused_decode_supported(cache_for_model(model, get_codec("fp16"), 128, 1, 48, 0))
    fp8_outliers = get_codec("gear-2bit", outlier_dtype="fp8")  # one-byte corrections with block scales
    assert fused_decode_supported(cache_for_model(model, fp8_outliers, 128, 1, 64, 0))
    int4_factors = get_codec("gear-2bit", key_rank=1, factor_dtype="int4")  # low rank, two codes per byte
    assert fused_decode_supported(cache_for_model(model, int4_factors, 128, 1, 64, 0))
    fp8_scales = get_codec("gear-2bit", scale_dtype="fp8")  # fp8 group scales with block maxima
    assert fused_decode_supported(cache_for_model(model, fp8_scales, 128, 1, 64, 0))


@pytest.mark.parametrize("codec", ["kivi-2bit", "gear-2bit"])
def test_blocks_of_a_size_the_kernel_cannot_tile_take_the_torch_path(codec: str, monkeypatch) -> None:
    """A KIVI / GEAR group of 48 tokens (blocks of one group, as the fused kernel wants) is not a power
    of two: the kernel's token tile cannot hold it, and the runtime used it anyway, failing at the first
    decode step ("arange's range must be a power of 2"). Decode tokens now take the torch path."""
    from trtcompress.runtime.fused_attention import fused_decode_supported

    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    model = _model()
    assert fused_decode_supported(cache_for_model(model, get_codec(codec, group=32), 128, 1, 32, 0))
    cache = cache_for_model(model, get_codec(codec, group=48), 256, 2, 48, 1)
    assert not fused_decode_supported(cache)
    runtime = BatchedModel(model, cache, 16)
    assert not runtime.fused_decode
    logits = run_steps(runtime, cache)  # decode steps across 48-token blocks, a sink token
    assert [x.shape[0] for x in logits] == [total - prompt + 1 for prompt, total in LENGTHS]
    assert all(torch.isfinite(x).all() for x in logits)
