"""In-flight batching: which tokens of which sequences the next forward step computes.

Every step (`schedule`):
1. cancelled sequences leave (their blocks are freed);
2. every running sequence in the decode phase gets its one token (oldest first);
3. running sequences still in their prompt get their next chunk while the token budget allows;
4. waiting requests are admitted in arrival order while there is a free batch slot, budget for their
   first chunk, and KV memory under the policy. A request that arrives while others generate therefore
   joins the running batch at the next step: nobody waits for the batch to drain.

A chunk is scheduled whole or not at all, and chunk boundaries depend only on the prompt (multiples of
`context_chunk_size`), never on what else is in the batch; with the batch-invariant GEMMs of
`linear.py` this makes a sequence's numbers independent of the batch it runs in.

KV memory (blocks of the paged cache):
- `guaranteed_no_evict`: a request is admitted only if the blocks for its whole life (prompt +
  max_tokens - 1 tokens: the last one is never fed back) are free after what running sequences may
  still claim, so nobody is ever evicted;
- `max_utilization`: admit while the next chunk fits; when a running sequence needs a block and none
  is free, the newest unscheduled sequence (possibly itself) is preempted: its blocks are freed and it
  goes back to the front of the queue, to be recomputed exactly when memory frees up (at a later
  step, never the one that preempted it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.config import DeployConfig
from trtcompress.runtime.sequence import RequestOutput, Sequence, Status


@dataclass(frozen=True)
class Work:
    """`n` tokens of `seq` starting at position `start` (= its computed length)."""

    seq: Sequence
    start: int
    n: int

    @property
    def token_ids(self) -> list[int]:
        return self.seq.tokens[self.start : self.start + self.n]

    @property
    def samples(self) -> bool:
        """Whether this work ends at the sequence's last known token (so it yields a new token)."""
        return self.start + self.n == len(self.seq.tokens)

    @property
    def phase(self) -> str:
        return "prefill" if self.start < self.seq.prompt_len else "decode"


@dataclass
class StepPlan:
    work: list[Work] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    cancelled: list[RequestOutput] = field(default_factory=list)


class Scheduler:
    def __init__(
        self, cache: PagedKVCache, config: DeployConfig, on_free: Callable[[Sequence], None] | None = None
    ) -> None:
        self.cache = cache
        self.config = config
        self.on_free = on_free or (lambda seq: None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.step_index = 0

    # ----------------------------------------------------------------------------------- queue

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, tokens: int) -> int:
        """Blocks a sequence uses when `tokens` tokens are in the cache (the tail holds the rest)."""
        return tokens // self.cache.block_size

    def next_size(self, seq: Sequence) -> int:
        if seq.num_computed < seq.prompt_len:
            return min(self.config.prefill_chunk, seq.prompt_len - seq.num_computed)
        return 1

    def life_blocks(self, seq: Sequence) -> int:
        """Blocks a sequence can ever hold: its last token is sampled but never fed back, so at most
        `max_total - 1` tokens reach the cache."""
        return self.blocks_for(seq.max_total - 1)

    def promised_blocks(self) -> int:
        """Blocks running sequences may still claim before they finish (guaranteed_no_evict)."""
        return sum(max(0, self.life_blocks(s) - len(self.cache.seqs[s.seq_id].blocks)) for s in self.running)

    # -------------------------------------------------------------------------------- schedule

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self.step_index += 1
        self._drop_cancelled(plan)
        scheduled: set[int] = set()
        budget = self.config.max_num_tokens
        decoding = [s for s in self.running if s.num_computed >= s.prompt_len]
        prefilling = [s for s in self.running if s.num_computed < s.prompt_len]
        for seq in decoding + prefilling:
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self.next_size(seq)
            if n > budget:
                continue  # a prompt chunk that does not fit this step waits for the next
            if not self._make_room(seq, n, scheduled, plan):
                continue  # the sequence itself was preempted
            budget -= n
            self._take(seq, n, scheduled, plan)
        self._admit(budget, scheduled, plan)
        return plan

    def _take(self, seq: Sequence, n: int, scheduled: set[int], plan: StepPlan) -> None:
        self.cache.reserve(seq.seq_id, n)
        scheduled.add(seq.seq_id)
        plan.work.append(Work(seq, seq.num_computed, n))

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int], plan: StepPlan) -> bool:
        """Free blocks for `n` more tokens of a running sequence; False if it was preempted itself."""
        while self.cache.blocks_needed(seq.seq_id, n) > self.cache.free_blocks:
            if self.config.batch_scheduler_policy == "guaranteed_no_evict":
                raise RuntimeError("guaranteed_no_evict ran out of blocks: the admission accounting is wrong")
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _admit(self, budget: int, scheduled: set[int], plan: StepPlan) -> None:
        while self.waiting and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            if any(seq is victim for victim in plan.preempted):
                break  # a victim of this step: re-admitting it now would recompute its prompt for nothing
            n = self.next_size(seq)
            if n > budget:
                break
            if self.config.batch_scheduler_policy == "guaranteed_no_evict":
                fits = self.life_blocks(seq) <= self.cache.free_blocks - self.promised_blocks()
            else:
                fits = self.blocks_for(n) <= self.cache.free_blocks
            if not fits:
                break  # strict arrival order: a big request is not overtaken (no starvation)
            self.waiting.popleft()
            self.cache.add_sequence(seq.seq_id)
            seq.status, seq.admitted_step = Status.RUNNING, self.step_index
            self.running.append(seq)
            budget -= n
            self._take(seq, n, scheduled, plan)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.cache.free(seq.seq_id)
        self.on_free(seq)
        seq.num_computed, seq.status = 0, Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _drop_cancelled(self, plan: StepPlan) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self.running.remove(seq)
            self.release(seq)
            plan.cancelled.append(seq.cancel_output())
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            plan.cancelled.append(seq.cancel_output())

    # -------------------------------------------------------------------------------- finish

    def finish(self, seq: Sequence) -> None:
        """A sequence that ended (stop, length): leave the batch, free its blocks."""
        self.running.remove(seq)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        self.cache.free(seq.seq_id)
        self.on_free(seq)
