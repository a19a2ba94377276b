"""The engine: requests in, one batched step at a time, streamed outputs out.

`Engine` is synchronous and single-threaded (`add_request`, `cancel`, `step`, `generate`); requests
added between steps (from any thread) join the running batch at the next step. `EngineLoop` runs
`step()` on a background thread and calls each request's callback with its outputs, which is how the
Triton model streams.

Every step appends a `StepRecord` (batch size, decode and prefill tokens, who ran, preemptions, KV
bytes held by the cache and by the decompressed-block cache) to
`engine.steps` and, if `step_log` is set, as one JSON line to that file: this is how a test or an
operator sees requests joining a batch that is already generating.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import operator
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trtcompress.runtime.config import DeployConfig
from trtcompress.runtime.sampling import RequestError, SamplingParams, make_generator, sample
from trtcompress.runtime.sequence import RequestOutput, Sequence, TextStream


@dataclass
class StepRecord:
    step: int
    time: float  # seconds since the engine started
    seconds: float  # duration of the step
    batch_size: int  # sequences computed in this step
    decode_tokens: int
    prefill_tokens: int
    running: list[str]  # request ids computed in this step
    joined: list[str]  # request ids whose first chunk ran in this step
    waiting: int
    free_blocks: int
    preempted: list[str]
    kv_bytes: int = 0  # KV data the paged cache holds after the step (blocks, fp16 tails, sinks)
    decompressed_bytes: int = 0  # the runtime's decompressed-block cache (<= kv_decompressed_cache_mb)


def _eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """The ids that end a request by default: the tokenizer's EOS, the model config's and its generation
    config's, which is where HF `generate` looks (chat models list a second end token there only)."""
    ids = set()
    sources = (model.config, getattr(model, "generation_config", None), tokenizer)
    for value in (getattr(source, "eos_token_id", None) for source in sources):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


RECENTLY_FINISHED = 4096  # finished request ids remembered, to ignore late cancels of them


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: DeployConfig | None = None,
        kv_codec: Any = None,
        block_size: int = 64,
        step_log: Path | str | None = None,
        sink_tokens: int = 0,
        step_history: int = 100_000,
    ) -> None:
        from trtcompress.kv import get_codec
        from trtcompress.kv.paged import PagedKVCache
        from trtcompress.runtime.model import BatchedModel
        from trtcompress.runtime.scheduler import Scheduler

        self.config = config or DeployConfig()
        device = torch.device(self.config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"deploy.device is {self.config.device!r} but this torch ({torch.__version__}) sees no CUDA "
                "device: install a CUDA build of torch on a GPU machine, or set deploy.device: cpu"
            )
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        cfg = model.config
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(tokenizer, model)
        self.context_len = min(self.config.max_seq_len, int(getattr(cfg, "max_position_embeddings", 1 << 30)))
        codec = kv_codec if kv_codec is not None else get_codec("fp16")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_blocks = max(1, -(-self.config.max_tokens_in_paged_kv_cache // block_size))
        self.cache = PagedKVCache(
            codec,
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            head_dim,
            num_blocks,
            block_size,
            max_seqs=self.config.max_batch_size + int(self.config.cuda_graphs),  # + the padding rows' slot
            device=device,
            sink_tokens=sink_tokens,
        )
        self.model = BatchedModel(
            model,
            self.cache,
            tile=self.config.gemm_tile,
            max_rows=self.config.max_num_tokens,
            decompressed_cache_bytes=int(self.config.kv_decompressed_cache_mb * 2**20),
            scratch_tokens=self.context_len,
            cpu_gemm=self.config.cpu_gemm,
        )
        if self.config.cuda_graphs:
            from trtcompress.runtime.cuda_graphs import DecodeGraphs, batch_buckets

            max_blocks = -(-self.context_len // block_size)
            self.model.graphs = DecodeGraphs(
                self.model, self.cache.take_slot(), batch_buckets(self.config.max_batch_size), max_blocks
            )
        self.scheduler = Scheduler(self.cache, self.config, on_free=lambda s: self.model.forget(s.seq_id))
        # the last step_history steps (about 0.5 KB each at batch 8): tests and benchmarks read them; a
        # served engine keeps few (its step log file is what serving reads)
        self.steps: deque[StepRecord] = deque(maxlen=step_history)
        self.step_log = Path(step_log) if step_log else None
        self.step_log_error: OSError | None = None  # why the last step could not be logged
        self._inbox: list[Sequence] = []
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._by_request: dict[str, Sequence] = {}
        # ids that finished lately: a cancel arriving after its request ended must not be kept for a
        # new request that reuses the id (a cancel of an id not yet queued waits for the next step only:
        # EngineLoop's race; past it, EngineLoop's is_cancelled polling catches a cancel)
        self._recently_finished: OrderedDict[str, None] = OrderedDict()
        self._t0 = time.perf_counter()
        self.tokens_generated = 0

    @classmethod
    def from_path(cls, path: Path | str, config: DeployConfig | None = None, **kwargs: Any) -> Engine:
        """A native artifact (its recipe's kv_cache and deploy sections apply: codec, block size and
        sink tokens, the cache `trtcompress eval --kv` decodes with) or a HF model directory."""
        from trtcompress.runtime.loading import load_for_runtime

        model, tokenizer, recipe = load_for_runtime(path)
        if config is None:
            config = recipe.deploy if recipe is not None else DeployConfig()
        if "kv_codec" not in kwargs and recipe is not None and recipe.kv_cache.codec:
            kv = recipe.kv_cache
            kwargs["kv_codec"], kwargs["block_size"] = kv.build_codec(), kv.block_size
            kwargs.setdefault("sink_tokens", kv.sink_tokens)
        return cls(model, tokenizer, config, **kwargs)

    # ------------------------------------------------------------------------------- requests

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        # token ids: integers only (numpy / torch integer scalars too); int() would truncate 1.7 to 1,
        # parse "12" and read bytes as their byte values, serving a prompt nobody sent
        if isinstance(prompt, bytes | bytearray | memoryview) or not hasattr(prompt, "__iter__"):
            raise RequestError(
                f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        ids = []
        for t in prompt:
            try:
                if isinstance(t, bool):
                    raise TypeError
                ids.append(operator.index(t))
            except (TypeError, ValueError, RuntimeError):
                raise RequestError(f"prompt token ids must be integers, got {t!r}") from None
        return ids

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Validate and queue a request (thread-safe); it joins the batch at the next step."""
        return self._queue([self._prepare(prompt, params, request_id)])[0]

    def _prepare(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str | None
    ) -> Sequence:
        """The validated sequence of a request, not yet queued (RequestError names what is wrong)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check()
        if isinstance(prompt, str) and not prompt:
            raise RequestError("the prompt is empty")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.model.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must lie in [0, {self.model.vocab_size})")
        if len(ids) >= self.context_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the context holds {self.context_len} "
                f"(prompt + at least one generated token)"
            )
        if len(ids) + params.max_tokens > self.context_len:
            raise RequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.context_len} tokens; ask for at most {self.context_len - len(ids)} new tokens"
            )
        if params.end_id is not None and params.end_id >= self.model.vocab_size:
            raise RequestError(
                f"end_id must be a token id below {self.model.vocab_size}, or -1, got {params.end_id}"
            )
        request_id = request_id or uuid.uuid4().hex
        eos = self.eos_ids
        if params.end_id is not None:
            eos = frozenset() if params.end_id == -1 else frozenset({params.end_id})
        if params.ignore_eos:
            eos = frozenset()
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request_id,
            prompt_ids=ids,
            params=params,
            stream=TextStream(self.tokenizer, params.stop),
            generator=None if params.greedy else make_generator(params.seed),
            eos_ids=eos,
            max_len=self.context_len,
        )
        return seq

    def _queue(self, seqs: list[Sequence]) -> list[str]:
        """Queue prepared sequences, all or none (a request id already in flight refuses them all)."""
        with self._lock:
            ids = [seq.request_id for seq in seqs]
            busy = [rid for rid in ids if rid in self._by_request]
            if busy or len(set(ids)) < len(ids):
                raise RequestError(f"request id {(busy or ids)[0]!r} is already in flight")
            for seq in seqs:
                self._by_request[seq.request_id] = seq
                self._recently_finished.pop(seq.request_id, None)  # a cancel of it counts from now
                self._inbox.append(seq)
        return ids

    def cancel(self, request_id: str) -> None:
        """Stop a request (thread-safe); its last output has finish_reason 'cancelled'."""
        with self._lock:
            if request_id not in self._recently_finished:
                self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._cancel) or self.scheduler.has_work()

    # ----------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over the batch, sample, and return what each request produced."""
        with self._lock:
            for seq in self._inbox:
                self.scheduler.add(seq)
            self._inbox = []
            for rid in self._cancel:
                if rid in self._by_request:
                    self._by_request[rid].cancelled = True
            self._cancel = set()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        outputs = list(plan.cancelled)
        if plan.work:
            logits = self.model.forward(plan.work)
            sampling = [w for w in plan.work if w.samples]
            tokens = sample(logits, [w.seq.params for w in sampling], [w.seq.generator for w in sampling])
            for w in plan.work:
                w.seq.num_computed += w.n
            for w, token in zip(sampling, tokens, strict=True):
                out = w.seq.append(token)
                self.tokens_generated += 1
                if out.finished:
                    self.scheduler.finish(w.seq)
                outputs.append(out)
        for out in outputs:
            if out.finished:
                with self._lock:
                    self._by_request.pop(out.request_id, None)
                    self._recently_finished[out.request_id] = None
                    self._cancel.discard(out.request_id)  # one that came during this step is moot
                    if len(self._recently_finished) > RECENTLY_FINISHED:
                        self._recently_finished.popitem(last=False)
        self._record(plan, t0)
        return outputs

    def _record(self, plan: Any, t0: float) -> None:
        if not plan.work and not plan.preempted:
            return
        now = time.perf_counter()
        rec = StepRecord(
            step=self.scheduler.step_index,
            time=round(t0 - self._t0, 6),
            seconds=round(now - t0, 6),
            batch_size=len(plan.work),
            decode_tokens=sum(w.n for w in plan.work if w.phase == "decode"),
            prefill_tokens=sum(w.n for w in plan.work if w.phase == "prefill"),
            running=[w.seq.request_id for w in plan.work],
            joined=[w.seq.request_id for w in plan.work if w.start == 0],
            waiting=len(self.scheduler.waiting),
            free_blocks=self.cache.free_blocks,
            preempted=[s.request_id for s in plan.preempted],
            kv_bytes=self.cache.bytes_used(),
            decompressed_bytes=self.model.decompressed_bytes,
        )
        self.steps.append(rec)
        if self.step_log is not None:
            try:
                with self.step_log.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(rec)) + "\n")
            except OSError as exc:  # a diagnostic: a full disk or a removed directory must not fail requests
                if self.step_log_error is None:
                    warnings.warn(
                        f"step log {self.step_log}: {exc}; steps go unlogged until it can be written",
                        stacklevel=2,
                    )
                self.step_log_error = exc
            else:
                self.step_log_error = None

    # ------------------------------------------------------------------------------- offline

    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion (all admitted as the batch allows); final outputs in order."""
        if isinstance(prompts, str | bytes):  # iterating it would make one prompt of each character
            raise RequestError("generate() takes a list of prompts, got a string: pass [prompt]")
        prompts = list(prompts)
        if isinstance(params, list | tuple):
            plist = list(params)
            if len(plist) != len(prompts):
                raise RequestError(
                    f"{len(prompts)} prompts but {len(plist)} sampling params: pass one per prompt"
                )
        else:
            plist = [params or SamplingParams()] * len(prompts)
        # every prompt validated before any is queued: a refused one leaves nothing behind
        ids = self._queue([self._prepare(p, sp, None) for p, sp in zip(prompts, plist, strict=True)])
        wanted = set(ids)  # other requests in flight (add_request) finish in these steps too
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            try:
                outputs = self.step()
            except BaseException:
                self.drop_all()  # a failed step leaves nothing in flight to fail again at the next call
                raise
            for out in outputs:
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def drop_all(self) -> None:
        """End every request in flight without output (after a failed step): running sequences free
        their KV blocks, queued ones leave. A step that raised may have written or committed part of
        its sequences' cache, so none of them could run on."""
        sched = self.scheduler
        for seq in list(sched.running):
            sched.finish(seq)
        sched.waiting.clear()
        with self._lock:
            self._by_request.clear()
            self._inbox.clear()
            self._cancel.clear()


class EngineLoop:
    """Runs `Engine.step` on a background thread; each request's outputs go to its callback.

    Pass a function that builds the engine rather than an engine where the caller's thread has not
    run torch yet (a server's main thread): it is then built on the loop's own thread, so that one
    thread runs every torch op. Why: each thread that runs an OpenMP parallel region gets its own
    libgomp worker pool, and once the pools hold more threads than there are CPUs, libgomp stops
    spinning between regions (its "throttled" spin count), so every one of the thousands of small
    parallel ops of a decode step waits for a futex wake-up. On the 2-core CI machine an engine
    built on the main thread and stepped on this one ran 1.6x slower than one built here
    (SmolLM2-135M, 32 requests of 64 + 48 tokens: 211 against 360 tokens/s).
    """

    cancel_poll_s = 0.1  # how often the requests' `is_cancelled` checks run (each one may be an IPC call)

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_error = on_error
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self._cancel_checks: dict[str, Callable[[], bool]] = {}
        self._last_poll = 0.0
        self._wake = threading.Condition()
        self._stop = False
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self.engine: Engine = engine if isinstance(engine, Engine) else None  # type: ignore[assignment]
        factory = None if isinstance(engine, Engine) else engine
        self._thread = threading.Thread(
            target=self._run, args=(factory,), name="trtcompress-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            raise self._build_error

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        callback: Callable[[RequestOutput], None],
        is_cancelled: Callable[[], bool] | None = None,
    ) -> str:
        """Queue a request (validation errors raise RequestError here, synchronously). `is_cancelled`
        (the client went away) is polled between steps while the request is in flight, queued or
        prefilling too (no output to notice it by then); when it says so the request is cancelled."""
        request_id = uuid.uuid4().hex
        self._callbacks[request_id] = callback
        if is_cancelled is not None:
            self._cancel_checks[request_id] = is_cancelled
        try:
            self.engine.add_request(prompt, params, request_id)
        except BaseException:
            self._callbacks.pop(request_id, None)
            self._cancel_checks.pop(request_id, None)
            raise
        with self._wake:
            self._wake.notify()
        return request_id

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        with self._wake:
            self._wake.notify()

    def _run(self, factory: Callable[[], Engine] | None) -> None:
        if factory is not None:
            try:
                self.engine = factory()
            except BaseException as exc:  # raised again by __init__, on the caller's thread
                self._build_error = exc
                self._ready.set()
                return
        self._ready.set()
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
            self._poll_cancelled()
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a bug: report it, fail the in-flight requests, keep serving
                if self.on_error:
                    self.on_error(exc)
                self._fail_all(exc)
                continue
            for out in outputs:
                callback = self._callbacks.get(out.request_id)
                if out.finished:
                    self._callbacks.pop(out.request_id, None)
                    self._cancel_checks.pop(out.request_id, None)
                if callback is not None:
                    try:
                        callback(out)
                    except Exception as exc:  # a client that went away must not stop the loop
                        if self.on_error:
                            self.on_error(exc)

    def _poll_cancelled(self) -> None:
        """Cancel the requests whose `is_cancelled` says so (at most every `cancel_poll_s`)."""
        now = time.monotonic()
        if now - self._last_poll < self.cancel_poll_s:
            return
        self._last_poll = now
        for rid, is_cancelled in list(self._cancel_checks.items()):
            try:
                gone = is_cancelled()
            except Exception:  # a check that fails says nothing: the request goes on
                gone = False
            # the check stays until the request's final output: a cancel polled while add_request was
            # still tokenizing was dropped by the engine (an id it did not know yet), so it is repeated
            if gone:
                self.engine.cancel(rid)

    def _fail_all(self, exc: BaseException) -> None:
        # the engine first: requests submitted during the failed step (in its inbox) are failed too, not run
        self.engine.drop_all()
        for rid, callback in list(self._callbacks.items()):
            self._callbacks.pop(rid, None)
            self._cancel_checks.pop(rid, None)
            with contextlib.suppress(Exception):
                callback(RequestOutput(rid, "", [], "", [], True, f"error: {exc}", 0))

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)
