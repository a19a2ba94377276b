"""The lop3 decode GEMV's machine-code cost per weight byte (sm_90, compiled on this CPU machine by Triton's
own ptxas): a guard against changes that blow up its loop. The op's launch for the largest layers
(`GEMV_LOP3_CONFIG`, one 128-column group per loop step with prefetching: 128 rows x 64 bytes over 128
threads, 64 bytes per thread per step) measured 301 instructions per step with Triton 3.6 (4.7 per
byte; 327 before x was read as one 16-byte load per word), against 868 per 128 bytes (6.8 per byte)
for the packed-fp16 GEMV it replaced; with zero points 478 (565 before). Its GPU time is in
BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CODE = """
import json, sys
sys.path.insert(0, "benchmarks")
from gear_kernel_sass import _compile, sass_summary
from gemv_sass import SIGNATURE, variant_cost
from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemv_h2_kernel
from trtcompress.plugins.w4a16_gemm.op import GEMV_H2_CONFIG, GEMV_LOP3_CONFIG

lop3 = GEMV_LOP3_CONFIG  # (PREFETCH, STAGES): the op's prefetching; Triton's pipeline instead
out = {"lop3_sym": variant_cost(lop3, True, 1, 0), "lop3_asym": variant_cost(lop3, False, 1, 0),
       "lop3_stages": variant_cost(lop3, True, 0, 3)}
sig = SIGNATURE | {"stride_w": "i32"}
h2 = GEMV_H2_CONFIG
consts = dict(GROUP=128, SYMMETRIC=True, BLOCK_N=h2["block_n"], BLOCK_K=h2["block_k"], SPLIT_K=h2["split_k"],
              SUB=h2["h2_sub"], MASK_K=False, DEQ_ASM=True)
out["h2"] = sass_summary(_compile(w4a16_gemv_h2_kernel, sig | {"out_ptr": "*fp32"}, consts, h2["num_warps"],
                                  aligned=("K", "stride_w")))
print(json.dumps(out))
"""


def test_lop3_gemv_loop_cost_on_sm90() -> None:
    from trtcompress.plugins.w4a16_gemm.op import GEMV_H2_CONFIG, GEMV_LOP3_CONFIG

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    proc = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    lop3 = GEMV_LOP3_CONFIG
    threads = 32 * lop3["num_warps"]
    step_bytes = lop3["block_n"] * 64 // threads  # one 128-column group (64 bytes a row) per step
    h2_bytes = (
        GEMV_H2_CONFIG["block_n"] * GEMV_H2_CONFIG["block_k"] // 2 // (32 * GEMV_H2_CONFIG["num_warps"])
    )
    sym, asym, h2 = cost["lop3_sym"], cost["lop3_asym"], cost["h2"]
    per_byte = sym["loop_instructions"] / step_bytes
    assert per_byte <= 5.5, sym  # 4.7 with Triton 3.6
    assert h2["loop_instructions"] / h2_bytes > 1.25 * per_byte, (h2, sym)
    assert sym["stack_bytes"] == 0 and asym["stack_bytes"] == 0  # no register spill
    assert sym["by_class"].get("BAR", 0) <= 2, sym  # one layout conversion per step at most
    assert asym["loop_instructions"] < 2 * sym["loop_instructions"], asym  # the zero-point correction
    staged = cost["lop3_stages"]["by_class"]  # the words (and x) copied ahead by cp.async, not loaded
    assert staged.get("LDGSTS", 0) >= 4 and staged.get("LDG", 0) <= 2, cost["lop3_stages"]
