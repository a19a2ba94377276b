"""Batched decode attention vs the per-sequence path in the native runtime, same run, same engine (CPU).

    python benchmarks/runtime_decode_cpu.py OUT.json [--requests 1,32] [--new 64] [--reps 2]

SmolLM2-135M (real weights, float32), fp16 KV cache, for each of `--requests`, that many greedy
requests of GSM8K questions cut at 64 tokens (many are shorter: 55 tokens on average over the first 32)
submitted at once (offline `Engine.generate`,
in-flight batching), `--new` tokens each (end id off, so both sides do the same work). The engine is
built once; its decode tokens
go through `decode_attention.batched_decode_attention` (one batched attention per layer) or, with
`BatchedModel.batched_decode` off, through a scratch + SDPA per sequence; the two alternate for
`--reps` repetitions and the best of each is kept. Checks that both paths give the same greedy tokens.
Also counts the aten ops of one steady-state decode step of the whole batch (the second step with
every request decoding) on each path: on a GPU each non-view op is a kernel launch, which is what a
decode step of a 135M model costs there (benchmarks/results/runtime_gpu_h100_cprofile.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

VIEW_OPS = {  # aten ops that only make views (no kernel on a GPU)
    "view", "permute", "select", "slice", "unsqueeze", "transpose", "reshape", "alias", "expand", "split",
    "split_with_sizes", "chunk", "detach", "detach_", "lift_fresh", "unbind", "_unsafe_view",
}  # fmt: skip


def count_decode_step_ops(engine, prompts: list[list[int]]) -> dict:
    """aten ops (all, and without view-only ops) of the second all-decode step of `prompts`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trtcompress.runtime import SamplingParams

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, forward, seen = engine.model, engine.model.forward, []

    def counted(work):
        if len(work) == len(prompts) and all(w.n == 1 for w in work) and len(seen) < 2:
            with Count() as c:
                out = forward(work)
            seen.append(c.ops)
            return out
        return forward(work)

    model.forward = counted
    try:
        engine.generate(prompts, SamplingParams(max_tokens=4, end_id=-1))
    finally:
        del model.forward
    ops = seen[-1]
    return {"aten_ops": len(ops), "non_view_ops": sum(op not in VIEW_OPS for op in ops)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--requests", default="1,32", help="comma-separated request counts")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtcompress.eval.datasets import gsm8k_problems
    from trtcompress.kv import get_codec
    from trtcompress.models import resolve_model
    from trtcompress.runtime import Engine, SamplingParams
    from trtcompress.runtime.config import DeployConfig

    model_dir = resolve_model("smollm2-135m", log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    levels = [int(n) for n in args.requests.split(",")]
    questions = [p.question for p in gsm8k_problems(max(levels))]
    all_prompts = [tokenizer(q)["input_ids"][:64] for q in questions]
    context = 64 + max(args.new, 4) + 1  # count_decode_step_ops generates 4 tokens
    config = DeployConfig(max_batch_size=max(levels), max_num_tokens=1024, max_seq_len=context,
                          max_tokens_in_paged_kv_cache=max(levels) * (context + 64))  # fmt: skip
    engine = Engine(model, tokenizer, config, kv_codec=get_codec("fp16"))
    params = SamplingParams(max_tokens=args.new, end_id=-1)
    engine.generate([all_prompts[0][:8]], SamplingParams(max_tokens=2, end_id=-1))  # warm-up
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "new_tokens": args.new,
        "prompt_tokens_max": 64,  # GSM8K questions cut at 64 tokens; many are shorter (per level below)
        "kv": "fp16",
        "precision": "float32",
        "levels": [],
    }
    for n in levels:
        prompts = all_prompts[:n]
        best: dict[str, float] = {}
        tokens: dict[str, list[list[int]]] = {}
        for _ in range(args.reps):
            for batched in (True, False):
                engine.model.batched_decode = batched
                name = "batched" if batched else "per_sequence"
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params)
                seconds = time.perf_counter() - t0
                best[name] = min(best.get(name, float("inf")), seconds)
                tokens[name] = [o.token_ids for o in outs]
                print(f"{n:3d} requests {name:13s} {seconds:7.2f} s", flush=True)
        step_ops = {}
        for batched in (True, False):
            engine.model.batched_decode = batched
            step_ops["batched" if batched else "per_sequence"] = count_decode_step_ops(engine, prompts)
        n_tokens = sum(len(t) for t in tokens["batched"])
        result["levels"].append({
            "requests": n,
            "prompt_tokens_mean": sum(len(p) for p in prompts) / n,
            "best_seconds": best,
            "tokens_per_s": {k: n_tokens / v for k, v in best.items()},
            "speedup_batched": best["per_sequence"] / best["batched"],
            "same_greedy_tokens": tokens["batched"] == tokens["per_sequence"],
            "decode_step_ops": step_ops,
        })  # fmt: skip
        print(json.dumps(result["levels"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
