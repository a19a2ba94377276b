"""`trtcompress bench serve`: load on a served model through tritonserver, with baselines from the same run.

1. Prompts of `prompt_tokens` tokens cut from real text (BoolQ passages), `output_tokens` new tokens
   each (end id disabled, so every request generates exactly that many: throughput is comparable).
2. HF `generate` on the same model and precision in this process, before the server starts (nothing else
   runs): batch 1 and a static batch of 16 (the reference the issue names).
3. `trtcompress serve`'s machinery: the native repository, a real tritonserver; for each concurrency
   level, that many client threads each send requests over tritonclient gRPC streaming until
   `num_requests` are done. Per request: time to first token (first streamed piece), inter-token
   latency (gaps between pieces), errors. Per level: requests/s, output tokens/s, and the runtime's
   mean batch size from its step log. Concurrency 1 is the one-request-at-a-time baseline.
Writes `serve_load.json` and `serve_load.png` into `output`.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any


def _pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between the two nearest ranks (numpy's default), so
    that p50 is the median for any count. Rounding the rank instead picked one sample, and Python's
    round-half-to-even made p50 of 8 or 32 values the upper middle one but of 6 the lower."""
    if not values:
        return None
    values = sorted(values)
    rank = q / 100 * (len(values) - 1)
    low = min(int(rank), len(values) - 1)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def make_prompts(tokenizer: Any, n: int, prompt_tokens: int) -> list[str]:
    from trtcompress.eval.datasets import boolq_passages_text

    ids = tokenizer.encode(boolq_passages_text())
    return [tokenizer.decode(ids[i * prompt_tokens : (i + 1) * prompt_tokens]) for i in range(n)]


def hf_baseline(model: Any, tokenizer: Any, prompts: list[str], output_tokens: int, batch: int) -> dict:
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=output_tokens, min_new_tokens=output_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(**{k: v[:, :8] for k, v in enc.items()}, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(**enc, **kwargs, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - t0
    new = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    return {"batch": batch, "seconds": seconds, "output_tokens": new, "tokens_per_s": new / seconds}


def load_level(grpc_url: str, model: str, prompts: list[str], concurrency: int, num_requests: int,
               output_tokens: int) -> dict:  # fmt: skip
    from trtcompress.client import generate_grpc, grpc_client

    lock = threading.Lock()
    next_index = [0]
    results: list[dict] = []

    def worker() -> None:
        client = grpc_client(grpc_url)  # (a loopback server: not through the environment's proxy)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= num_requests:
                        return
                    next_index[0] += 1
                t0 = time.perf_counter()
                try:
                    out = generate_grpc(grpc_url, model, prompts[i % len(prompts)], client=client,
                                        max_tokens=output_tokens, end_id=-1)  # fmt: skip
                    rec = {"ok": out.finish_reason == "length", "ttft": out.ttft, "itl": out.itl,
                           "seconds": time.perf_counter() - t0, "reason": out.finish_reason}  # fmt: skip
                except Exception as exc:  # counted as an error, the load goes on
                    rec = {"ok": False, "error": str(exc), "seconds": time.perf_counter() - t0}
                with lock:
                    results.append(rec)
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [g for r in ok for g in r["itl"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": [r.get("error") or r.get("reason") for r in results if not r["ok"]][:3],
        "seconds": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": len(ok) * output_tokens / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(itl, 50),
        "itl_p99_s": _pct(itl, 99),
        "latency_mean_s": statistics.fmean(r["seconds"] for r in ok) if ok else None,
    }


def summarize(levels: list[dict], baselines: list[dict]) -> dict:
    """The best level's throughput, against the concurrency-1 level and HF's baselines. A level where
    every request failed measured nothing: its throughput counts as none, never as the best."""
    top = max(levels, key=lambda lv: lv["output_tokens_per_s"] or 0.0)
    best = top["output_tokens_per_s"] or None
    one = next((lv["output_tokens_per_s"] for lv in levels if lv["concurrency"] == 1), None)
    summary = {
        "best_tokens_per_s": best,
        "best_concurrency": top["concurrency"] if best else None,
        "vs_one_at_a_time": best / one if best and one else None,  # the concurrency-1 level, wherever listed
        "errors": sum(lv["errors"] for lv in levels),
    }
    for base in baselines:
        summary[f"vs_hf_batch{base['batch']}"] = best / base["tokens_per_s"] if best else None
    return summary


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _batch_stats(step_log: Path, start_line: int) -> tuple[dict, int]:
    lines = step_log.read_text(encoding="utf-8").splitlines() if step_log.exists() else []
    steps = [json.loads(line) for line in lines[start_line:]]
    decode = [s for s in steps if s["decode_tokens"]]
    stats = {
        "steps": len(steps),
        "mean_batch_size": statistics.fmean(s["batch_size"] for s in steps) if steps else 0,
        "max_batch_size": max((s["batch_size"] for s in steps), default=0),
        "mean_step_ms": 1000 * statistics.fmean(s["seconds"] for s in decode) if decode else None,
    }
    return stats, len(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    xs = [lv["concurrency"] for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(xs, [lv["output_tokens_per_s"] for lv in levels], "o-", label="native runtime via tritonserver")
    for base in result["hf_baseline"]:
        a.axhline(base["tokens_per_s"], ls="--", color="gray" if base["batch"] == 1 else "black",
                  label=f"HF generate, static batch {base['batch']}")  # fmt: skip
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent streaming clients")
    a.set_ylabel("output tokens/s")
    a.legend(fontsize=8)
    b.plot(xs, [lv["ttft_p50_s"] for lv in levels], "o-", label="TTFT p50")
    b.plot(xs, [lv["ttft_p99_s"] for lv in levels], "o--", label="TTFT p99")
    b.plot(xs, [lv["itl_p50_s"] for lv in levels], "s-", label="inter-token p50")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent streaming clients")
    b.set_ylabel("seconds")
    b.legend(fontsize=8)
    fig.suptitle(result["summary"]["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_environment() -> dict:
    """What sets CPU speed here: threads, OpenMP's wait policy (PASSIVE sleeps between ops, which
    costs a many-small-ops decode step far more than HF's few large ones), the vector units."""
    import os

    import torch

    from trtcompress.runtime.linear import onednn_available

    flags = (
        Path("/proc/cpuinfo").read_text(encoding="utf-8").split() if Path("/proc/cpuinfo").exists() else []
    )
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "avx512f": "avx512f" in flags,
        "onednn_linear": onednn_available(),
    }


def run(target: str | Path, levels: list[int], num_requests: int, prompt_tokens: int, output_tokens: int,
        deploy_set: list[str], hf_baseline_on: bool, output: Path, log=print) -> dict:  # fmt: skip
    import os

    from trtcompress.cli_serve import _deploy
    from trtcompress.runtime.loading import is_artifact, load_for_runtime
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    path = Path(target)
    if not path.exists():
        from trtcompress.models import resolve_model

        path = resolve_model(str(target), log=log)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_for_runtime(path)
    prompts = make_prompts(tokenizer, max(64, max(levels)), prompt_tokens)
    baselines = []
    if hf_baseline_on:
        for batch in (1, 16):
            baselines.append(hf_baseline(model, tokenizer, prompts, output_tokens, batch))
            log(f"HF generate batch {batch}: {baselines[-1]['tokens_per_s']:.1f} tokens/s")
    del model
    deploy = _deploy(path if is_artifact(path) else None, tuple(deploy_set))
    step_log = output / "steps.jsonl"
    step_log.unlink(missing_ok=True)
    repo = write_native_repository(output / "repo", path, deploy, step_log=step_log)
    results = []
    with Server(repo, log_file=output / "tritonserver.log") as server:
        from trtcompress.client import generate_grpc

        generate_grpc(server.endpoints.grpc, deploy.model_name, prompts[0], max_tokens=2)  # warm-up
        _, line = _batch_stats(step_log, 0)
        for c in levels:
            n = max(num_requests, c) if c > 1 else min(num_requests, max(4, num_requests // 4))
            level = load_level(server.endpoints.grpc, deploy.model_name, prompts, c, n, output_tokens)
            level["runtime"], line = _batch_stats(step_log, line)
            results.append(level)
            tps, rps, ttft = level["output_tokens_per_s"], level["requests_per_s"], level["ttft_p50_s"]
            batch = level["runtime"]["mean_batch_size"]
            log(f"concurrency {c}: {_num(tps, '.1f')} tokens/s, {_num(rps, '.2f')} req/s, "
                f"TTFT p50 {_num(ttft, '.2f')} s, errors {level['errors']}, "
                f"mean batch {_num(batch, '.1f')}")  # fmt: skip
    title = (  # the target as named (a model spec resolves to a cache directory, smollm2-135m-v1)
        f"{Path(target).name}: {prompt_tokens}-token prompts, {output_tokens} new tokens, "
        f"max_batch_size {deploy.max_batch_size}, {os.cpu_count()} CPUs"
    )
    summary = {"title": title} | summarize(results, baselines)
    result = {
        "target": str(path),
        "deploy": deploy.model_dump(),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "load_average_at_start": os.getloadavg(),
        "environment": cpu_environment(),
        "hf_baseline": baselines,
        "levels": results,
        "summary": summary,
    }
    (output / "serve_load.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(result, output / "serve_load.png")
    return result
