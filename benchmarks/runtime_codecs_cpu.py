"""What a compressed KV cache costs the native runtime on CPU, same run: decode throughput, KV bytes held,
and greedy agreement with the fp16 cache.

    python benchmarks/runtime_codecs_cpu.py [OUT.json] [--codecs fp16,gear-2bit,...] [--requests 32]
        [--new 128] [--reps 2]

SmolLM2-135M fp32, `--requests` prompts of 64 tokens cut from BoolQ passages (the serving benchmark's),
submitted at once to the offline engine (in-flight batching, `Engine.generate`), `--new` greedy tokens
each (end id off). Per codec: tokens/s (best of `--reps`, codecs alternated), the peak KV bytes the
paged cache held (its own accounting: compressed blocks + fp16 tails + sink rows) and the peak of the
bounded decompressed-block cache (`--decompressed-mb`), how many sequences equal the fp16 cache's
tokens, and how many tokens they keep equal on average before they part. A codec name may
carry options after a colon, e.g. `gear-2bit:outlier_dtype=fp8`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def parse_codec(spec: str):
    from trtcompress.kv import get_codec

    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        try:  # numbers and booleans as such (key_rank=2), anything else as a string (outlier_dtype=fp8)
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return get_codec(name, **options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="benchmarks/results/runtime_codecs_cpu.json")
    ap.add_argument("--codecs", default="fp16,gear-2bit,gear-2bit:outlier_dtype=fp16,kivi-2bit")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--decompressed-mb", type=float, default=64, help="deploy.kv_decompressed_cache_mb")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trtcompress.bench_serve import make_prompts
    from trtcompress.models import resolve_model
    from trtcompress.runtime import Engine, SamplingParams
    from trtcompress.runtime.config import DeployConfig

    model_dir = resolve_model("smollm2-135m", log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in make_prompts(tokenizer, args.requests, 64)]
    config = DeployConfig(
        max_batch_size=args.requests,
        max_seq_len=64 + args.new + 64,
        kv_decompressed_cache_mb=args.decompressed_mb,
    )
    params = SamplingParams(max_tokens=args.new, end_id=-1)
    specs = args.codecs.split(",")
    engines = {spec: Engine(model, tokenizer, config, kv_codec=parse_codec(spec)) for spec in specs}
    for engine in engines.values():
        engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, end_id=-1))  # warm-up
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    peaks: dict[str, tuple[int, int]] = {}
    for _ in range(args.reps):
        for spec, engine in engines.items():
            first = len(engine.steps)
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            best[spec] = min(best.get(spec, float("inf")), time.perf_counter() - start)
            tokens[spec] = [o.token_ids for o in outs]
            steps = list(engine.steps)[first:]
            peaks[spec] = (max(s.kv_bytes for s in steps), max(s.decompressed_bytes for s in steps))
            print(f"{spec:32s} {args.requests * args.new / best[spec]:7.1f} tokens/s", flush=True)
    reference = tokens.get("fp16")
    rows = []
    for spec in specs:
        row = {
            "codec": spec,
            "tokens_per_s": args.requests * args.new / best[spec],
            "vs_fp16": best.get("fp16", float("nan")) / best[spec],
            "peak_kv_bytes": peaks[spec][0],
            "peak_decompressed_bytes": peaks[spec][1],
            "same_tokens_as_fp16": None if reference is None else sum(
                a == b for a, b in zip(tokens[spec], reference, strict=True)
            ),
            "mean_tokens_before_divergence": None if reference is None else sum(
                next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                for a, b in zip(tokens[spec], reference, strict=True)
            ) / len(reference),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"requests": args.requests, "prompt_tokens": 64, "new_tokens": args.new,
              "kv_decompressed_cache_mb": args.decompressed_mb, "threads": torch.get_num_threads(),
              "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
