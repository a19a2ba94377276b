"""The native runtime on a real (tiny, random) LLaMA artifact: batching, chunked prefill, KV policies,
preemption, cancellation, sampling and streaming. Every comparison is token-exact."""

from __future__ import annotations

import pytest
import torch

from trtcompress.runtime import Engine, RequestError, SamplingParams
from trtcompress.runtime.config import DeployConfig

GREEDY = SamplingParams(max_tokens=12, end_id=-1)


def _prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(1, 512, (k,), generator=g).tolist() for k in lengths]


def _engine(artifact, **deploy) -> Engine:
    base = dict(
        max_batch_size=8, max_num_tokens=40, context_chunk_size=16, max_seq_len=128,
        max_tokens_in_paged_kv_cache=1024,
    )  # fmt: skip
    return Engine.from_path(artifact, DeployConfig(**{**base, **deploy}), block_size=16)


@pytest.fixture(scope="module")
def engine(tiny_int4_artifact):
    return _engine(tiny_int4_artifact)


@pytest.fixture(scope="module")
def solo(tiny_int4_artifact):
    """Reference outputs: each prompt alone in its own engine run (batch of one)."""
    eng = _engine(tiny_int4_artifact)
    return lambda prompt, params=GREEDY: eng.generate([prompt], params)[0]


@pytest.mark.parametrize(("gemm_tile", "cpu_gemm"), [(0, "auto"), (16, "auto"), (0, "blas")])
def test_batched_equals_one_at_a_time(tiny_int4_artifact, gemm_tile, cpu_gemm):
    from trtcompress.runtime.linear import FALLBACK_TILE, onednn_available

    engine = _engine(tiny_int4_artifact, gemm_tile=gemm_tile, cpu_gemm=cpu_gemm)
    expected = "onednn" if cpu_gemm == "auto" and onednn_available() else "blas"
    assert engine.model.gemm_backend == expected
    if expected == "onednn" or gemm_tile:  # 0: oneDNN passed the batch-invariance probe here
        assert engine.model.gemm_tile == gemm_tile
    else:  # MKL fails it on this CPU (rows of M = 5 and 7 differ): fixed 16-row tiles instead
        assert engine.model.gemm_tile in (0, FALLBACK_TILE)
    solo = _engine(tiny_int4_artifact, gemm_tile=gemm_tile, cpu_gemm=cpu_gemm)
    prompts = _prompts(10)
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == solo.generate([prompt], GREEDY)[0].token_ids
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    steps = list(engine.steps)
    assert max(s.batch_size for s in steps) == 8  # the batch really filled up
    assert max(s.decode_tokens + s.prefill_tokens for s in steps) <= 40  # token budget
    # chunked prefill: no step runs more than one 16-token chunk of any prompt
    assert all(s.prefill_tokens <= 16 * s.batch_size for s in steps)
    assert engine.cache.free_blocks == engine.cache.num_blocks  # everything freed


def test_probe_detects_batch_dependent_gemms():
    import torch.nn.functional as F

    from trtcompress.runtime.linear import probe_batch_invariance, tiled_linear

    w = torch.randn(64, 48)
    # a GEMM whose rows change with M (as a BLAS switching kernels at some M would) is caught
    drifting = lambda x, w: F.linear(x, w) * (1 + 1e-6 * (x.shape[0] >= 33))  # noqa: E731
    assert not probe_batch_invariance([w], 64, linear=drifting)

    def tail_rows(x, w):  # only rows past the first 4 of an odd M change (as MKL's did at M = 5 and 7)
        out = F.linear(x, w)
        if x.shape[0] % 2:
            out[4:] *= 1 + 1e-6
        return out

    assert not probe_batch_invariance([w], 64, linear=tail_rows)

    def by_position(x, w):  # a row's result depends on where it sits in the batch
        return F.linear(x, w) * (1 + 1e-6 * torch.arange(x.shape[0])[:, None].eq(7))

    assert not probe_batch_invariance([w], 64, linear=by_position)
    x = torch.randn(3, 48)  # fewer rows than MIN_ROWS are padded, never a GEMV-shaped call
    assert torch.equal(tiled_linear(x, w, None, 0), tiled_linear(torch.cat([x, x]), w, None, 0)[:3])
    for tile in (0, 16):  # no rows at all: an empty result (fixed tiles made torch.cat fail on no tile)
        assert tiled_linear(x[:0], w, None, tile).shape == (0, 64)


def test_onednn_linear_matches_blas_and_a_missing_onednn_is_a_clear_error(tiny_int4_artifact, monkeypatch):
    import torch.nn.functional as F

    from trtcompress.runtime import linear, model

    if linear.onednn_available():
        w, b, x = torch.randn(96, 48), torch.randn(96), torch.randn(7, 48)
        got = linear.onednn_linear(x, linear.onednn_pack(w, 32), b)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert linear.probe_batch_invariance([linear.onednn_pack(w, 32)], 64, linear=linear.onednn_linear)
        # a low-rank branch (EoRA) goes through oneDNN too, and is probed with the main weight
        lr_a, lr_b = torch.randn(96, 8) * 0.1, torch.randn(8, 48) * 0.1
        lin = linear.RuntimeLinear(w.clone(), b, 0, lowrank=(lr_a, lr_b))
        want = lin(x)
        lin.use_onednn(32)
        assert len(lin.gemm_weights) == 3 and all(t.is_mkldnn for t in lin.gemm_weights)
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)
        assert linear.probe_batch_invariance(lin.gemm_weights, 64, linear=lin.linear)
    monkeypatch.setattr(model, "onednn_available", lambda: False)
    assert _engine(tiny_int4_artifact).model.gemm_backend == "blas"  # auto falls back
    with pytest.raises(RuntimeError, match=r"cpu_gemm is onednn .* set deploy\.cpu_gemm: blas"):
        _engine(tiny_int4_artifact, cpu_gemm="onednn")


def test_chunked_prefill_splits_long_prompts(tiny_int4_artifact):
    eng = _engine(tiny_int4_artifact)
    prompt = _prompts(1, seed=3, lo=60, hi=61)[0]
    eng.generate([prompt], SamplingParams(max_tokens=2, end_id=-1))
    prefill = [s.prefill_tokens for s in eng.steps if s.prefill_tokens]
    assert prefill == [16, 16, 16, 12]


def test_late_arrival_joins_the_running_batch(engine, solo):
    a, b = _prompts(2, seed=5)
    first = engine.add_request(a, GREEDY)
    outs = {first: []}
    for _ in range(4):
        outs[first] += engine.step()
    second = engine.add_request(b, GREEDY)
    outs[second] = []
    joined_step = None
    while engine.has_work():
        for out in engine.step():
            outs[out.request_id].append(out)
        rec = engine.steps[-1]
        if joined_step is None and second in rec.joined:
            joined_step = rec
    assert joined_step is not None and first in joined_step.running  # joined while `first` decoded
    assert outs[first][-1].token_ids == solo(a).token_ids
    assert outs[second][-1].token_ids == solo(b).token_ids


def test_max_utilization_preempts_and_resumes_exactly(tiny_int4_artifact, solo):
    # 4 blocks of 16 tokens; each request needs 3 blocks over its life: two cannot live together.
    eng = _engine(
        tiny_int4_artifact, batch_scheduler_policy="max_utilization", max_seq_len=64,
        max_tokens_in_paged_kv_cache=64, max_batch_size=4, max_num_tokens=20,
    )  # fmt: skip
    prompts = _prompts(3, seed=7, lo=18, hi=22)
    params = SamplingParams(max_tokens=30, end_id=-1)  # 48+ tokens: 3 blocks
    outs = eng.generate(prompts, params)
    assert sum(len(s.preempted) for s in eng.steps) > 0
    # a victim waits for a later step: taking it back at once recomputes its prompt for nothing
    assert not any(set(s.preempted) & set(s.joined) for s in eng.steps)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == solo(prompt, params).token_ids
    assert eng.cache.free_blocks == 4


def test_guaranteed_no_evict_admits_only_what_fits(tiny_int4_artifact, solo):
    eng = _engine(
        tiny_int4_artifact, max_seq_len=64, max_tokens_in_paged_kv_cache=64, max_batch_size=4,
        max_num_tokens=20,
    )  # fmt: skip
    prompts = _prompts(3, seed=7, lo=18, hi=22)
    params = SamplingParams(max_tokens=30, end_id=-1)  # 50, 47, 48 tokens in the cache: 3, 2, 3 blocks
    outs = eng.generate(prompts, params)
    assert all(not s.preempted for s in eng.steps)
    assert max(s.batch_size for s in eng.steps) == 1  # no two fit in the 4 blocks of the pool
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == solo(prompt, params).token_ids


def test_guaranteed_no_evict_admits_a_request_whose_last_token_leaves_a_block_free(tiny_int4_artifact):
    # prompt 20 + 28 new = 48 tokens, but the last one is never fed back: 47 in the cache, 2 blocks of 16,
    # so two such requests fill the pool of 4 blocks together (a whole-life count of 48 made it 3 each)
    eng = _engine(
        tiny_int4_artifact, max_seq_len=64, max_tokens_in_paged_kv_cache=64, max_batch_size=4,
        max_num_tokens=20,
    )  # fmt: skip
    outs = eng.generate(_prompts(2, seed=7, lo=20, hi=21), SamplingParams(max_tokens=28, end_id=-1))
    assert [len(o.token_ids) for o in outs] == [28, 28]
    assert max(s.batch_size for s in eng.steps) == 2 and min(s.free_blocks for s in eng.steps) == 0
    assert eng.cache.free_blocks == eng.cache.num_blocks


def test_cancel_frees_the_request_and_others_continue(engine, solo):
    a, b = _prompts(2, seed=11)
    ra = engine.add_request(a, SamplingParams(max_tokens=40, end_id=-1))
    rb = engine.add_request(b, GREEDY)
    for _ in range(5):
        engine.step()
    engine.cancel(ra)
    final = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert final[ra].finish_reason == "cancelled" and len(final[ra].token_ids) < 40
    assert final[rb].token_ids == solo(b).token_ids
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_a_late_cancel_does_not_reach_a_new_request_that_reuses_the_id(engine):
    """A cancel of a request that had already finished was kept until the next step, where it cancelled
    a new request queued meanwhile under the same id (it ended `cancelled` with no tokens). So was a
    cancel that arrived during the step that finished the request."""
    params = SamplingParams(max_tokens=2, end_id=-1)
    [first] = engine.generate(["hello"], params)
    engine.cancel(first.request_id)  # too late: it finished
    engine.add_request("hello", params, request_id=first.request_id)
    final = {}
    while engine.has_work():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[first.request_id].finish_reason == "length"
    assert len(final[first.request_id].token_ids) == 2
    engine.add_request("hello", params, request_id="b")
    engine.step()
    engine.cancel("b")  # a cancel of a request in flight still works
    [out] = [o for o in engine.step() if o.finished]
    assert out.finish_reason == "cancelled"


def test_engine_loop_builds_the_engine_on_its_own_thread(tiny_int4_artifact, solo):
    import threading

    from trtcompress.runtime import EngineLoop

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return _engine(tiny_int4_artifact)

    loop = EngineLoop(build)
    try:
        assert built_on == ["trtcompress-engine"]  # the thread that runs the steps, not the caller's
        done, outs = threading.Event(), []
        prompt = _prompts(1, seed=3)[0]

        def collect(out):
            outs.append(out)
            if out.finished:
                done.set()

        loop.submit(prompt, GREEDY, collect)
        assert done.wait(60)
        assert outs[-1].token_ids == solo(prompt).token_ids
    finally:
        loop.shutdown()

    def broken():
        raise FileNotFoundError("no artifact at /nowhere")

    with pytest.raises(FileNotFoundError, match="no artifact"):  # a failed build fails the constructor
        EngineLoop(broken)


def _collector():
    """(started, finals, done, collect): collect(name) is a loop callback recording request `name`'s
    final output in finals[name] and setting done[name]; `started` is set at any output."""
    import threading

    started, finals = threading.Event(), {}
    done = {name: threading.Event() for name in "ab"}

    def collect(name):
        def callback(out):
            started.set()
            if out.finished:
                finals[name] = out
                done[name].set()

        return callback

    return started, finals, done, collect


def test_engine_loop_cancels_a_queued_request_whose_client_went_away(tiny_int4_artifact):
    """A request whose client went away while it waited in the queue was noticed only at its first
    output: it was admitted, held KV blocks and ran its whole prefill first. The loop now polls each
    request's `is_cancelled` between steps, so it leaves the queue without ever running."""
    import threading

    from trtcompress.runtime import EngineLoop

    loop = EngineLoop(
        lambda: _engine(
            tiny_int4_artifact, max_batch_size=1, max_seq_len=1024, max_tokens_in_paged_kv_cache=2048
        )
    )
    loop.cancel_poll_s = 0.0
    try:
        started, finals, done, collect = _collector()
        ra = loop.submit([5, 6, 7], SamplingParams(max_tokens=1000, end_id=-1), collect("a"))
        assert started.wait(60)
        gone = threading.Event()
        rb = loop.submit([8, 9, 10], GREEDY, collect("b"), is_cancelled=gone.is_set)  # queued behind a
        gone.set()
        assert done["b"].wait(60)
        assert finals["b"].finish_reason == "cancelled" and not done["a"].is_set()
        assert all(rb not in s.running for s in loop.engine.steps)  # it never ran
        assert rb not in loop._cancel_checks and rb not in loop._callbacks  # nothing left behind
        loop.cancel(ra)
        assert done["a"].wait(60)
    finally:
        loop.shutdown()


def test_a_cancel_polled_while_the_request_is_still_being_added_is_not_lost(tiny_int4_artifact):
    """`submit` registers the client's `is_cancelled` before `add_request` (tokenizing, on the caller's
    thread) hands the request to the engine. A poll in between cancels an id the engine does not know
    yet, which it drops: the check is kept and polled again, so the request is still cancelled."""
    import threading

    from trtcompress.runtime import EngineLoop

    loop = EngineLoop(lambda: _engine(tiny_int4_artifact, max_batch_size=2, max_seq_len=1024))
    loop.cancel_poll_s = 0.0
    try:
        started, finals, done, collect = _collector()
        ra = loop.submit([5, 6, 7], SamplingParams(max_tokens=1000, end_id=-1), collect("a"))
        assert started.wait(60)  # the loop is stepping (and polling) without pause
        polled = threading.Event()

        def client_gone() -> bool:
            polled.set()
            return True

        add_request = loop.engine.add_request

        def slow_add_request(*args, **kwargs):  # the poll runs while this request is still being added
            assert polled.wait(60)
            return add_request(*args, **kwargs)

        loop.engine.add_request = slow_add_request
        rb = loop.submit([8, 9, 10], GREEDY, collect("b"), is_cancelled=client_gone)
        assert done["b"].wait(60)
        assert finals["b"].finish_reason == "cancelled" and finals["b"].token_ids == []
        assert all(rb not in s.running for s in loop.engine.steps)  # it never ran
        loop.cancel(ra)
        assert done["a"].wait(60)
    finally:
        loop.shutdown()


def test_a_step_log_that_cannot_be_written_does_not_fail_the_requests(tiny_int4_artifact, tmp_path):
    """Writing the step log raised out of `step()`: with its directory gone (or the disk full, the log
    growing with every step) every request in flight failed, at every step, in a serving loop."""
    import shutil

    logs = tmp_path / "logs"
    logs.mkdir()
    engine = Engine.from_path(
        tiny_int4_artifact, DeployConfig(max_num_tokens=160), block_size=16, step_log=logs / "steps.jsonl"
    )
    prompt = _prompts(1, seed=5)[0]
    expected = engine.generate([prompt], GREEDY)[0].token_ids
    shutil.rmtree(logs)
    with pytest.warns(UserWarning, match="steps go unlogged"):
        out = engine.generate([prompt], GREEDY)[0]
    assert out.token_ids == expected and isinstance(engine.step_log_error, FileNotFoundError)
    logs.mkdir()  # writable again: logging resumes
    engine.generate([prompt], GREEDY)
    assert engine.step_log_error is None and (logs / "steps.jsonl").read_text().count("\n") >= 12


def test_seeded_sampling_is_independent_of_the_batch(engine, solo):
    prompts = _prompts(4, seed=13)
    params = [
        SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=i, end_id=-1)
        for i in range(4)
    ]
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out.token_ids == solo(prompt, p).token_ids
    again = solo(prompts[0], SamplingParams(max_tokens=10, temperature=0.9, seed=1234, end_id=-1))
    assert again.token_ids != outs[0].token_ids  # another seed draws other tokens
    greedy = solo(prompts[0], SamplingParams(max_tokens=10, end_id=-1)).token_ids
    assert (
        solo(prompts[0], SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=3, end_id=-1)).token_ids
        == greedy
    )
    assert (
        solo(
            prompts[0], SamplingParams(max_tokens=10, temperature=5.0, top_p=1e-6, seed=3, end_id=-1)
        ).token_ids
        == greedy
    )


def test_stop_conditions_and_streaming(engine, solo):
    prompt = "the river flows into the"

    def params(**kw):  # seeded sampling: varied tokens (a random model's greedy text repeats itself)
        return SamplingParams(**{"max_tokens": 24, "temperature": 1.0, "seed": 5, "end_id": -1, **kw})

    full = solo(prompt, params())
    # end id: stop at the first token that was not generated before (the id itself is not text)
    at = next(i for i, t in enumerate(full.token_ids) if i >= 3 and t not in full.token_ids[:i])
    out = solo(prompt, params(end_id=full.token_ids[at]))
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: at + 1]
    # stop string: a piece of the text; the output is the text before its first occurrence
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = solo(prompt, params(stop=(stop,)))
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]
    # streaming: the deltas add up to the text, several pieces arrive before the end
    rid = engine.add_request(prompt, params())
    deltas = []
    while engine.has_work():
        deltas += [o for o in engine.step() if o.request_id == rid]
    assert "".join(o.delta_text for o in deltas) == deltas[-1].text == text
    assert sum(1 for o in deltas if o.delta_text) > 3 and deltas[-1].finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ("", SamplingParams(), "empty"),
        ("hello", SamplingParams(max_tokens=0), "max_tokens"),
        ("hello", SamplingParams(max_tokens=500), "exceeds the context"),
        ([5] * 200, SamplingParams(), "context holds"),
        ("hello", SamplingParams(temperature=-1.0), "temperature"),
        ("hello", SamplingParams(top_p=0.0), "top_p"),
        ([600], SamplingParams(), "token ids"),
        ("hello", SamplingParams(end_id=10**9), "end_id must be a token id below"),
        ("hello", SamplingParams(stop="xyz"), "stop must be a list of strings"),  # not 3 one-letter stops
        ("hello", SamplingParams(temperature=1.0, top_k=2.5), "top_k must be an integer"),
        ("hello", SamplingParams(temperature=1.0, seed=1.5), "seed must be an integer"),
        ("hello", SamplingParams(max_tokens=True), "max_tokens must be a positive integer"),
        # token ids that are not integers were converted by int(): 1.7 ran as 1, "12" as 12, b"hi" as
        # its byte values, and other values failed with a bare TypeError / ValueError
        ([1.7, 2.2], SamplingParams(), "token ids must be integers"),
        ([True, 5], SamplingParams(), "token ids must be integers"),
        (["12"], SamplingParams(), "token ids must be integers"),
        ([[1, 2]], SamplingParams(), "token ids must be integers"),
        (b"hello", SamplingParams(), "a string or a list of token ids"),
        (None, SamplingParams(), "a string or a list of token ids"),
        ("hello", {"max_tokens": 3}, "params must be a SamplingParams"),
        ("hello", SamplingParams(temperature=True, seed=1), "temperature must be a number"),
        ("hello", SamplingParams(top_p=True), "top_p must be in"),
        ("hello", SamplingParams(ignore_eos="false"), "ignore_eos must be true or false"),
    ],
)
def test_invalid_requests_are_refused(engine, prompt, params, match):
    with pytest.raises(RequestError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_work()


def test_integer_token_ids_of_any_integer_type_are_a_prompt(engine):
    import numpy as np

    ids = [5, 17, 300]
    for prompt in (np.array(ids), torch.tensor(ids), [np.int32(5), np.int64(17), 300]):
        rid = engine.add_request(prompt, SamplingParams(max_tokens=1, end_id=-1))
        assert engine._by_request[rid].prompt_ids == ids
        while engine.has_work():
            engine.step()


def test_generate_refuses_mismatched_params_and_bytes(engine):
    with pytest.raises(RequestError, match="2 prompts but 1 sampling params"):
        engine.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(RequestError, match="got a string"):
        engine.generate(b"ab")
    assert not engine.has_work()
    params = (SamplingParams(max_tokens=2, end_id=-1), SamplingParams(max_tokens=3, end_id=-1))
    outs = engine.generate(["a", "b"], params)  # a tuple is one params per prompt too
    assert [len(o.token_ids) for o in outs] == [2, 3]


def test_device_is_validated_and_a_missing_gpu_is_a_clear_error(tiny_int4_artifact):
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="device"):
        DeployConfig(device="gpu0")
    cpu = _engine(tiny_int4_artifact, device="cpu")
    assert cpu.cache.tails["k"].device.type == "cpu" and cpu.model.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            _engine(tiny_int4_artifact, device="cuda")


def test_an_infinite_decompressed_cache_budget_is_refused():
    """`kv_decompressed_cache_mb: .inf` passed `ge=0` and the engine then failed at start converting it
    to bytes (OverflowError); NaN was already refused."""
    import pydantic

    for bad in (float("inf"), float("nan")):
        with pytest.raises(pydantic.ValidationError, match="kv_decompressed_cache_mb"):
            DeployConfig(kv_decompressed_cache_mb=bad)
    assert DeployConfig(kv_decompressed_cache_mb=0.5).kv_decompressed_cache_mb == 0.5


def test_a_tiny_temperature_samples_the_top_token(engine, solo):
    """Any temperature > 0 gives finite probabilities (the logits are shifted to a top of 0 before the
    division): 1e-39 overflowed them to inf, NaN probabilities crashed the step and so every request
    in flight."""
    prompt = _prompts(1, seed=5)[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1e-39, seed=1))[0]
    assert out.token_ids == solo(prompt, SamplingParams(max_tokens=8)).token_ids


def test_a_temperature_or_top_p_below_float32s_range_samples_the_top_token(engine, solo):
    """1e-50 is a valid temperature or top_p, but 0 in float32: the division gave 0 / 0 = NaN, and 0 >= 0
    dropped every token, so the step failed and with it every request in flight."""
    prompts = _prompts(2, seed=6)
    params = [
        SamplingParams(max_tokens=8, temperature=1e-50, seed=1, end_id=-1),
        SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-50, seed=1, end_id=-1),
    ]
    outs = engine.generate([prompts[0], prompts[0], prompts[1]], [*params, GREEDY])
    greedy = solo(prompts[0], SamplingParams(max_tokens=8, end_id=-1)).token_ids
    assert outs[0].token_ids == outs[1].token_ids == greedy
    assert outs[2].token_ids == solo(prompts[1]).token_ids


def test_seeds_differing_above_32_bits_draw_different_tokens(engine, solo):
    """torch's CPU generator keeps only a seed's low 32 bits: seed 5 + 2**32 drew exactly seed 5's tokens.
    Every UINT64 seed (the LLM-API model's sampling_param_seed) is accepted; seeds below 2**32 draw
    what they always drew."""
    from trtcompress.runtime.sampling import make_generator

    prompt = _prompts(1, seed=8)[0]

    def tokens(seed: int) -> list[int]:
        return solo(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=seed, end_id=-1)).token_ids

    assert tokens(5) != tokens(5 + 2**32) != tokens(5 + 2**40)
    assert tokens(2**64 - 1) != tokens(2**32 - 1) and tokens(2**64 - 1) == tokens(2**64 - 1)
    assert torch.equal(make_generator(5).get_state(), torch.Generator().manual_seed(5).get_state())
    with pytest.raises(RequestError, match="seed must be an integer"):
        engine.add_request("hello", SamplingParams(temperature=1.0, seed=2**64))


def test_generate_queues_nothing_when_one_prompt_is_refused(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.generate(["the river", ""], GREEDY)
    assert not engine.has_work()
    with pytest.raises(RequestError, match="list of prompts"):  # not one prompt per character
        engine.generate("the river", GREEDY)
    assert not engine.has_work()


def test_a_failed_step_also_fails_requests_submitted_during_it(tiny_int4_artifact):
    """EngineLoop fails every request in flight when a step raises; one submitted while that step ran
    (still in the engine's inbox) is failed with them, not left to run for nobody."""
    import threading

    from trtcompress.runtime import EngineLoop

    engine = _engine(tiny_int4_artifact)
    real_step, calls = engine.step, []
    outs: dict[str, list] = {"first": [], "late": []}
    done = {name: threading.Event() for name in outs}

    def collector(name):
        def collect(out):
            outs[name].append(out)
            if out.finished:
                done[name].set()

        return collect

    def failing_step():
        calls.append(1)
        if len(calls) == 1:  # a request arrives while the step runs, then the step fails
            loop.submit("late request", GREEDY, collector("late"))
            raise RuntimeError("injected failure")
        return real_step()

    engine.step = failing_step
    loop = EngineLoop(engine)
    try:
        loop.submit("first request", GREEDY, collector("first"))
        assert done["first"].wait(30) and done["late"].wait(30)
        assert outs["first"][-1].finish_reason.startswith("error: injected")
        assert outs["late"][-1].finish_reason.startswith("error: injected")
        assert not engine.has_work() and len(outs["late"]) == 1  # nothing generated for it afterwards
    finally:
        loop.shutdown()


def test_generate_waits_for_its_own_requests_not_others(engine, solo):
    """generate() ended when as many requests had finished as it queued, counting others in flight
    (add_request): a short one finishing first made it return early with a KeyError."""
    a, b = _prompts(2, seed=17)
    other = engine.add_request(a, SamplingParams(max_tokens=2, end_id=-1))
    outs = engine.generate([b], GREEDY)
    assert outs[0].token_ids == solo(b).token_ids
    while engine.has_work():  # `other` finished during generate(): nothing left to run
        engine.step()
    assert other not in engine._by_request and engine.cache.free_blocks == engine.cache.num_blocks


def test_a_failed_generate_leaves_nothing_in_flight(tiny_int4_artifact, solo):
    """A step that raises inside generate() used to leave its requests running, holding KV blocks:
    the next generate() ran them again (with a cache they had partly written)."""
    eng = _engine(tiny_int4_artifact)
    real_forward, calls = eng.model.forward, []

    def failing_forward(work):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_forward(work)

    eng.model.forward = failing_forward
    prompts = _prompts(3, seed=19)
    with pytest.raises(RuntimeError, match="injected"):
        eng.generate(prompts, GREEDY)
    assert not eng.has_work() and not eng.scheduler.running
    assert eng.cache.free_blocks == eng.cache.num_blocks and not eng.cache.seqs
    assert eng.generate(prompts[:1], GREEDY)[0].token_ids == solo(prompts[0]).token_ids


def test_the_generation_configs_eos_ends_a_request_as_in_hf_generate(tiny_model_dir, tmp_path):
    """HF `generate` stops at the generation config's EOS ids (chat models list a second end token
    there only); the runtime looked at the tokenizer and model config only and generated past it."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = DeployConfig(
        max_batch_size=4, max_num_tokens=40, context_chunk_size=16, max_seq_len=128,
        max_tokens_in_paged_kv_cache=1024,
    )  # fmt: skip
    prompt = _prompts(1, seed=23)[0]
    full = Engine.from_path(model_dir, config, block_size=16).generate([prompt], GREEDY)[0].token_ids
    end = next(t for t in full[3:] if t != 0)  # a token generated after the first few
    gen_config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen_config, "eos_token_id": [0, end]}))
    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = ref[0, len(prompt) :].tolist()
    assert ref[-1] == end and len(ref) < 12
    out = Engine.from_path(model_dir, config, block_size=16).generate([prompt], SamplingParams(max_tokens=12))
    assert out[0].token_ids == ref and out[0].finish_reason == "stop"


def test_streaming_holds_back_only_text_that_could_start_a_stop_string(tiny_model):
    """Every delta used to lag len(stop) - 1 characters behind the text whatever they were (8 for
    "Question:"); only a suffix that starts a stop string has to wait. The joined deltas stay the text
    before the stop string."""
    from trtcompress.runtime.sequence import TextStream

    tok, stop = tiny_model.tokenizer, "Question:"
    ids = tok.encode("The answer is 42. Question: what next", add_special_tokens=False)
    stream, emitted, held = TextStream(tok, (stop,)), "", 0
    for i in range(1, len(ids) + 1):
        delta, hit = stream.update(ids[:i], final=False)
        emitted += delta
        if hit:
            break
        text = tok.decode(ids[:i], skip_special_tokens=True)
        rest = text[len(emitted) :]
        assert text.startswith(emitted) and stop.startswith(rest) and rest != stop
        held = max(held, len(rest))
    assert hit and emitted == "The answer is 42. " and held > 0  # (a start of "Question:" did wait)


def test_a_stop_string_never_matches_a_character_still_being_decoded(tiny_model):
    """A character split across tokens decodes as U+FFFD until its last byte arrives; a stop string
    ending in U+FFFD matched that placeholder and ended the request early, cutting the character."""
    from trtcompress.runtime.sequence import TextStream

    tok = tiny_model.tokenizer
    ids = tok.encode("ok 中文 done", add_special_tokens=False)
    texts = [tok.decode(ids[:i], skip_special_tokens=True) for i in range(1, len(ids) + 1)]
    assert any(t.endswith("\ufffd") for t in texts[:-1])  # the tokenizer does split a character
    for stop in ("\ufffd", " \ufffd"):
        stream, emitted = TextStream(tok, (stop,)), ""
        for i in range(1, len(ids) + 1):
            delta, hit = stream.update(ids[:i], final=i == len(ids))
            emitted += delta
            assert not hit, (stop, i)
        assert emitted == "ok 中文 done"
    stream = TextStream(tok, ("中",))  # a stop string made of the whole character still ends it
    hits = [stream.update(ids[:i], final=False)[1] for i in range(1, len(ids) + 1)]
    assert any(hits) and stream.text == "ok "


def test_a_thread_count_torch_cannot_take_is_refused_by_the_config():
    """`deploy.num_threads: 2**31` passed validation and the engine then died in torch.set_num_threads
    (ValueError: Overflow) when the server loaded the model."""
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="num_threads"):
        DeployConfig(num_threads=2**31)
    assert DeployConfig(num_threads=64).num_threads == 64


def test_the_step_history_is_bounded_as_asked(tiny_int4_artifact):
    """A served engine kept its last 100,000 step records in memory (about 48 MB at batch 8, measured)
    although serving reads the step log file only; it now keeps 1,000 (native_model), and any engine as
    many as asked."""
    config = DeployConfig(
        max_batch_size=8,
        max_num_tokens=40,
        context_chunk_size=16,
        max_seq_len=128,
        max_tokens_in_paged_kv_cache=1024,
    )
    eng = Engine.from_path(tiny_int4_artifact, config, block_size=16, step_history=3)
    eng.generate(_prompts(2, seed=29), SamplingParams(max_tokens=6, end_id=-1))
    assert len(eng.steps) == 3 and eng.steps[-1].step > 3
