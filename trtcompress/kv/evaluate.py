"""Generation-time evaluation with a compressed KV cache (`trtcompress eval --kv CODEC`).

Everything is decoded through `CachedDecoder`, for the evaluated model with the codec and for the
reference with an fp16 cache:
- perplexity: each protocol window is a one-token prompt followed by teacher-forced decoding of
  the rest (`extend`: token-by-token decode's arithmetic, up to summation order), so every token
  attends to the compressed blocks of all earlier complete blocks plus the fp16 tail of its own block;
- GSM8K / gsm_symbolic fidelity: the question is prefilled (exact attention inside the prompt, as
  a serving prefill), its full blocks compressed, then the gold answer is decoded token by token;
- KV bytes per token: what the cache holds (compressed blocks + fp16 tail and sink tokens) divided by the
  tokens held, averaged over the last block's worth of decoding steps of each perplexity window
  (so the tail's occupancy is averaged over its cycle, not caught empty at a block boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trtcompress.eval.datasets import Problem
from trtcompress.eval.metrics import (
    FidelityAccumulator,
    FidelityResult,
    PerplexityResult,
    encode_problem,
    exp_nll,
)
from trtcompress.kv.codec import KVCodec
from trtcompress.kv.decode import CachedDecoder, cache_for_model
from trtcompress.kv.scalar import FP16Codec

Tick = Callable[[int], None]


@dataclass
class KVPerplexity:
    result: PerplexityResult
    bytes_per_token: float  # at the window length, tail occupancy averaged over a block cycle
    bytes_per_token_mean: float  # time-average over the whole decode (sum of bytes / sum of tokens)
    fp16_bytes_per_token: int


@torch.no_grad()
def kv_perplexity(
    model: nn.Module,
    ids: Sequence[int],
    context: int,
    codec: KVCodec,
    block_size: int = 64,
    tick: Tick | None = None,
    sink_tokens: int = 0,
) -> KVPerplexity:
    n_windows = len(ids) // context
    windows = torch.tensor(ids[: n_windows * context]).view(n_windows, context)
    cache = cache_for_model(
        model, codec, context + block_size, max_seqs=n_windows, block_size=block_size, sink_tokens=sink_tokens
    )
    dec = CachedDecoder(model, cache, context)
    seqs = list(range(n_windows))
    hidden = [torch.stack([dec.prefill(s, windows[s, :1]) for s in seqs])]
    byte_sum = token_sum = 0.0
    last_cycle: list[float] = []
    done = 1
    while done < context:  # one block-aligned segment at a time, to sample the bytes as decoding goes
        take = min(block_size - done % block_size, context - done)
        hidden.append(dec.extend(seqs, windows[:, done : done + take]))
        for step in range(1, take + 1):  # bytes after each token of the segment (as if decoded one by one)
            held = done + step
            used = cache.bytes_at(held)
            byte_sum, token_sum = byte_sum + used, token_sum + held
            if held > context - block_size:
                last_cycle.append(used / held)
        done += take
    assert cache.bytes_used() == n_windows * used  # the sampled accounting is what the cache holds
    hidden_all = torch.cat(hidden, 1)
    total, per_window = 0.0, []
    for w in seqs:
        logits = dec.logits(hidden_all[w, :-1])
        nll = nn.functional.cross_entropy(logits, windows[w, 1:], reduction="sum").item()
        per_window.append(nll / (context - 1))
        total += nll
        if tick:
            tick(1)
    count = n_windows * (context - 1)
    return KVPerplexity(
        result=PerplexityResult(ppl=exp_nll(total / count), window_nll=per_window, tokens=count),
        bytes_per_token=sum(last_cycle) / len(last_cycle),
        bytes_per_token_mean=byte_sum / token_sum,
        fp16_bytes_per_token=cache.token_bytes_fp16,
    )


@torch.no_grad()
def answer_logits(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    codec: KVCodec,
    block_size: int = 64,
    sink_tokens: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per problem: (log-probs at the answer-predicting positions, gold answer ids)."""
    out = []
    for problem in problems:
        prompt, answer = encode_problem(tokenizer, problem)  # no BOS inside the sequence
        total = len(prompt) + len(answer)
        cache = cache_for_model(model, codec, total + block_size, 1, block_size, sink_tokens)
        dec = CachedDecoder(model, cache, total)
        first = dec.prefill(0, torch.tensor(prompt))[-1:]
        rest = dec.extend(0, torch.tensor(answer[:-1])) if len(answer) > 1 else first[:0]
        logits = dec.logits(torch.cat([first, rest]))
        out.append((torch.log_softmax(logits, -1), torch.tensor(answer)))
    return out


@torch.no_grad()
def kv_answer_fidelity(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    codec: KVCodec,
    reference: nn.Module | None,
    block_size: int = 64,
    tick: Tick | None = None,
    sink_tokens: int = 0,
) -> FidelityResult:
    """KL / top-1 / bpb of `model` decoding with `codec` against `reference` with an fp16 cache."""
    scored = answer_logits(model, tokenizer, problems, codec, block_size, sink_tokens)
    ref = (
        answer_logits(reference, tokenizer, problems, FP16Codec(), block_size, sink_tokens)
        if reference is not None
        else None
    )
    if tick:
        tick(len(problems))
    return fidelity_from_logits(problems, scored, ref)


def fidelity_from_logits(
    problems: Sequence[Problem],
    scored: list[tuple[torch.Tensor, torch.Tensor]],
    ref: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> FidelityResult:
    """The fidelity metrics from `answer_logits` outputs (the reference's may be computed once)."""
    totals = FidelityAccumulator(problems)
    for i, (logp, target) in enumerate(scored):
        totals.add(i, logp, target, ref[i][0] if ref is not None else None)
    return totals.result()


def _generation_eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The ids HF `generate` stops on (the plain path's `greedy_exact_match`): the generation config's
    EOS, which a chat model may list several of, else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, list | tuple) else {int(ids)}


@torch.no_grad()
def kv_greedy_exact_match(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    codec: KVCodec,
    max_new_tokens: int = 256,
    block_size: int = 64,
    tick: Tick | None = None,
    sink_tokens: int = 0,
) -> float:
    """Greedy few-shot generation decoding with the compressed cache; final-number exact match."""
    from trtcompress.eval.metrics import STOP_STRINGS, _normalise, extract_final_number

    correct = 0
    eos = _generation_eos_ids(model, tokenizer)
    for problem in problems:
        prompt = tokenizer(problem.fewshot_prompt or problem.prompt).input_ids
        cache = cache_for_model(
            model, codec, len(prompt) + max_new_tokens + block_size, 1, block_size, sink_tokens
        )
        dec = CachedDecoder(model, cache, len(prompt) + max_new_tokens)
        token = int(dec.logits(dec.prefill(0, torch.tensor(prompt))[-1]).argmax())
        generated: list[int] = []
        text = ""
        while len(generated) < max_new_tokens:
            generated.append(token)  # an EOS too, as HF generate keeps it (decoded unless special)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if token in eos or any(stop in text for stop in STOP_STRINGS):
                break
            token = int(dec.logits(dec.decode([0], torch.tensor([token]))[0]).argmax())
        for stop in STOP_STRINGS:
            text = text.split(stop)[0]
        correct += int(extract_final_number(text) == _normalise(problem.final))
        if tick:
            tick(1)
    return correct / max(len(problems), 1)
