"""The native runtime's CPU GEMM libraries on SmolLM2-135M's real weights, same run: MKL (`F.linear`,
`deploy.cpu_gemm: blas`) against oneDNN with the weights reordered once (`cpu_gemm: onednn`).

    python benchmarks/cpu_gemm.py [OUT.json] [--rows 1,4,16,32,64,1024] [--reps 3]

For each row count M: the time of every linear of one forward step (30 layers' fused q|k|v, o,
fused gate|up and down, plus the lm_head where M <= 64, i.e. decode; prefill computes logits for one
row per sequence), best of `--reps`, the two libraries alternated. Also checks what the runtime's
start-up probe checks: that each library gives a row the same bits for every M >= 4.
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
import torch.nn.functional as F


def smollm2_weights() -> tuple[list[torch.Tensor], torch.Tensor]:
    """The runtime's fused layer weights and the lm_head of SmolLM2-135M, float32."""
    from transformers import AutoModelForCausalLM

    from trtcompress.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m", log=lambda m: None))
    weights = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        weights += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight]
        weights += [torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    return [
        w.detach().float().contiguous() for w in weights
    ], model.lm_head.weight.detach().float().contiguous()


def step_seconds(linear, weights: list[torch.Tensor], head: torch.Tensor | None, rows: int) -> float:
    inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
    start = time.perf_counter()
    for w in weights:
        linear(inputs[w.shape[1]], w)
    if head is not None:
        linear(inputs[head.shape[1]], head)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="benchmarks/results/cpu_gemm.json")
    ap.add_argument("--rows", default="1,4,16,32,64,1024")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from trtcompress.bench_serve import cpu_environment
    from trtcompress.runtime.linear import (
        onednn_available,
        onednn_linear,
        onednn_pack,
        probe_batch_invariance,
    )

    if not onednn_available():
        raise SystemExit(f"this torch ({torch.__version__}) has no oneDNN linear: nothing to compare")
    weights, head = smollm2_weights()
    rows_list = [int(r) for r in args.rows.split(",")]
    packed = [onednn_pack(w, max(rows_list)) for w in weights]
    packed_head = onednn_pack(head, max(rows_list))
    env = cpu_environment()
    result = {
        "machine": platform.processor() or platform.machine(),
        "avx512f": env["avx512f"],
        "torch": env["torch"],
        "threads": env["torch_threads"],
        "rows": [],
    }
    with torch.inference_mode():
        for rows in rows_list:
            decode = rows <= 64
            best = {"blas": float("inf"), "onednn": float("inf")}
            step_seconds(F.linear, weights, head if decode else None, rows)  # warm-up
            step_seconds(onednn_linear, packed, packed_head if decode else None, rows)
            for _ in range(args.reps):
                best["blas"] = min(
                    best["blas"], step_seconds(F.linear, weights, head if decode else None, rows)
                )
                best["onednn"] = min(
                    best["onednn"], step_seconds(onednn_linear, packed, packed_head if decode else None, rows)
                )
            flops = 2 * rows * (sum(w.numel() for w in weights) + (head.numel() if decode else 0))
            row = {
                "rows": rows,
                "lm_head": decode,
                "ms": {k: v * 1e3 for k, v in best.items()},
                "gflops": {k: flops / v / 1e9 for k, v in best.items()},
                "speedup_onednn": best["blas"] / best["onednn"],
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        shapes = {tuple(w.shape): i for i, w in enumerate(weights)}
        sample = [weights[i] for i in shapes.values()] + [head]
        result["batch_invariant_m_ge_4"] = {
            "blas": probe_batch_invariance(sample, 512),
            "onednn": probe_batch_invariance(
                [packed[i] for i in shapes.values()] + [packed_head], 512, linear=onednn_linear
            ),
        }
    print(json.dumps(result["batch_invariant_m_ge_4"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
