"""Randomized (seeded) property check of in-flight batching: random arrivals, prompt lengths from 1 token to
the context, max_tokens, stop conditions, seeded sampling and cancellations in every phase (queued,
mid-prefill, mid-decode, preempted, after the end), under both KV policies with pools and token budgets
small enough to force preemption and chunking, fp16 and a compressed codec. After every step: the token
budget and the batch bound hold, every block and tail slot is either free or held by exactly one running
sequence whose cache length is what it computed, and guaranteed_no_evict never preempts. At the end:
everything is freed, each request ended exactly once, for a reason it can have, its stream adds up to its
final output, and its tokens are those it gets alone (a cancelled one: a prefix of them)."""

from __future__ import annotations

import random

import pytest

from trtcompress.kv import get_codec
from trtcompress.runtime import Engine, RequestError, SamplingParams
from trtcompress.runtime.config import DeployConfig
from trtcompress.runtime.sequence import Status

CANCEL_PHASES = ("queued", "prefill", "decode", "preempted", "after")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from trtcompress.runtime.loading import load_for_runtime

    model, tokenizer, _ = load_for_runtime(tiny_model_dir)
    return model, tokenizer


def _spec(rng: random.Random, policy: str, codec: str) -> dict:
    bs = 16 if codec == "kivi-2bit" else rng.choice([2, 4, 8])
    max_seq_len = rng.choice([24, 40]) if codec == "kivi-2bit" else rng.choice([17, 24, 40])
    max_batch_size = rng.randint(2, 6)
    chunk = rng.choice([1, 3, 8])
    return dict(
        codec=codec,
        bs=bs,
        sink=rng.choice([0, 1]),
        deploy=dict(
            max_batch_size=max_batch_size,
            max_num_tokens=max_batch_size + chunk + rng.choice([0, 2]),
            max_seq_len=max_seq_len,
            context_chunk_size=chunk,
            batch_scheduler_policy=policy,
            max_tokens_in_paged_kv_cache=max(16, max_seq_len + rng.choice([0, 1, bs])),  # ~one sequence
            kv_decompressed_cache_mb=rng.choice([0, 64]),
        ),
    )


def _engine(tiny, spec: dict) -> Engine:
    codec = get_codec(spec["codec"], **({"group": 16} if spec["codec"] == "kivi-2bit" else {}))
    return Engine(
        *tiny, DeployConfig(**spec["deploy"]), kv_codec=codec, block_size=spec["bs"], sink_tokens=spec["sink"]
    )


def _requests(rng: random.Random, ctx: int, n: int) -> list[dict]:
    reqs = []
    for i in range(n):
        plen = rng.choice([1, rng.randint(ctx - 3, ctx - 1), rng.randint(1, ctx - 1)])
        max_tokens = rng.choice([1, ctx - plen, rng.randint(1, ctx - plen)])
        kw: dict = dict(max_tokens=max_tokens, end_id=-1)
        r = rng.random()
        if r < 0.15:
            kw["stop"] = ("e", " a")
        elif r < 0.25:
            kw["end_id"] = None
        elif r < 0.35:
            kw.update(temperature=0.8, seed=rng.randrange(1 << 40))
        reqs.append(
            dict(
                rid=f"r{i}",
                prompt=[rng.randrange(1, 512) for _ in range(plen)],
                params=SamplingParams(**kw),
                arrival=rng.choice([0, 0, rng.randint(0, 6), rng.randint(0, 25)]),
                cancel=rng.choices([None, *CANCEL_PHASES], [6, 1, 1, 1, 3, 1])[0],
            )
        )
    return reqs


def _wants_cancel(phase: str, seq, finished: bool) -> bool:
    if phase == "after":
        return finished
    if seq is None:
        return False
    return {
        "queued": seq.status is Status.WAITING and seq.num_computed == 0,
        "prefill": seq.status is Status.RUNNING and 0 < seq.num_computed < seq.prompt_len,
        "decode": seq.status is Status.RUNNING and len(seq.generated) >= 1,
        "preempted": seq.status is Status.WAITING and seq.preemptions > 0,
    }[phase]


def _check_step(engine: Engine, plan) -> None:
    cfg, sched, cache = engine.config, engine.scheduler, engine.cache
    assert sum(w.n for w in plan.work) <= cfg.max_num_tokens
    assert len(plan.work) <= cfg.max_batch_size and len(sched.running) <= cfg.max_batch_size
    assert len({w.seq.seq_id for w in plan.work}) == len(plan.work)
    for w in plan.work:
        assert w.n == 1 if w.start >= w.seq.prompt_len else w.n <= cfg.prefill_chunk
    if cfg.batch_scheduler_policy == "guaranteed_no_evict":
        assert not plan.preempted
        assert sched.promised_blocks() <= cache.free_blocks
    held = [b for s in cache.seqs.values() for b in s.blocks]
    assert sorted(held + cache._free_blocks) == list(range(cache.num_blocks))  # no leak, no double free
    slots = [s.slot for s in cache.seqs.values()] + cache._free_slots
    assert sorted(slots) == list(range(cache.max_seqs))
    assert set(cache.seqs) == {s.seq_id for s in sched.running}
    for s in sched.running:
        state = cache.seqs[s.seq_id]
        assert state.length == s.num_computed and len(state.blocks) == state.length // cache.block_size
    assert all(s.num_computed == 0 and not s.cancelled for s in sched.waiting)
    assert {seq_id for seq_id, _ in engine.model.blocks.entries} <= set(cache.seqs)


def _run(engine: Engine, reqs: list[dict], solo: Engine, seen: dict) -> None:
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    ctx = engine.context_len
    outs: dict[str, list] = {}
    final: dict[str, object] = {}
    cancelled: set[str] = set()
    pending = sorted(reqs, key=lambda r: r["arrival"])
    step = 0
    while pending or engine.has_work():
        while pending and pending[0]["arrival"] <= step:
            r = pending.pop(0)
            too_long = SamplingParams(max_tokens=len(r["prompt"]))  # one token past the context
            with pytest.raises(RequestError):  # can never fit: refused at once, never queued
                engine.add_request([1] * (ctx - len(r["prompt"]) + 1), too_long)
            engine.add_request(r["prompt"], r["params"], request_id=r["rid"])
            outs[r["rid"]] = []
        for r in reqs:
            rid = r["rid"]
            due = r["cancel"] and rid in outs and rid not in cancelled
            if due and _wants_cancel(r["cancel"], engine._by_request.get(rid), rid in final):
                engine.cancel(rid)
                cancelled.add(rid)
                seen[r["cancel"]] = seen.get(r["cancel"], 0) + 1
        for out in engine.step():
            assert out.request_id not in final  # nothing after a request's last output
            outs[out.request_id].append(out)
            if out.finished:
                final[out.request_id] = out
        _check_step(engine, plans[-1])
        seen["preempted_total"] = seen.get("preempted_total", 0) + len(plans[-1].preempted)
        step += 1
        assert step < 2000, "a request never finished"
    engine.scheduler.schedule = schedule
    cache = engine.cache
    assert cache.free_blocks == cache.num_blocks and not cache.seqs and cache.bytes_used() == 0
    assert engine.model.decompressed_bytes == 0 and not engine._by_request
    for r in reqs:
        rid, params, out = r["rid"], r["params"], final[r["rid"]]
        assert sum(o.finished for o in outs[rid]) == 1
        assert [t for o in outs[rid] for t in o.delta_token_ids] == out.token_ids
        assert "".join(o.delta_text for o in outs[rid]) == out.text
        ref = solo.generate([r["prompt"]], params)[0]
        if out.finish_reason == "cancelled":
            assert rid in cancelled and r["cancel"] != "after"
            assert ref.token_ids[: len(out.token_ids)] == out.token_ids
            continue
        assert rid not in cancelled or r["cancel"] == "after", f"{rid} cancelled in flight"
        if params.end_id == -1 and not params.stop:
            assert out.finish_reason == "length" and len(out.token_ids) == params.max_tokens
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)


@pytest.mark.parametrize("codec", ["fp16", "kivi-2bit"])
def test_random_workloads_keep_the_scheduler_invariants(tiny, codec):
    rng = random.Random(f"scheduler-{codec}")
    seen: dict[str, int] = {}
    for policy in ("guaranteed_no_evict", "max_utilization") * 5:
        spec = _spec(rng, policy, codec)
        engine, solo = _engine(tiny, spec), _engine(tiny, spec)
        for _ in range(2):  # the same engine serves a second workload after the first one drained
            _run(engine, _requests(rng, engine.context_len, rng.randint(4, 8)), solo, seen)
    assert seen.get("preempted_total", 0) > 0  # the workloads really exercise preemption ...
    assert all(seen.get(phase, 0) > 0 for phase in CANCEL_PHASES), seen  # ... and every cancel phase
