"""KV memory and decode throughput of the native runtime, against another checkout of the code in the
same run (e.g. the commit before attention read the compressed blocks directly).

    git worktree add /tmp/wt-old <commit>
    python benchmarks/runtime_kv_memory.py --baseline /tmp/wt-old [--out FILE.json]

Each configuration runs in its own subprocess with PYTHONPATH set to the checkout under test, on
SmolLM2-135M fp32 (greedy, end id off), one after the other:
- `short`: 8 sequences of 64 prompt tokens + 64 new tokens, all in one running batch;
- `long`: 4 sequences of 1,000 prompt tokens + 24 new tokens (context about 1k).
Per configuration: decode tokens/s (decode-only steps), and the KV bytes resident per sequence at the
peak: the paged cache's accounting (compressed blocks + fp16 tail + sink), the old runtime's fp32
per-sequence view, the new runtime's bounded decompressed-block cache (shared, counted in full) and
the transient attention scratch of one (layer, sequence).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"short": (8, 64, 64), "long": (4, 1000, 24)}  # sequences, prompt tokens, new tokens


def _commit(checkout: Path) -> str:
    """The checkout's HEAD commit (plus "+dirty" with uncommitted changes), not its path."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    return head + ("+dirty" if dirty else "")


def worker(codec: str, scenario: str, budget_mb: float | None) -> dict:
    import torch

    import trtcompress
    from trtcompress.eval.datasets import boolq_passages_text
    from trtcompress.kv import get_codec
    from trtcompress.models import load_model
    from trtcompress.runtime import Engine, SamplingParams
    from trtcompress.runtime.config import DeployConfig

    n_seqs, prompt_len, new = SCENARIOS[scenario]
    loaded = load_model("smollm2-135m", log=lambda m: None)
    tok = loaded.tokenizer
    ids = tok.encode(boolq_passages_text()[:400_000])
    prompts = [ids[i * prompt_len : (i + 1) * prompt_len] for i in range(n_seqs)]
    deploy = dict(
        max_batch_size=n_seqs, max_num_tokens=n_seqs + 128, max_seq_len=prompt_len + new + 1,
        max_tokens_in_paged_kv_cache=n_seqs * (prompt_len + new + 64),
    )  # fmt: skip
    if budget_mb is not None:
        deploy["kv_decompressed_cache_mb"] = budget_mb
    engine = Engine(loaded.model, tok, DeployConfig(**deploy), kv_codec=get_codec(codec), block_size=64)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, end_id=-1))  # warm-up
    engine.steps.clear()
    model, cache = engine.model, engine.cache
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=new, end_id=-1))
    peak: dict[str, float] = {"length": 0, "decompressed_cache_bytes": 0}
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        peak["decompressed_cache_bytes"] = max(
            peak["decompressed_cache_bytes"], getattr(model, "decompressed_bytes", 0)
        )
        if not cache.seqs:
            continue
        seq_id, seq = max(cache.seqs.items(), key=lambda item: item[1].length)
        if seq.length >= peak["length"]:  # the longest sequence: its own bytes
            view = getattr(model, "views", {}).get(seq_id)
            peak["length"] = seq.length
            peak["cache_bytes_per_seq"] = cache.bytes_used(seq_id)
            peak["view_bytes_per_seq"] = 0 if view is None else view.numel() * view.element_size()
    # new code: the transient scratch of one layer holds at most max(context, longest sequence) tokens
    peak["scratch_bound_bytes"] = (
        0 if hasattr(model, "views") else 2 * cache.num_kv_heads * cache.head_dim * 4 * engine.context_len
    )
    wall = time.perf_counter() - t0
    decode = [s for s in engine.steps if s.prefill_tokens == 0 and s.decode_tokens]
    return {
        "commit": _commit(Path(trtcompress.__file__).parent.parent),
        "codec": codec,
        "scenario": scenario,
        "budget_mb": budget_mb,
        "threads": torch.get_num_threads(),
        "decode_tokens_per_s": sum(s.decode_tokens for s in decode) / sum(s.seconds for s in decode),
        "wall_s": wall,
        **peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the code to compare with")
    parser.add_argument("--scenarios", default="short,long")
    parser.add_argument("--codecs", default="fp16,gear-2bit")
    parser.add_argument("--budgets", default="0,64,256", help="kv_decompressed_cache_mb values to run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/runtime_kv_memory.json")
    parser.add_argument(
        "--worker", nargs=3, metavar=("CODEC", "SCENARIO", "BUDGET_MB"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        codec, scenario, budget = args.worker
        print(json.dumps(worker(codec, scenario, None if budget == "-" else float(budget))))
        return
    runs = []
    for scenario in args.scenarios.split(","):
        for codec in args.codecs.split(","):
            # the baseline, then this checkout with each decompressed-block budget (MiB)
            configs = [(args.baseline, "-")] + [(ROOT, b) for b in args.budgets.split(",")]
            for code, budget in configs:
                env = dict(os.environ, PYTHONPATH=str(code), PYTHONWARNINGS="ignore")
                cmd = [
                    sys.executable,
                    __file__,
                    "--baseline",
                    str(args.baseline),
                    "--worker",
                    codec,
                    scenario,
                    budget,
                ]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                run = json.loads(out.strip().splitlines()[-1])
                run["label"] = "baseline" if code == args.baseline else f"this, {budget} MiB"
                print(json.dumps(run), flush=True)
                runs.append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
