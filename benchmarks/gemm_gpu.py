"""W4A16 (and W4A4) GEMM kernels vs torch fp16/bf16 matmul on a GPU. Needs only torch and triton.

    python benchmarks/gemm_gpu.py OUT.json [--quick] [--smoke] [--gemv-only]

Imports only `trtcompress/plugins/{w4a16_gemm,w4a4_fp4_gemm}/{kernel,reference}.py` (plain torch +
triton; the package `__init__`s import nothing), so it runs on a GPU box without the project's other
dependencies. For each K = N in {4096, 11008, 14336} it tunes the tensor-core GEMV ("gemv_tc") at
M = 1 over a small grid (block sizes, split-K, then warps / stages around the best two, then the
inline-PTX dequantization `deq_asm`, then with `--stream-k` the stream-K schedule; every config in
try/except, failures recorded as strings in `gemv_tc_tuning`) and the packed-fp16 GEMV ("gemv_h2",
its own grid), runs the elementwise GEMV ("gemv") with its best config of the last H100 run, then
times M = 1, 2, 4, 8, 16 (the three GEMVs, gemv_tc also with bf16 x; the GEMM path
at 16) and prefill M = 512 / 2048 (the tl.dot GEMM, and the tensor-core GEMV in row tiles, each tuned
at M = 2048), each against torch.matmul with the dequantized fp16 and bf16 weight (the same math).
Every kernel result is checked against the reference first. Timings: median of
`triton.testing.do_bench` (CUDA events, L2 flushed between runs). `--gemv-only` skips the GEMM path,
the prefill rows and W4A4; `--h2-only` tunes only the packed-fp16 GEMV (gemv_tc with the op's
config); `--quick` runs K = N = 4096 only. `--smoke` runs tiny shapes on CPU under
TRITON_INTERPRET=1 (a check of the script itself, no timings worth reading; `deq_asm` fails there by
design and is recorded as such).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
GEMV_ONLY = "--gemv-only" in sys.argv
QUICK = "--quick" in sys.argv  # one size
STREAM_K = "--stream-k" in sys.argv  # tune gemv_tc's stream-K schedule too (no gain in the fourth run)
H2_ONLY = "--h2-only" in sys.argv  # tune the packed-fp16 GEMV only; gemv_tc runs with the op's config
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from trtcompress.plugins.w4a4_fp4_gemm.kernel import w4a4_fp4_gemm_triton  # noqa: E402
from trtcompress.plugins.w4a4_fp4_gemm.reference import w4a4_fp4_gemm_reference  # noqa: E402
from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_triton  # noqa: E402
from trtcompress.plugins.w4a16_gemm.reference import dequantize_w4, w4a16_gemm_reference  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
GROUP = 128


def bench(fn) -> float:
    """Median milliseconds."""
    if DEVICE == "cuda":
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def make_weight(n: int, k: int, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qweight = torch.randint(0, 256, (n, (k + 1) // 2), generator=g, device=DEVICE, dtype=torch.uint8)
    scales = (torch.rand(n, triton.cdiv(k, GROUP), generator=g, device=DEVICE) * 0.01 + 0.001).half()
    return qweight, scales


def check(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() + 1e-6
    if err > 1e-2 * scale:
        raise AssertionError(f"kernel differs from the reference: max err {err} (max |ref| {scale})")
    return err / scale


# best "gemv" configs of benchmarks/results/gemm_gpu_h100.json (H100, triton 3.6), to save tuning time
OLD_GEMV_BEST = {
    4096: dict(block_n=32, block_k=512, split_k=4, num_warps=4),
    11008: dict(block_n=16, block_k=512, split_k=4, num_warps=4),
    14336: dict(block_n=16, block_k=512, split_k=4, num_warps=4),
}


def old_gemv_config(k: int) -> dict:
    if SMOKE:
        return dict(block_n=16, block_k=32, split_k=2, num_warps=4)
    return OLD_GEMV_BEST.get(k, OLD_GEMV_BEST[4096])


def _time_config(x, qweight, scales, ref, cfg, path: str = "gemv_tc") -> dict:
    """{"config", "ms", "rel_err"} or {"config", "error"}: a config the compiler refuses, that fails at run
    time or differs from the reference."""

    def run():
        return w4a16_gemm_triton(x, qweight, scales, None, GROUP, True, path=path, **cfg)

    try:
        rel = check(run(), ref)
        return {"config": cfg, "ms": bench(run), "rel_err": rel}
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  {path} {cfg}: {msg}", file=sys.stderr)
        return {"config": cfg, "error": msg}


def _ranked(tried: list[dict]) -> list[dict]:
    return sorted((t for t in tried if "ms" in t), key=lambda t: t["ms"])


def _tiles_then_launches(x, qweight, scales, ref, path: str, first: list[dict], warps_stages) -> list[dict]:
    """Every config of `first` (tiles, split-K), then (warps, stages) around the best two: all tried."""
    tried = [_time_config(x, qweight, scales, ref, cfg, path) for cfg in first]
    ok = _ranked(tried)
    assert ok, f"no {path} config ran"
    for top in ok[:2]:
        for nw, ns in warps_stages:
            cfg = {**top["config"], "num_warps": nw, "num_stages": ns}
            if cfg != top["config"]:
                tried.append(_time_config(x, qweight, scales, ref, cfg, path))
    return tried


def tune_gemv_tc(x, qweight, scales) -> tuple[dict, list[dict]]:
    """Best gemv_tc config at x's M and every config tried. Stage 1: block sizes and split-K at 4 warps,
    3 stages; stage 2: warps x stages around the best two; stage 3: deq_asm on the best config; stage 4:
    the stream-K schedule on the best two (programs per SM x stages)."""
    ref = w4a16_gemm_reference(x, qweight, scales, None, GROUP, True)
    if SMOKE:
        base = [(16, 64, 1), (32, 128, 1), (16, 128, 2)]
        warps_stages = [(4, 2)]
        per_sm_counts = [1, 2]
    else:
        base = [
            (32, 256, 1), (32, 512, 2), (32, 256, 4), (32, 512, 4),
            (64, 256, 1), (64, 512, 1), (64, 256, 2), (64, 512, 2), (64, 256, 4), (64, 256, 8),
            (64, 128, 8), (128, 256, 1), (128, 512, 1), (128, 256, 4), (64, 128, 1),
        ]  # fmt: skip
        warps_stages = [(4, 2), (4, 4), (8, 2), (8, 3), (8, 4)]
        per_sm_counts = [1, 2, 3, 4, 6, 8] if STREAM_K else []
    first = [
        dict(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=3 if not SMOKE else 2)
        for bn, bk, sk in base
    ]
    tried = _tiles_then_launches(x, qweight, scales, ref, "gemv_tc", first, warps_stages)
    ok = _ranked(tried)
    tried.append(_time_config(x, qweight, scales, ref, {**ok[0]["config"], "deq_asm": True}))
    # stage 4: stream-K (equal runs of steps for a fixed number of programs per SM) on the best two
    # tiles with split-K off, over programs per SM and a deeper pipeline
    for top in ok[:2]:
        for per_sm in per_sm_counts:
            for ns in (top["config"]["num_stages"], 4):
                cfg = {**top["config"], "split_k": 1, "stream_k": per_sm, "num_stages": ns}
                tried.append(_time_config(x, qweight, scales, ref, cfg))
    best = min((t for t in tried if "ms" in t), key=lambda t: t["ms"])
    return best["config"], tried


def tune_gemv_h2(x, qweight, scales) -> tuple[dict, list[dict]]:
    """Best packed-fp16 GEMV ("gemv_h2") config at x's M and every config tried. Stage 1: tiles and
    split-K at 4 warps, 2 stages, fp16 runs of 8 bytes; stage 2: warps x stages around the best two;
    stage 3: longer fp16 runs (16, 32 bytes) on the best."""
    ref = w4a16_gemm_reference(x, qweight, scales, None, GROUP, True)
    if SMOKE:
        base, warps_stages = [(16, 128, 1), (32, 128, 2)], [(2, 1)]
    else:
        base = [
            (16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 256, 8), (32, 512, 4), (64, 128, 8),
            (64, 256, 2), (64, 256, 4), (64, 256, 8), (64, 512, 4), (128, 128, 4), (128, 256, 4),
            (128, 256, 8), (32, 128, 16), (128, 512, 8), (128, 256, 16), (256, 256, 4), (256, 256, 8),
            (256, 128, 16),
        ]  # fmt: skip
        warps_stages = [(2, 2), (4, 1), (4, 3), (8, 2), (8, 3)]
    first = [
        dict(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=2, h2_sub=8) for bn, bk, sk in base
    ]
    tried = _tiles_then_launches(x, qweight, scales, ref, "gemv_h2", first, warps_stages)
    ok = _ranked(tried)
    for sub in (16, 32):
        tried.append(_time_config(x, qweight, scales, ref, {**ok[0]["config"], "h2_sub": sub}, "gemv_h2"))
    best = min((t for t in tried if "ms" in t), key=lambda t: t["ms"])
    return best["config"], tried


def _fastest(x, qweight, scales, path: str, configs: list[dict]) -> dict | None:
    """The fastest of `configs` for `path` on x (configs that fail to compile or launch are skipped)."""
    best = None
    for cfg in configs:

        def run(cfg=cfg):
            return w4a16_gemm_triton(x, qweight, scales, None, GROUP, True, path=path, **cfg)

        try:
            ms = bench(run)
        except Exception as exc:
            print(f"  skip {path} {cfg}: {type(exc).__name__}", file=sys.stderr)
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return None if best is None else best[1]


def tune_gemm(x, qweight, scales) -> dict:
    tiles = [(16, 32, 32, 4)] if SMOKE else [
        (16, 64, 64, 4), (16, 128, 64, 4), (32, 64, 128, 4), (64, 64, 64, 4), (64, 128, 64, 8),
        (128, 128, 64, 8), (128, 64, 128, 8),
    ]  # fmt: skip
    configs = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw) for bm, bn, bk, nw in tiles]
    best = _fastest(x, qweight, scales, "gemm", configs)
    assert best is not None
    return best


def tune_gemv_tc_prefill(x, qweight, scales) -> dict | None:
    """The tensor-core GEMV's row tiles for prefill (M in `block_m`-row tiles): a few tile shapes."""
    tiles = [(32, 32, 128, 4)] if SMOKE else [
        (64, 64, 128, 4), (64, 128, 128, 4), (128, 64, 128, 8), (128, 128, 128, 8), (64, 64, 256, 4),
        (128, 128, 256, 8),
    ]  # fmt: skip
    configs = [dict(block_m=m, block_n=n, block_k=k, num_warps=w, num_stages=3) for m, n, k, w in tiles]
    return _fastest(x, qweight, scales, "gemv_tc", configs)


def bench_size(size: int, decode_m: list[int], prefill_m: list[int]) -> tuple[list[dict], dict]:
    rows = []
    n = k = size
    qweight, scales = make_weight(n, k)
    w16 = dequantize_w4(qweight, scales, None, k, GROUP).half()
    wbf = w16.bfloat16()
    x1 = torch.randn(1, k, device=DEVICE).half()
    t0 = time.perf_counter()
    if H2_ONLY:
        from trtcompress.plugins.w4a16_gemm.op import GEMV_TC_CONFIG

        tc_cfg, tc_tried = {**GEMV_TC_CONFIG, "deq_asm": DEVICE == "cuda"}, []
    else:
        tc_cfg, tc_tried = tune_gemv_tc(x1, qweight, scales)
    tuning = {"K": k, "N": n, "M": 1, "best": tc_cfg, "seconds": time.perf_counter() - t0, "tried": tc_tried}
    print(f"K=N={size}: gemv_tc config {tc_cfg} ({tuning['seconds']:.1f} s)", file=sys.stderr)
    t0 = time.perf_counter()
    h2_cfg, h2_tried = tune_gemv_h2(x1, qweight, scales)
    tuning["gemv_h2"] = {"best": h2_cfg, "seconds": time.perf_counter() - t0, "tried": h2_tried}
    print(f"K=N={size}: gemv_h2 config {h2_cfg} ({tuning['gemv_h2']['seconds']:.1f} s)", file=sys.stderr)
    gemv_cfg = old_gemv_config(k)
    x16 = torch.randn(16, k, device=DEVICE).half()
    gemm_cfg = tc_prefill_cfg = None
    if not GEMV_ONLY:
        xp = torch.randn(max(prefill_m), k, device=DEVICE).half()
        gemm_cfg = tune_gemm(xp, qweight, scales)
        tc_prefill_cfg = tune_gemv_tc_prefill(xp, qweight, scales)
        print(f"K=N={size}: GEMM config {gemm_cfg}, gemv_tc prefill {tc_prefill_cfg}", file=sys.stderr)
    for m in decode_m + ([] if GEMV_ONLY else prefill_m):
        x = torch.randn(m, k, device=DEVICE).half() if m != 16 else x16
        xb = x.bfloat16()
        ref = w4a16_gemm_reference(x, qweight, scales, None, GROUP, True)
        row = {"K": k, "N": n, "M": m}
        row["fp16_matmul_ms"] = bench(lambda x=x: torch.matmul(x, w16.t()))
        row["bf16_matmul_ms"] = bench(lambda xb=xb: torch.matmul(xb, wbf.t()))
        paths = []
        if m <= 16:
            paths += [("gemv", gemv_cfg), ("gemv_tc", tc_cfg), ("gemv_h2", h2_cfg)]
        if m >= 16 and gemm_cfg is not None:
            paths.append(("gemm", gemm_cfg))
        if m > 16 and tc_prefill_cfg is not None:  # the tensor-core GEMV in row tiles
            paths.append(("gemv_tc", tc_prefill_cfg))
        for path, cfg in paths:

            def run(x=x, path=path, cfg=cfg):
                return w4a16_gemm_triton(x, qweight, scales, None, GROUP, True, path=path, **cfg)

            row[f"w4a16_{path}_rel_err"] = check(run(), ref)
            row[f"w4a16_{path}_ms"] = bench(run)
            row[f"w4a16_{path}_config"] = cfg
            row[f"w4a16_{path}_speedup_vs_bf16"] = row["bf16_matmul_ms"] / row[f"w4a16_{path}_ms"]
        if m <= 16:  # gemv_tc with bf16 activations (the bf16 magic-number codes), same config

            def run_bf16(xb=xb):
                return w4a16_gemm_triton(xb, qweight, scales, None, GROUP, True, path="gemv_tc", **tc_cfg)

            ref_bf = w4a16_gemm_reference(xb, qweight, scales, None, GROUP, True)
            row["w4a16_gemv_tc_bf16_rel_err"] = check(run_bf16(), ref_bf)
            row["w4a16_gemv_tc_bf16_ms"] = bench(run_bf16)
            row["w4a16_gemv_tc_bf16_speedup_vs_bf16"] = row["bf16_matmul_ms"] / row["w4a16_gemv_tc_bf16_ms"]
        best = min(row[f"w4a16_{p}_ms"] for p, _ in paths)
        row["w4a16_best_ms"] = best
        row["speedup_vs_fp16"] = row["fp16_matmul_ms"] / best
        row["speedup_vs_bf16"] = row["bf16_matmul_ms"] / best
        weight_bytes = qweight.numel() + scales.numel() * 2
        row["w4a16_weight_GBps"] = weight_bytes / (best * 1e-3) / 1e9
        row["fp16_weight_GBps"] = w16.numel() * 2 / (row["fp16_matmul_ms"] * 1e-3) / 1e9
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows, tuning


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python benchmarks/gemm_gpu.py OUT.json [--quick] [--smoke] [--gemv-only]")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gemm_gpu.py times CUDA kernels and needs a CUDA GPU; --smoke runs a CPU check")
    out_path = Path(sys.argv[1])
    sizes = [256] if SMOKE else ([4096] if QUICK else [4096, 11008, 14336])
    decode_m = [1, 4] if SMOKE else [1, 2, 4, 8, 16]
    prefill_m = [20] if SMOKE else [512, 2048]
    rows, tunings = [], []
    t_start = time.perf_counter()
    info = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "group_size": GROUP,
        "weight": "INT4 symmetric, group 128, fp16 scales (4.125 bits/weight)",
        "timing": "median ms of triton.testing.do_bench (CUDA events, L2 flushed)",
        "gemv_only": GEMV_ONLY,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(w4a4: list[dict]) -> None:
        info["seconds"] = time.perf_counter() - t_start
        result = {"info": info, "w4a16": rows, "w4a4": w4a4, "gemv_tc_tuning": tunings}
        out_path.write_text(json.dumps(result, indent=2))

    for size in sizes:
        size_rows, tuning = bench_size(size, decode_m, prefill_m)
        rows += size_rows
        tunings.append(tuning)
        write([])  # partial
    if GEMV_ONLY:
        print(f"wrote {out_path} ({info['seconds']:.0f} s)", file=sys.stderr)
        return
    # W4A4 (LLM-FP4, E2M1 x E2M1, emulated on Hopper by in-register dequantization) at one shape
    w4a4 = []
    size = sizes[0]
    qweight, _ = make_weight(size, size, seed=1)
    wscales = (torch.rand(size, 1, device=DEVICE) * 0.05 + 0.01).half()
    act_scale = torch.tensor([0.5], device=DEVICE)
    shift = torch.zeros(size, dtype=torch.uint8, device=DEVICE)
    w_deq = dequantize_w4(qweight, wscales, None, size, 0, True, 2, 1).half()
    for m in [16, *prefill_m]:
        x = torch.randn(m, size, device=DEVICE).half()
        args = (qweight, wscales, act_scale, shift, 2, 1, 2, 1, 0)
        ref = w4a4_fp4_gemm_reference(x, *args)
        rel = check(w4a4_fp4_gemm_triton(x, *args), ref)
        ms = bench(lambda x=x, args=args: w4a4_fp4_gemm_triton(x, *args))
        fp16 = bench(lambda x=x: torch.matmul(x, w_deq.t()))
        w4a4.append({"K": size, "N": size, "M": m, "w4a4_ms": ms, "fp16_matmul_ms": fp16, "rel_err": rel,
                     "speedup_vs_fp16": fp16 / ms})  # fmt: skip
        print(json.dumps(w4a4[-1]), file=sys.stderr)
    write(w4a4)
    print(f"wrote {out_path} ({info['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    from _util import exit_if_help

    exit_if_help(__doc__)
    main()
