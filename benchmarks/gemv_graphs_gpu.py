"""W4A16 decode GEMVs vs bf16 matmul as a serving decode step runs them: replayed from CUDA graphs, L2 cold.

    python benchmarks/gemv_graphs_gpu.py OUT.json [--quick]
    python benchmarks/gemv_graphs_gpu.py OUT.json --group-major [--quick | --llama8b]  # the runtime's layout
    python benchmarks/gemv_graphs_gpu.py OUT.json --smoke [--group-major]  # CPU: interpreted, tiny

`benchmarks/gemm_gpu.py` times each call eagerly (`do_bench`): a Triton launch costs the CPU 10-30 us,
so small GEMVs (and the split-K paths' zero-fill and cast kernels) are partly timed as launch gaps,
which the native runtime's CUDA graphs (`deploy.cuda_graphs`) never pay. Here every timed call is
replayed from one captured graph, the same way for the bf16 `torch.matmul` baseline and the kernels,
and each graph cycles through enough copies of the weight (at least 256 MB in all, over the H100/H200's
50 MB L2) that every call reads its weight from HBM, as a model's layers do.

For K = N in {4096, 11008, 14336}: the lop3 GEMV ("gemv_lop3", `plugins/w4a16_gemm/gemv_lop3.py`) is
tuned at M = 1 (`tune_lop3`: tiles / split-K / one-kernel split-K sums, warps x stages, prefetching
one or two steps ahead, cp.async pipelines), every config checked against the reference before and
after its graph replays (its PTX runs only here); then M = 1, 2, 4, 8, 16 time bf16 matmul, gemv_lop3
(best config; at M <= 2 also over `GroupMajorWeight` copies, whose per-step tiles are contiguous in
memory, and at M = 2 with both rows of x in one program, `rows=2`), the op's M = 1 path gemv_h2
(`GEMV_H2_CONFIG`) and gemv_tc (`GEMV_TC_CONFIG`, PTX dequantization), plus eager `do_bench` times of
bf16 and the best GEMV for comparison with the eager tables. The asymmetric (zero-point) PTX is
checked once at the first size. Needs torch + triton.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    os.environ.setdefault("TRTCOMPRESS_GEMM_TRITON", "1")  # the ops' kernels, interpreted, not the reference
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _graphs  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_lop3_group_major  # noqa: E402
from trtcompress.plugins.w4a16_gemm.group_major_op import w4a16_gemm_group_major  # noqa: E402
from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_triton  # noqa: E402
from trtcompress.plugins.w4a16_gemm.op import (  # noqa: E402
    GEMV_H2_CONFIG,
    GEMV_TC_CONFIG,
    gemv_lop3_config,
    w4a16_gemm,
)
from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
GROUP = 128
ROTATE_BYTES = _graphs.ROTATE_BYTES  # weight copies per graph: at least this much, 5x the L2
CALLS = _graphs.CALLS  # calls per graph replay, cycling through the copies (4096's int4 weight: 32 copies)
LOP3_TILES = [  # (block_n, block_k, split_k): one group per step
    (32, 256, 1), (64, 256, 1), (32, 512, 2), (64, 256, 2), (64, 256, 4), (64, 512, 4), (128, 256, 4),
    (64, 256, 8), (128, 128, 8), (128, 256, 8), (128, 512, 8), (256, 256, 4), (256, 256, 8), (128, 256, 16),
]  # fmt: skip
WARPS_STAGES = [(2, 1), (4, 2), (8, 1), (4, 3)]
GROUP_MAJOR = "gemv_lop3_group_major"  # the best lop3 launch over the contiguous-per-step weight layout
TWO_ROWS = "gemv_lop3_2rows"  # the best lop3 launch with both rows of x in one program (M = 2)
GROUP_MAJOR_2ROWS = "gemv_lop3_group_major_2rows"  # the same launch with rows=2 (M = 2)
OP_ROWS = "op_rows"  # torch.ops.trtcompress.w4a16_gemm over the row layout (the artifact's)
OP_GROUP_MAJOR = "op_group_major"  # torch.ops.trtcompress.w4a16_gemm_group_major (the CUDA runtime's call)
DEEP_STAGES = (3, 4)  # `stages` of Triton's cp.async pipeline of the words (gemv_lop3, no prefetch)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.float() - ref.float()).abs().max().item() / (ref.float().abs().max().item() + 1e-6)
    if err > 1e-2:
        raise AssertionError(f"kernel differs from the reference: relative max error {err:.3g}")
    return err


def graph_ms(fns: list, check=None) -> float:
    """Median ms per call replayed from one CUDA graph cycling through `fns` (`_graphs.graph_ms`); under
    --smoke one eager call (and `check` on the last function's output)."""
    if SMOKE:
        for fn in fns:
            fn()
        if check is not None:
            check(fns[-1](), len(fns) - 1)
        return eager_ms(fns[0])
    return _graphs.graph_ms(fns, check, CALLS)


def eager_ms(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn))


def copies_for(nbytes: int) -> int:
    return 2 if SMOKE else _graphs.copies_for(nbytes)


def int4_copies(n: int, k: int, count: int, symmetric: bool = True) -> list[tuple]:
    out = []
    for i in range(count):
        g = torch.Generator(device=DEVICE).manual_seed(i)
        qweight = torch.randint(0, 256, (n, k // 2), generator=g, device=DEVICE, dtype=torch.uint8)
        scales = (torch.rand(n, -(-k // GROUP), generator=g, device=DEVICE) * 0.01 + 0.001).half()
        zeros = None
        if not symmetric:
            zeros = torch.randint(0, 16, (n, -(-k // GROUP)), generator=g, device=DEVICE, dtype=torch.uint8)
        out.append((qweight, scales, zeros, GROUP, symmetric))
    return out


def kernel_fns(x: torch.Tensor, weights: list, path: str, cfg: dict) -> list:
    """One call per weight copy; paths GROUP_MAJOR and OP_GROUP_MAJOR: `weights` are `GroupMajorWeight`s;
    OP_ROWS / OP_GROUP_MAJOR: the ops as the runtime calls them (their own kernel choice, `cfg` unused)."""
    if path == GROUP_MAJOR:
        return [lambda w=w: gemv_lop3_group_major(x, w, **cfg) for w in weights]
    if path == OP_GROUP_MAJOR:
        return [lambda w=w: w4a16_gemm_group_major(x, *w.op_args) for w in weights]
    if path == OP_ROWS:
        return [lambda w=w: w4a16_gemm(x, *w, 0, 0) for w in weights]
    return [lambda w=w: w4a16_gemm_triton(x, *w, path=path, **cfg) for w in weights]


def time_path(x, weights, path: str, cfg: dict, ref: torch.Tensor, layouts: list | None = None) -> dict:
    """{"config", "ms", "rel_err"} or {"config", "error"} (a config that fails must not stop the run):
    checked eagerly first, then the graph's own last output after its replays. `layouts`: the
    weights in the layout the path reads, when not the op's (`weights` then only give references)."""
    try:
        fns = kernel_fns(x, layouts or weights, path, cfg)
        err = rel_err(fns[0](), ref)

        def graph_check(out: torch.Tensor, i: int) -> None:
            rel_err(out, ref if i == 0 else w4a16_gemm_reference(x, *weights[i]))

        ms = graph_ms(fns, graph_check)
        return {"config": cfg, "ms": ms, "rel_err": err}
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"  {path} {cfg}: {msg}", file=sys.stderr, flush=True)
        return {"config": cfg, "error": msg}


def tune_lop3(x, weights, layouts: list | None = None) -> tuple[dict, list[dict]]:
    """Stage 1: tiles x split-K with the split-K partials added by the last split (`last_sums`, one
    kernel; the eighth session's first run measured the atomic alternative 1.03-1.29x slower); stage 2:
    warps x stages around the best two; stage 3: the prefetching loop toggled on the best three; stage 4:
    deeper queues of weight loads on the best three (prefetch two steps ahead, or Triton's cp.async
    pipeline with DEEP_STAGES stages). `layouts`: tune over these `GroupMajorWeight`s instead (path
    GROUP_MAJOR), steps of one group, at most one chunk."""
    ref = w4a16_gemm_reference(x, *weights[0])
    path = GROUP_MAJOR if layouts else "gemv_lop3"

    def time_lop3(cfg: dict) -> dict:
        return time_path(x, weights, path, cfg, ref, layouts)

    tiles = [(16, 128, 1), (16, 64, 2)] if SMOKE else LOP3_TILES
    first = [
        dict(block_n=bn, block_k=bk, split_k=sk, num_warps=4, num_stages=1, last_sums=sk > 1, prefetch=False)
        for bn, bk, sk in tiles
    ]
    tried = [time_lop3(cfg) for cfg in first]
    assert any("ms" in t for t in tried), f"no {path} config ran"
    for top in _ranked(tried)[:2]:
        for nw, ns in WARPS_STAGES[:1] if SMOKE else WARPS_STAGES:
            cfg = {**top["config"], "num_warps": nw, "num_stages": ns}
            if cfg != top["config"]:
                tried.append(time_lop3(cfg))
    for top in _ranked(tried)[:3]:
        toggled = {**top["config"], "prefetch": not top["config"]["prefetch"]}
        if all(t["config"] != toggled for t in tried):
            tried.append(time_lop3(toggled))
    for top in _ranked(tried)[:3]:  # more weight bytes in flight: two steps ahead, or cp.async stages
        deeper = [{**top["config"], "prefetch": 2}]
        deeper += [{**top["config"], "prefetch": False, "stages": st} for st in DEEP_STAGES]
        for cfg in deeper[:2] if SMOKE else deeper:
            if all(t["config"] != cfg for t in tried):
                tried.append(time_lop3(cfg))
    return _ranked(tried)[0]["config"], tried


def record(row: dict, path: str, timed: dict) -> None:
    """A path's graph time, error and speedup against the row's bf16 matmul, into the row."""
    row[f"{path}_graph_ms"] = timed.get("ms")
    row[f"{path}_error"] = timed.get("error")
    if "ms" in timed:
        row[f"{path}_speedup_vs_bf16"] = row["bf16_graph_ms"] / timed["ms"]


def print_row(row: dict, paths, bf16_note: str = "") -> None:
    timed = [p for p in paths if row.get(f"{p}_graph_ms")]
    print(
        f"N={row['N']} K={row['K']} M={row['M']:3d} bf16 {row['bf16_graph_ms']:.4f} ms {bf16_note} "
        + "  ".join(f"{p} {row[f'{p}_graph_ms']:.4f} ({row[f'{p}_speedup_vs_bf16']:.2f}x)" for p in timed),
        flush=True,
    )


def _ranked(tried: list[dict]) -> list[dict]:
    return sorted((t for t in tried if "ms" in t), key=lambda t: t["ms"])


def bench_size(size: int, result: dict) -> None:
    n = k = size
    weights = int4_copies(n, k, copies_for(n * k // 2))
    bf16 = [torch.randn(n, k, device=DEVICE).bfloat16() for _ in range(copies_for(n * k * 2))]
    x1 = torch.randn(1, k, device=DEVICE).half()
    t0 = time.perf_counter()
    best, tried = tune_lop3(x1, weights)
    result["tuning"].append({"K": k, "best": best, "seconds": time.perf_counter() - t0, "tried": tried})
    print(f"K=N={size}: gemv_lop3 {best} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not result["asymmetric_check"]:  # the zero-point path, once
        asym = int4_copies(n, k, 1, symmetric=False)[0]
        result["asymmetric_check"] = {"K": k, "config": best} | {
            "rel_err": rel_err(
                w4a16_gemm_triton(x1, *asym, path="gemv_lop3", **best), w4a16_gemm_reference(x1, *asym)
            )
        }
    paths = {
        "gemv_lop3": best,
        "gemv_lop3_op": gemv_lop3_config(n, k),  # what the op runs for this weight
        GROUP_MAJOR: {"prefetch": False, "last_sums": False, "stages": 0, **best},  # gemv_lop3's launch
        TWO_ROWS: {**best, "rows": 2},  # M = 2: one weight read for both rows of x
        "gemv_h2": GEMV_H2_CONFIG,
        "gemv_tc": {**GEMV_TC_CONFIG, "deq_asm": not SMOKE},
    }
    group_major = [GroupMajorWeight.from_packed(q, s, z, g, k) for q, s, z, g, _ in weights]
    for m in (1, 2, 4) if SMOKE else (1, 2, 4, 8, 16):
        x = x1 if m == 1 else torch.randn(m, k, device=DEVICE).half()
        xb = x.bfloat16()
        row = {"K": k, "N": n, "M": m, "int4_copies": len(weights), "bf16_copies": len(bf16)}
        row["bf16_graph_ms"] = graph_ms([lambda w=w, xb=xb: torch.matmul(xb, w.t()) for w in bf16])
        row["bf16_eager_ms"] = eager_ms(lambda xb=xb: torch.matmul(xb, bf16[0].t()))
        ref = w4a16_gemm_reference(x, *weights[0])
        for path, cfg in paths.items():
            if (
                (path == "gemv_h2" and m > 1)
                or (path == GROUP_MAJOR and m > 2)
                or (path == TWO_ROWS and m != 2)
            ):
                continue  # M = 1 only in the op; the lop3 GEMV serves M <= 2
            layouts = group_major if path == GROUP_MAJOR else None
            kernel = "gemv_lop3" if path in ("gemv_lop3_op", TWO_ROWS) else path
            timed = time_path(x, weights, kernel, cfg, ref, layouts)
            record(row, path, timed)
        row["gemv_lop3_eager_ms"] = eager_ms(
            lambda x=x: w4a16_gemm_triton(x, *weights[0], path="gemv_lop3", **best)
        )
        weight_bytes = n * k // 2 + n * -(-k // GROUP) * 2
        if row.get("gemv_lop3_graph_ms"):
            row["gemv_lop3_weight_GBps"] = weight_bytes / (row["gemv_lop3_graph_ms"] * 1e-3) / 1e9
        row["bf16_weight_GBps"] = n * k * 2 / (row["bf16_graph_ms"] * 1e-3) / 1e9
        result["rows"].append(row)
        print_row(row, paths, f"({row['bf16_weight_GBps']:.0f} GB/s)")


def bench_group_major(shape: tuple[int, int], result: dict) -> None:
    """The layout a CUDA runtime now holds its INT4 weights in: the lop3 GEMV tuned over `GroupMajorWeight`
    copies at M = 1, then at M = 1..16 and a 256-row prefill: bf16 matmul, the row-layout op
    (`w4a16_gemm`, its own kernel choice) against the group-major op (`w4a16_gemm_group_major`, the
    runtime's call: lop3 at M <= 2 with `GROUP_MAJOR_LOP3_CONFIGS`, the tensor-core GEMV beyond) and
    the tuned lop3 launch (M <= 2). `shape`: the weight's (N, K)."""
    n, k = shape
    weights = int4_copies(n, k, copies_for(n * k // 2))
    layouts = [GroupMajorWeight.from_packed(q, s, z, g, k) for q, s, z, g, _ in weights]
    bf16 = [torch.randn(n, k, device=DEVICE).bfloat16() for _ in range(copies_for(n * k * 2))]
    x1 = torch.randn(1, k, device=DEVICE).half()
    t0 = time.perf_counter()
    best, tried = tune_lop3(x1, weights, layouts)
    result["tuning"].append({"N": n, "K": k, "layout": "group_major", "best": best, "tried": tried})
    result["tuning"][-1]["seconds"] = time.perf_counter() - t0
    print(f"N={n} K={k}: {GROUP_MAJOR} {best} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for m in (1, 2, 4) if SMOKE else (1, 2, 4, 8, 16, 256):
        x = x1 if m == 1 else torch.randn(m, k, device=DEVICE).half()
        xb = x.bfloat16()
        row = {"K": k, "N": n, "M": m, "int4_copies": len(weights), "bf16_copies": len(bf16)}
        row["bf16_graph_ms"] = graph_ms([lambda w=w, xb=xb: torch.matmul(xb, w.t()) for w in bf16])
        ref = w4a16_gemm_reference(x, *weights[0])
        paths = {OP_ROWS: (weights, None), OP_GROUP_MAJOR: (weights, layouts)}
        if m <= 2:
            paths[GROUP_MAJOR] = (weights, layouts)
        if m == 2:  # both rows of x in one program, one read of the weight
            paths[GROUP_MAJOR_2ROWS] = (weights, layouts)
        for path, (refs, held) in paths.items():
            cfg = {GROUP_MAJOR: best, GROUP_MAJOR_2ROWS: {**best, "rows": 2}}.get(path, {})
            kernel = GROUP_MAJOR if path == GROUP_MAJOR_2ROWS else path
            timed = time_path(x, refs, kernel, cfg, ref, held)
            record(row, path, timed)
        result["rows"].append(row)
        print_row(row, paths)


def group_major_checks() -> list[dict]:
    """The group-major op against the reference beyond the timed (symmetric, square) weights: zero
    points, N not a multiple of any row tile, every kernel it picks (M = 1, 2, 5, 40)."""
    rows = []
    shapes = [(40, 256)] if SMOKE else [(200, 512), (1536, 4096)]
    for (n, k), sym, m in itertools.product(shapes, (True, False), (1, 2, 5, 40)):
        weights = int4_copies(n, k, 2, symmetric=sym)
        layouts = [GroupMajorWeight.from_packed(q, s, z, g, k) for q, s, z, g, _ in weights]
        x = torch.randn(m, k, device=DEVICE).half()
        timed = time_path(x, weights, OP_GROUP_MAJOR, {}, w4a16_gemm_reference(x, *weights[0]), layouts)
        rows.append({"N": n, "K": k, "M": m, "symmetric": sym} | timed)
        print(f"check group-major op N={n} K={k} M={m} {'sym' if sym else 'asym'}: "
              f"{timed.get('rel_err', timed.get('error'))}")  # fmt: skip
    return rows


# (N, K) of a Llama-3-8B layer's INT4 GEMVs as the native runtime runs them on CUDA (q / k / v and
# gate / up fused into one group-major weight each, `w4a16_fused_linear`): qkv, o, gate_up, down
LLAMA8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ODD_SHAPES = [(1536, 576), (200, 576), (4160, 4096)]  # (N, K): SmolLM2's K, partial row tiles, a tail


def odd_shape_checks() -> list[dict]:
    """The op's M = 1 / 2 launch (`gemv_lop3_config`) against the reference where the timed sizes are
    all aligned: K = 576 (a partial last K block), N not a multiple of the row tile; symmetric and with
    zero points, eagerly and replayed from a graph."""
    rows = []
    for (n, k), sym, m in itertools.product(ODD_SHAPES if not SMOKE else [(40, 192)], (True, False), (1, 2)):
        weights = int4_copies(n, k, 2, symmetric=sym)
        x = torch.randn(m, k, device=DEVICE).half()
        ref = w4a16_gemm_reference(x, *weights[0])
        timed = time_path(x, weights, "gemv_lop3", gemv_lop3_config(n, k), ref)
        rows.append({"N": n, "K": k, "M": m, "symmetric": sym} | timed)
        print(
            f"check N={n} K={k} M={m} {'sym' if sym else 'asym'}: {timed.get('rel_err', timed.get('error'))}"
        )
    return rows


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python benchmarks/gemv_graphs_gpu.py OUT.json [--quick] [--group-major] "
                         "[--llama8b] [--smoke]")  # fmt: skip
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gemv_graphs_gpu.py replays CUDA graphs: it needs a CUDA GPU (--smoke: CPU check)")
    out_path = Path(sys.argv[1])
    sizes = [256] if SMOKE else [4096] if "--quick" in sys.argv else [4096, 11008, 14336]
    start = time.perf_counter()
    result = {
        "device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "weight": "INT4 symmetric, group 128, fp16 scales (4.125 bits/weight); fp16 x (bf16 baseline)",
        "timing": f"median ms per call of {CALLS} calls replayed from one CUDA graph, weights rotated over "
        f">= {ROTATE_BYTES >> 20} MB of copies (L2 cold)",
        "asymmetric_check": None,
        "tuning": [],
        "rows": [],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    group_major = "--group-major" in sys.argv
    if group_major:
        result["group_major_checks"] = group_major_checks()
    else:
        result["odd_shape_checks"] = odd_shape_checks()
    out_path.write_text(json.dumps(result, indent=1))
    if group_major:  # square sizes, or (--llama8b) the projections of a Llama-3-8B layer
        shapes = LLAMA8B_SHAPES if "--llama8b" in sys.argv and not SMOKE else [(s, s) for s in sizes]
    for size in shapes if group_major else sizes:
        (bench_group_major if group_major else bench_size)(size, result)
        if not SMOKE:
            torch.cuda.empty_cache()  # the last size's weight copies
        result["seconds"] = time.perf_counter() - start
        out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    from _util import exit_if_help

    exit_if_help(__doc__)
    main()
