"""A request inside the runtime: its token stream, what has been computed, its text and why it ended.

`tokens` = prompt + generated. `num_computed` tokens have their K/V in the cache; the next forward
feeds `tokens[num_computed:...]`. A preempted sequence (max_utilization) keeps its tokens, restarts with
`num_computed = 0`, and replays: its prompt in the same chunks as before, then its generated tokens
one per step without sampling, so it recomputes exactly the same cache and resumes where it stopped.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from trtcompress.runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one step produced for one request (streaming delta plus the running totals)."""

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str  # all text emitted so far
    token_ids: list[int]  # all generated tokens so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | None while running
    prompt_tokens: int


class TextStream:
    """Incremental detokenization with stop strings.

    Text is emitted only when it can no longer change: an incomplete UTF-8 sequence (decoded as
    U+FFFD at the end) and a suffix that could still become a stop string (the start of one) are held
    back. So emitted text never ends with the start of a stop string, and a stop string is always
    found past what was emitted.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0
        self.text = ""

    def _stop_prefix(self, text: str, end: int) -> int:
        """Length of the longest suffix of text[:end], past what was emitted, that starts a stop string
        (it used to hold back len(stop) - 1 characters whatever they were, delaying every delta)."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.emitted), longest, -1):
                if text.startswith(stop[:n], end - n):
                    longest = n
                    break
        return longest

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """New text to emit, and whether a stop string was found (text is then cut before it)."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        safe = len(text)
        if not final:  # an incomplete UTF-8 sequence at the end decodes as U+FFFD: it can still change
            while safe > self.emitted and text[safe - 1] == "\ufffd":
                safe -= 1
        # a stop string must lie in the settled text (one ending in U+FFFD matched a character that
        # was still being decoded)
        hit = min((i for i in (text.find(s, 0, safe) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            text, safe = text[:hit], hit
        elif not final:
            safe -= self._stop_prefix(text, safe)
        delta = text[self.emitted : safe]
        self.emitted = safe
        self.text = text[:safe]
        return delta, hit >= 0


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    generator: Any  # torch.Generator or None
    eos_ids: frozenset[int]
    max_len: int  # context bound: prompt + generated never exceeds it
    arrival: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(init=False)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    cancelled: bool = False
    admitted_step: int = -1  # step at which it (last) entered the running batch
    preemptions: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def max_total(self) -> int:
        """Tokens this sequence can ever hold: prompt + max_tokens (bounded by the context)."""
        return min(self.prompt_len + self.params.max_tokens, self.max_len)

    def append(self, token: int) -> RequestOutput:
        """Add a sampled token, decide whether the sequence is done, and say what to stream."""
        self.tokens.append(token)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        n_gen = len(self.tokens) - self.prompt_len
        reason = None
        if token in self.eos_ids:
            reason = "stop"
        elif n_gen >= self.params.max_tokens or len(self.tokens) >= self.max_len:
            reason = "length"
        # The EOS token itself is not text: detokenize without it.
        ids = self.generated[:-1] if reason == "stop" else self.generated
        delta, stop_hit = self.stream.update(ids, final=reason is not None)
        if stop_hit:
            reason = "stop"
        if reason is not None:
            self.status, self.finish_reason = Status.FINISHED, reason
        return self._output(delta, [token])

    def cancel_output(self) -> RequestOutput:
        self.status, self.finish_reason = Status.FINISHED, "cancelled"
        return self._output("", [])

    def _output(self, delta: str, delta_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            delta_text=delta,
            delta_token_ids=delta_ids,
            text=self.stream.text,
            token_ids=list(self.generated),
            finished=self.status is Status.FINISHED,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
        )
