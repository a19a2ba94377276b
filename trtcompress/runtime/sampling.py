"""Sampling parameters, their validation, and the sampler.

Greedy is `temperature == 0` (the default): argmax, first index on ties. Otherwise the logits are
divided by the temperature, filtered by top-k then top-p (nucleus), and one token is drawn with the
request's own `torch.Generator` seeded from `seed`, so a seeded request gives the same tokens whatever
else is in the batch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch


class RequestError(ValueError):
    """A request the runtime refuses (the message is sent back to the client as the error)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (not included in the output)
    end_id: int | None = None  # None = the EOS ids of the tokenizer and model; -1 = never stop on a token
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise RequestError naming the first invalid field."""
        if not _whole(self.max_tokens) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _number(self.temperature) or not math.isfinite(self.temperature):
            raise RequestError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _whole(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _number(self.top_p) or not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # the LLM-API model's sampling_param_seed is a UINT64: the whole range is a seed
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed < 2**64):
            raise RequestError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple | list):
            raise RequestError(f"stop must be a list of strings, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")
        if self.end_id is not None and (not _whole(self.end_id) or self.end_id < -1):
            raise RequestError(f"end_id must be a token id, or -1 for none, got {self.end_id!r}")
        if not isinstance(self.ignore_eos, bool):  # "false" is truthy: it would ignore the EOS
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(value: object) -> bool:
    """A real number that is not a bool (temperature=True is a mistake, not a temperature of 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: object) -> bool:
    """An integer that is not a bool (True is an int to Python, not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A per-request generator; unseeded requests draw their seed from torch's global RNG."""
    gen = torch.Generator()
    gen.manual_seed(_mt_seed(seed) if seed is not None else int(torch.randint(0, 2**32, (1,)).item()))
    return gen


def _mt_seed(seed: int) -> int:
    """The seed torch's CPU generator gets. Its mt19937 keeps only the low 32 bits of a seed, so seeds
    that differ above them (5 and 5 + 2**32) drew the same tokens: larger seeds are hashed to 32 bits
    (seeds below 2**32 are used as they are, so their tokens do not change)."""
    if seed < 2**32:
        return seed
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p exclude from a 1-D logits row: the distribution of HF's
    TopKLogitsWarper then TopPLogitsWarper (ties at the k-th logit all kept, as there)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # HF's TopPLogitsWarper, operation for operation: ascending sort, drop the tokens whose cumulative
        # mass is <= 1 - top_p, the top token always kept. Of tokens tied at the boundary the later ids
        # stay, as in HF (this sampler kept the earlier ones, from a descending sort: another distribution);
        # a stable sort, since torch's default one may order ties arbitrarily (on CPU it does at 1,000
        # elements, HF's sort included: its choice among ties is then arbitrary, this one is fixed)
        sorted_logits, order = torch.sort(logits, descending=False, stable=True)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[-1] = False  # (a top_p below float32's range makes 1 - top_p = 1: only the top stays)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled (temperature > 0) request draws from, for a 1-D logits row: HF
    `generate`'s TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper in that order, softmaxed."""
    # shifted so that the top logit is 0 before dividing: any temperature > 0, however small,
    # then gives finite probabilities (the others go to -inf or stay very negative)
    # (one below float32's range became 0 in the division, 0 / 0 = NaN, and failed the whole step:
    # raised to float32's smallest normal number, which leaves only the top logits finite all the same)
    temperature = max(params.temperature, torch.finfo(torch.float32).smallest_normal)
    scaled = (logits - logits.max()) / temperature
    return filter_logits(scaled, params.top_k, params.top_p).softmax(-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """One token per row of `logits` (B, vocab) float32."""
    out = torch.argmax(logits, dim=-1).tolist()  # greedy rows (argmax returns the first maximum)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        out[row] = int(torch.multinomial(probabilities(logits[row], p), 1, generator=gen).item())
    return out
