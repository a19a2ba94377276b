"""What the lop3 decode GEMV's loop costs in sm_90 machine code, per launch variant (no GPU needed).

    python benchmarks/gemv_sass.py [OUT.json]

Compiles `w4a16_gemv_lop3_kernel` for sm_90 with Triton's own ptxas (as `gear_kernel_sass.py` does for
the GEAR kernel) for each of the op's launches (`GEMV_LOP3_CONFIGS`), symmetric and with zero points,
and for each way of keeping weight loads in flight: prefetching one step ahead (the op's), two steps
ahead, or Triton's cp.async pipeline with 3 or 4 stages; and the op's prefetching over a
`GroupMajorWeight` (contiguous per step) or with two rows of x per program (ROWS = 2: the weight read
and its codes made once for both; per weight byte it then serves two outputs). Per variant: the loop's
instructions per step and per weight byte a thread reads, its instruction classes, registers, stack and
shared memory, the weight bytes a thread has in flight, and those of a whole SM at the occupancy that
registers and shared memory allow (`resident_ctas`; Little's law: ~4.8 TB/s over ~1 us of latency
needs ~35 KiB per SM of the H200's 132). Not a timing: `gemv_graphs_gpu.py` on a GPU is.

Default output: benchmarks/results/gemv_lop3_sass.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret

from gear_kernel_sass import RESULTS, _compile, sass_summary

GROUP = 128
VARIANTS = {  # name: (PREFETCH, STAGES, GROUP_MAJOR, ROWS)
    "prefetch 1 (op)": (1, 0, False, 1),
    "prefetch 2": (2, 0, False, 1),
    "cp.async 3 stages": (0, 3, False, 1),
    "cp.async 4 stages": (0, 4, False, 1),
    "group-major, prefetch 1": (1, 0, True, 1),
    "2 rows of x, prefetch 1": (1, 0, False, 2),
}
SIGNATURE = {
    "x_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*fp16",
    "part_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_words": "i32",
}  # fmt: skip


def variant_cost(
    config: dict, symmetric: bool, prefetch: int, stages: int, group_major: bool = False, rows: int = 1
) -> dict:
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import w4a16_gemv_lop3_kernel

    constants = dict(
        GROUP=GROUP, SYMMETRIC=symmetric, BLOCK_N=config["block_n"], BLOCK_K=config["block_k"],
        SPLIT_K=config["split_k"], MASK_K=False, DEQ_ASM=True, PREFETCH=prefetch, LAST_SUMS=True,
        SPLIT_PAD=config["split_k"], STAGES=stages, GROUP_MAJOR=group_major, ROWS=rows,
    )  # fmt: skip
    compiled = _compile(
        w4a16_gemv_lop3_kernel, SIGNATURE, constants, config["num_warps"], aligned=("K", "stride_words")
    )
    cost = sass_summary(compiled)
    step_bytes = config["block_n"] * min(GROUP, config["block_k"]) // 2 // (32 * config["num_warps"])
    cost["weight_bytes_per_thread_step"] = step_bytes
    cost["instructions_per_weight_byte"] = round(cost["loop_instructions"] / step_bytes, 2)
    cost["weight_bytes_in_flight_per_thread"] = step_bytes * (prefetch or max(stages - 1, 0))
    ctas = resident_ctas(cost["registers"], cost["shared_bytes"], config["num_warps"])
    cost["resident_ctas_per_sm"] = ctas
    cost["weight_kib_in_flight_per_sm"] = (
        ctas * 32 * config["num_warps"] * cost["weight_bytes_in_flight_per_thread"] / 1024
    )
    return cost


def resident_ctas(registers: int, shared: int, warps: int) -> int:
    """Programs an H100/H200 SM holds at once: 64K registers (allocated per warp in units of 256), 228 KiB
    of shared memory (1 KiB reserved per program), 64 warps, 32 programs."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = 65536 // (per_warp * warps)
    by_smem = (228 * 1024) // (shared + 1024)
    return min(32, 64 // warps, by_regs, by_smem)


def main() -> None:
    from trtcompress.plugins.w4a16_gemm.op import GEMV_LOP3_CONFIGS

    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "gemv_lop3_sass.json"
    t0 = time.perf_counter()
    rows = []
    for limit, config in GEMV_LOP3_CONFIGS:
        for symmetric in (True, False):
            for name, (prefetch, stages, group_major, x_rows) in VARIANTS.items():
                cost = variant_cost(config, symmetric, prefetch, stages, group_major, x_rows)
                row = {"weights_up_to": limit, "config": config, "symmetric": symmetric, "variant": name}
                rows.append(row | cost)
                print(
                    f"{limit!s:>9} bn={config['block_n']:<3} warps={config['num_warps']} "
                    f"{'sym ' if symmetric else 'asym'} {name:<23} loop {cost['loop_instructions']:>4} "
                    f"({cost['instructions_per_weight_byte']:.2f}/B) regs {cost['registers']:>3} "
                    f"stack {cost['stack_bytes']} smem {cost['shared_bytes']:>5} "
                    f"in flight {cost['weight_bytes_in_flight_per_thread']} B/thread, "
                    f"{cost['weight_kib_in_flight_per_sm']:.0f} KiB/SM "
                    f"({cost['resident_ctas_per_sm']} programs)",
                    flush=True,
                )
    import triton

    result = {
        "what": "gemv_lop3 loop cost in sm_90 SASS per launch variant (compiled on CPU, not a timing)",
        "triton": triton.__version__,
        "group": GROUP,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    from _util import exit_if_help

    exit_if_help(__doc__)
    main()
