"""What the GEAR decode kernel costs per cache block, read from its sm_90 machine code (no GPU needed).

    python benchmarks/gear_kernel_sass.py [OUT.json]

Compiles `gear_decode_kernel` (Triton -> PTX -> SASS with Triton's own ptxas) for the 8B-class layer
of the GPU benchmark (8 KV heads, 32 query heads, head dim 128, 4 splits) and each cache layout
below, disassembles it with Triton's `cuobjdump`, and counts the instructions of the loop over
blocks (the longest backward branch): per class (tensor-core MMA, shared-memory loads/stores,
barriers, shuffles, global loads, PRMT, ...), plus registers, stack and shared memory. Also the
split-K reduce kernel (its loads and loops). On the H100 and H200 the kernel's time followed these
counts (the "runs" outlier sums: 2.1x fewer instructions, 2.05-2.16x faster), while it did not follow
the card's bandwidth: it is instruction- and latency-bound, and this is the measure that can be taken
on a CPU machine. It is not a timing: a GPU run of benchmarks/gear_attention.py is.

Default output: benchmarks/results/gear_kernel_sass.json.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HEADS, Q_HEADS, DIM, SPLITS = 8, 32, 128, 4
CLASSES = ("HMMA", "LDS", "LDSM", "STS", "BAR", "SHFL", "LDG", "LDGSTS", "STG", "ATOMS", "PRMT", "MUFU",
           "LDL", "STL", "F2FP", "HADD2", "HFMA2", "HMUL2", "FFMA", "FMUL", "FADD", "FSEL",
           "ISETP")  # fmt: skip
# (label, codec, codec options, launcher options)
CASES = (
    ("kivi-2bit", "kivi-2bit", {}, {}),
    ("gear-2bit (default: fp8 outliers + fp8 scales, runs)", "gear-2bit", {}, {}),
    ("gear-2bit fp16 scales (runs)", "gear-2bit", {"scale_dtype": "fp16"}, {}),
    ("gear-2bit fp16 outliers + scales (runs)", "gear-2bit", {"scale_dtype": "fp16", "outlier_dtype": "fp16"},
     {}),
    ("gear-2bit (one-hot outlier sums)", "gear-2bit", {}, {"outlier_sums": "onehot"}),
    ("gear-2bit group-scope outliers", "gear-2bit", {"outlier_scope": "group", "scale_dtype": "fp16"}, {}),
    ("gear-4bit (default)", "gear-4bit", {}, {}),
    ("gear-4bit int4 factors", "gear-4bit", {"factor_dtype": "int4"}, {}),
    # fewer warps per program: each block's work is split over fewer threads, so a thread issues more,
    # but the 16-row tiles (4 real rows) and the layout round trips are split less
    ("kivi-2bit, 2 warps", "kivi-2bit", {}, {"num_warps": 2}),
    ("gear-2bit (default), 2 warps", "gear-2bit", {}, {"num_warps": 2}),
    ("kivi-2bit, 8 warps", "kivi-2bit", {}, {"num_warps": 8}),
)  # fmt: skip


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile(fn, signature: dict[str, str], constants: dict, num_warps: int = 4, aligned: tuple = ()):
    """sm_90 code for `fn`: pointers 16-byte aligned, and the integers named in `aligned` multiples of
    16, as Triton's launcher specializes them (a row stride that is not known to be one rules out
    vector loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constants else signature.get(n, "*fp16") for n in fn.arg_names}
    div16 = [i for i, n in enumerate(fn.arg_names) if sig[n].startswith("*") or n in aligned]
    src = ASTSource(fn, sig, constants, attrs={(i,): [["tt.divisibility", 16]] for i in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sass_summary(compiled) -> dict:
    """Registers, stack, shared memory, and the instruction counts of the whole kernel and of its
    longest loop (per instruction class)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tools() / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
        usage = subprocess.run([_tools() / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True)
    code = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for address, text in code:
        target = re.search(r"BRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    out = {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(regs.group(2)) if regs else None,
        "shared_bytes": compiled.metadata.shared,
        "instructions": len(code),
        "loops": len(loops),
    }
    body = code
    if loops:
        start, end = max(loops, key=lambda span: span[1] - span[0])
        body = [(a, t) for a, t in code if start <= a <= end]
        out["loop_instructions"] = len(body)
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
    out["by_class"] = {c: opcodes[c] for c in CLASSES if opcodes[c]}
    return out


def decode_kernel(codec_name: str, options: dict, launch: dict) -> dict:
    from trtcompress.kv import get_codec
    from trtcompress.plugins.gear_attention.kernel import gear_decode_kernel, layout_constants
    from trtcompress.plugins.gear_attention.reference import layout_for_codec

    codec = get_codec(codec_name, **options)
    layout = layout_for_codec(codec, DIM, 1)
    group = Q_HEADS // HEADS
    dtype = {"torch.uint8": "*u8", "torch.int8": "*i8", "torch.int16": "*i16", "torch.int32": "*i32",
             "torch.float16": "*fp16", "torch.float8_e4m3fn": "*fp8e4nv"}  # fmt: skip
    sig = {n: "*fp32" for n in ("q_ptr", "out_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr")}
    sig |= {n: "*i32" for n in ("block_table_ptr", "num_blocks_ptr", "tail_len_ptr", "slot_ptr")}
    sig |= {"sm_scale": "fp32", "max_blocks": "i32"}
    names = {"codes": "c", "scale": "s", "zero": "z", "out_val": "ov", "out_idx": "oi", "lr_a": "a",
             "lr_a_scale": "as", "lr_b": "b", "lr_b_scale": "bs", "out_scale": "os", "scale_max": "sm",
             "zero_max": "zm"}  # fmt: skip
    for kind in "kv":
        for field, spec in codec.layout(kind, layout.block, DIM).items():
            sig[f"{kind}{names[field]}_ptr"] = dtype[str(spec.dtype)]
    constants = layout_constants(  # as gear_attention_triton launches it
        layout, HEADS, group, DIM, splits=SPLITS, asm=True, prefetch=not any(layout.outliers),
        outlier_sums=launch.get("outlier_sums", "runs"),
    )  # fmt: skip
    warps = launch.get("num_warps", 4)
    summary = sass_summary(_compile(gear_decode_kernel, sig, constants, num_warps=warps))
    # what an SM's schedulers issue per block: the per-thread loop count times the program's warps
    summary["warp_instructions_per_block"] = summary.get("loop_instructions", 0) * warps
    return {"layout": repr(layout), "num_warps": warps} | summary


def reduce_kernel(splits: int) -> dict:
    import triton

    from trtcompress.plugins.gear_attention.kernel import gear_reduce_kernel

    sig = {n: "*fp32" for n in ("part_m_ptr", "part_l_ptr", "part_acc_ptr", "out_ptr", "lse_ptr")}
    constants = dict(H=HEADS, GROUP=Q_HEADS // HEADS, G_PAD=16, D=DIM, SPLITS=splits,
                     SPLITS_PAD=triton.next_power_of_2(splits), WRITE_LSE=False)  # fmt: skip
    return {"splits": splits} | sass_summary(_compile(gear_reduce_kernel, sig, constants))


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "gear_kernel_sass.json"
    start = time.perf_counter()
    import triton

    shape = f"{HEADS}/{Q_HEADS}/{DIM}, {SPLITS} splits, 4 warps unless the case says otherwise"
    result: dict = {
        "triton": triton.__version__,
        "target": "sm_90",
        "shape": shape,
        "decode": [],
        "reduce": [],
    }
    for label, codec_name, options, launch in CASES:
        row = {"label": label, "codec": codec_name, "options": options, "launch": launch}
        row |= decode_kernel(codec_name, options, launch)
        result["decode"].append(row)
        print(f"{label:55s} loop {row.get('loop_instructions', '-'):>5} instructions "
              f"({row['warp_instructions_per_block']} per block over {row['num_warps']} warps), "
              f"{row['registers']} registers, stack {row['stack_bytes']}, shared {row['shared_bytes']}  "
              + " ".join(f"{k}:{v}" for k, v in row["by_class"].items()), flush=True)  # fmt: skip
    for splits in (4, 32, 256):
        row = reduce_kernel(splits)
        result["reduce"].append(row)
        loads = row["by_class"].get("LDG", 0)
        print(f"reduce, {splits:3d} splits: {row['instructions']} instructions, {row['loops']} loops, "
              f"{loads} global loads, {row['registers']} registers", flush=True)  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    from _util import exit_if_help

    exit_if_help(__doc__)
    main()
