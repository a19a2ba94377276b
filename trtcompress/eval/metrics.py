"""Metrics, as plain functions of a model and token ids.

- perplexity over fixed, non-overlapping windows (each window scored from its own first token);
- answer fidelity on worked problems: per-token KL(p_ref || p_model) and top-1 agreement against the
  reference model on the gold answer tokens, and gold-answer bits per byte;
- greedy exact match of the final number, for models able to solve the problems.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from trtcompress.errors import RecipeError
from trtcompress.eval.datasets import Problem

Tick = Callable[[int], None]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _span_logits(model: nn.Module, ids: torch.Tensor, spans: list[slice]) -> list[torch.Tensor]:
    """Logits at the given positions of each row only: the LM head runs on the answer tokens alone."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    return [head(hidden[row, span]).float() for row, span in enumerate(spans)]


def exp_nll(nll: float) -> float:
    """exp of a mean NLL; inf past float range, so a broken model fails its ppl gates instead of
    crashing the build with OverflowError (math.exp overflows beyond ~709.8 nats)."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@dataclass
class PerplexityResult:
    ppl: float
    window_nll: list[float]  # mean NLL per window
    tokens: int


def check_context(context: int, model: nn.Module) -> None:
    """Refuse a perplexity window longer than the model's positions (past the trained range the ppl is
    meaningless)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and context > positions:
        raise RecipeError(
            f"eval.context {context} exceeds the model's {positions} positions (max_position_embeddings)"
        )


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: Sequence[int], context: int, tick: Tick | None = None
) -> PerplexityResult:
    if len(ids) < context:
        raise ValueError(f"perplexity needs at least one window of {context} tokens, got {len(ids)}")
    check_context(context, model)
    n_windows = len(ids) // context
    total, count, per_window = 0.0, 0, []
    for w in range(n_windows):
        x = torch.tensor([ids[w * context : (w + 1) * context]])
        logits = _logits(model, x)[0, :-1]
        nll = nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        per_window.append(nll / (context - 1))
        total += nll
        count += context - 1
        if tick:
            tick(1)
    return PerplexityResult(ppl=exp_nll(total / count), window_nll=per_window, tokens=count)


@dataclass
class FidelityResult:
    bpb: float  # gold-answer bits per byte of the evaluated model
    bpb_ref: float | None = None
    kl: float | None = None  # mean per-token KL(p_ref || p_model), nats
    top1: float | None = None  # fraction of answer tokens where both models' argmax agree
    tokens: int = 0
    per_problem_kl: list[float] = field(default_factory=list)


def encode_problem(tokenizer, problem: Problem) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt as the tokenizer encodes a text (BOS where it adds one), the
    answer, which continues it, without special tokens (a BOS there would sit mid-sequence and be
    scored as an answer token).

    The answer is the tail of the whole text's encoding, not the completion encoded on its own: a
    SentencePiece tokenizer (Llama-2, Mistral) prepends its dummy-prefix "▁" to a text, so " a" alone
    encodes as ["▁", "▁a"] and the model would read (and be scored on) a spurious double space."""
    plain_prompt = tokenizer(problem.prompt, add_special_tokens=False).input_ids
    whole = tokenizer(problem.prompt + problem.completion, add_special_tokens=False).input_ids
    if whole[: len(plain_prompt)] == plain_prompt and len(whole) > len(plain_prompt):
        answer = whole[len(plain_prompt) :]
    else:  # a token merged across the boundary: encode the answer alone
        answer = tokenizer(problem.completion, add_special_tokens=False).input_ids
    return tokenizer(problem.prompt).input_ids, answer


class FidelityAccumulator:
    """Sums the answer-token metrics problem by problem; `result` turns them into a FidelityResult.

    Shared by the one-shot harness (answer_fidelity) and the compressed-KV decoder (kv.evaluate).
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.nbytes = sum(len(p.completion.encode("utf-8")) for p in problems)
        self.nll = self.nll_ref = self.kl_sum = 0.0
        self.agree = self.tokens = 0
        self.per_problem_kl = [0.0] * len(problems)
        self.has_reference = False

    def add(self, i: int, logp: torch.Tensor, target: torch.Tensor, logp_ref: torch.Tensor | None) -> None:
        """Problem `i`: log-probs (answer tokens x vocab) of the model and, if given, of the reference."""
        self.nll -= logp.gather(-1, target[:, None]).sum().item()
        self.tokens += len(target)
        if logp_ref is not None:
            self.has_reference = True
            self.nll_ref -= logp_ref.gather(-1, target[:, None]).sum().item()
            p_ref = logp_ref.exp()  # a token the reference rules out (p 0, logp -inf) adds 0, not NaN
            kl = torch.where(p_ref > 0, p_ref * (logp_ref - logp), 0.0).sum(-1)
            self.kl_sum += kl.sum().item()
            self.per_problem_kl[i] = kl.mean().item()
            self.agree += (logp.argmax(-1) == logp_ref.argmax(-1)).sum().item()

    def result(self) -> FidelityResult:
        to_bpb = 1.0 / (math.log(2) * self.nbytes)
        if not self.has_reference:
            return FidelityResult(bpb=self.nll * to_bpb, tokens=self.tokens)
        return FidelityResult(
            bpb=self.nll * to_bpb,
            bpb_ref=self.nll_ref * to_bpb,
            kl=self.kl_sum / self.tokens,
            top1=self.agree / self.tokens,
            tokens=self.tokens,
            per_problem_kl=self.per_problem_kl,
        )


@torch.no_grad()
def answer_fidelity(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    reference: nn.Module | None = None,
    batch_size: int = 4,
    tick: Tick | None = None,
) -> FidelityResult:
    """Score the gold answers of `problems` with `model` (and against `reference` if given)."""
    encoded = [encode_problem(tokenizer, p) for p in problems]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    totals = FidelityAccumulator(problems)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in batch]
        width = max(map(len, seqs))
        # Right padding: with causal attention, padding after a sequence cannot change its logits.
        x = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        # Positions that predict the answer tokens.
        spans = [slice(len(encoded[i][0]) - 1, len(encoded[i][0]) - 1 + len(encoded[i][1])) for i in batch]
        logits = _span_logits(model, x, spans)
        logits_ref = _span_logits(reference, x, spans) if reference is not None else None
        for row, i in enumerate(batch):
            n_prompt, n_answer = len(encoded[i][0]), len(encoded[i][1])
            target = x[row, n_prompt : n_prompt + n_answer]
            logp = torch.log_softmax(logits[row], -1)
            logp_ref = torch.log_softmax(logits_ref[row], -1) if logits_ref is not None else None
            totals.add(i, logp, target, logp_ref)
        if tick:
            tick(len(batch))
    return totals.result()


# A minus sign only where it cannot be a hyphen or a subtraction: "12-4" holds 12 and 4, not -4. It may
# precede a dollar sign: "-$5" is -5, as "$-5" is.
_NUMBER = re.compile(r"(?:(?<![\w.])-\$?)?[\d,]*\.?\d+")


def extract_final_number(text: str) -> str | None:
    """The number a completion commits to: after '####' or 'answer is', else the last number."""
    for marker in ("####", "answer is"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            found = _NUMBER.findall(text)
            return _normalise(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _normalise(found[-1]) if found else None


def _normalise(number: str) -> str:
    number = number.replace(",", "").replace("$", "").rstrip(".")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    if digits.startswith("."):  # ".5" is 0.5
        digits = f"0{digits}"
    return digits if digits == "0" else sign + digits  # "-0" is 0


STOP_STRINGS = ("\n\n", "Question:")


@torch.no_grad()
def greedy_exact_match(
    model: nn.Module,
    tokenizer,
    problems: Sequence[Problem],
    max_new_tokens: int = 256,
    tick: Tick | None = None,
) -> float:
    """Fraction of problems whose greedy few-shot completion ends with the gold final number."""
    correct = 0
    for problem in problems:
        prompt = problem.fewshot_prompt or problem.prompt
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stop_strings=list(STOP_STRINGS),
            tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in STOP_STRINGS:
            completion = completion.split(stop)[0]
        correct += int(extract_final_number(completion) == _normalise(problem.final))
        if tick:
            tick(1)
    return correct / max(len(problems), 1)
