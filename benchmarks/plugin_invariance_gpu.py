"""Do the runtime's 4-bit layers keep a row's bits whatever the batch it runs in, on this GPU?

    python benchmarks/plugin_invariance_gpu.py OUT.json [--smoke]

On CUDA the runtime computes INT4 / FP4 layers with the plugin ops, which pick a kernel by the number of
rows (W4A16: the lop3 GEMV up to 2 rows, the tensor-core GEMV up to 16, 128-row tiles beyond). Greedy
tokens are independent of the batch only if every row keeps its bits across those switches. This runs
the runtime's own start-up check (`runtime.linear.plugins_batch_invariant`: probe, and run the layers
that vary in fixed 16-row tiles) on layers built as the runtime builds them (`build_group`: fused
q|k|v and gate|up, single o / down), at SmolLM2-135M's and a Llama-3-8B layer's shapes, symmetric and
asymmetric INT4 at groups 64 and 128, and NVFP4; and, per layer, how far the op's output (fp16
activations) is from the CPU reference (`CompressedLinearState.forward` in float32) on the same rows.
Seconds on a GPU (the first calls compile).
`--smoke`: tiny shapes on the CPU with the kernels interpreted (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

SHAPES = {  # name: (K, [N of the layers sharing an input])
    "smollm2 qkv": (576, [576, 192, 192]),
    "smollm2 gate_up": (576, [1536, 1536]),
    "smollm2 down": (1536, [576]),
    "llama8b qkv": (4096, [4096, 1024, 1024]),
    "llama8b o": (4096, [4096]),
    "llama8b down": (14336, [4096]),
}
SMOKE_SHAPES = {"tiny qkv": (256, [64, 32, 32]), "tiny down": (128, [48])}


def layers_for(k: int, ns: list[int], fmt, seed: int):
    from trtcompress.compressed.linear import CompressedLinear
    from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(ns):
        w = torch.randn(n, k, generator=gen) * 0.05
        q = QuantizedWeight.round_to_nearest(w, fmt)
        out.append(CompressedLinear(CompressedLinearState(n, k, q, bias=None if i else torch.randn(n) * 0.1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted on the CPU")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["TRTCOMPRESS_GEMM_TRITON"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("plugin_invariance_gpu.py needs a CUDA device (or --smoke)")
    from trtcompress.compressed.formats import NVFP4, IntFormat
    from trtcompress.plugins.w4a4_fp4_gemm import op as w4a4_op
    from trtcompress.plugins.w4a16_gemm import op as w4a16_op
    from trtcompress.runtime import linear, plugins

    device = torch.device("cpu" if args.smoke else "cuda")
    route = torch.device("cuda")  # the runtime's CUDA routing; in --smoke the ops stay on the CPU
    if args.smoke:  # the routing of tests/runtime/test_linear_plugins.py
        plugins.plugin_for = lambda s, d: w4a4_op.w4a4_linear(s, "cpu") or w4a16_op.w4a16_linear(s, "cpu")
        plugins.fused_plugin_for = lambda states, d: w4a16_op.w4a16_fused_linear(states, "cpu")
    formats = {
        "int4 sym g128": IntFormat(4, 128, True),
        "int4 asym g128": IntFormat(4, 128, False),
        "int4 sym g64": IntFormat(4, 64, True),
        "nvfp4": NVFP4,
    }
    max_rows = 40 if args.smoke else 300
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "smoke": args.smoke, "max_rows": max_rows, "rows": []}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape, (k, ns) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        for fmt_name, fmt in formats.items():
            row = {"shape": shape, "format": fmt_name, "k": k, "n": ns}
            try:
                modules = layers_for(k, ns, fmt, seed=len(result["rows"]))
                built = linear.build_group(modules, 0, route)
                for lin in built:
                    lin.device = device
                row["ops"] = [getattr(lin.plugin, "__qualname__", None) for lin in built]
                if any(lin.plugin is None for lin in built):
                    row["error"] = "no plugin op covers this layer"
                else:
                    row["invariant_whole"] = not linear.varying_plugin_kinds(built, max_rows)
                    row["invariant_as_run"] = linear.plugins_batch_invariant(built, max_rows)
                    row["tiles"] = [lin.tile for lin in built]  # FALLBACK_TILE where whole calls vary
                    x = torch.randn(17, k, generator=torch.Generator().manual_seed(1))
                    got = torch.cat([lin(x.to(device)).float().cpu() for lin in built], dim=-1)
                    ref = torch.cat([m.state.forward(x) for m in modules], dim=-1)
                    row["max_abs_diff_vs_cpu_fp32"] = (got - ref).abs().max().item()
                    row["max_abs_ref"] = ref.abs().max().item()
            except Exception as exc:  # keep the other rows
                row["error"] = repr(exc)[:400]
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=1), encoding="utf-8")
            print(json.dumps(row), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
