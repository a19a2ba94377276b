"""Ahead-of-time PTX for every TensorRT plugin kernel and configuration (runs on CPU, no GPU, no TensorRT).

This is what the plugins' `aot_impl` hand to TensorRT, enumerated: the GEAR/KIVI decode attention for
each cache codec (both outlier scopes for GEAR), the W4A16 GEMM for each group size, symmetry and
tactic, the LLM-FP4 W4A4 GEMM for each element-format pair and tactic. `python -m trtcompress.plugins.aot`
prints a JSON summary (entry names, PTX sizes, compile times); the tests and the GPU check use
`compile_all`. A GEMM whose Triton kernel module is not there yet is reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

GEAR_CODECS = ("kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit", "gear-4bit")
# SmolLM2: 3 KV heads, 9 query heads, head_dim 64
GEAR_SHAPE = {"heads": 3, "q_heads": 9, "head_dim": 64}
W4A16_CONFIGS = tuple((g, s) for g in (64, 128) for s in (True, False))
W4A4_FORMATS = ((2, 1, 2, 1), (3, 0, 2, 1), (2, 1, 3, 0), (1, 2, 2, 1))


@dataclass
class AotKernel:
    plugin: str
    config: str
    name: str = ""  # the kernel entry in the PTX, what TensorRT launches
    ptx: str = field(default="", repr=False)
    num_warps: int = 0
    shared: int = 0
    seconds: float = 0.0
    unavailable: str | None = None  # why it was not compiled (kernel module missing)

    def entry_params(self) -> int:
        """Number of parameters of the PTX entry (inputs + extras + outputs + Triton's scratch pointers)."""
        match = re.search(rf"\.entry {re.escape(self.name)}\((.*?)\)", self.ptx, re.S)
        return 0 if match is None else match.group(1).count(".param")

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "ptx"}
        data.update(ptx_bytes=len(self.ptx), entry_params=self.entry_params())
        return data


def gear_configs() -> Iterator[tuple[str, dict]]:
    """Each codec without sink tokens: KIVI, GEAR with its defaults (block-scope outliers with fp8
    values; gear-2bit also fp8 group scales) and with fp16 values and scales in both outlier scopes;
    then a sink token (the serving default) with the defaults and with fp16 scales, int8 outlier
    values and int4 low-rank factors."""
    fp16_scales = {"scale_dtype": "fp16"}
    for codec in GEAR_CODECS:
        if codec.startswith("kivi"):
            yield codec, {"codec": codec}
            continue
        yield f"{codec}/block/fp8" + ("/fp8s" if codec == "gear-2bit" else ""), {"codec": codec}
        yield f"{codec}/block", {"codec": codec, "outlier_dtype": "fp16"} | fp16_scales
        yield f"{codec}/group", {"codec": codec, "outlier_scope": "group"} | fp16_scales
    yield "gear-2bit/block/fp8/fp8s/sink1", {"codec": "gear-2bit", "sink": 1}
    yield "gear-2bit/block/fp8/sink1", {"codec": "gear-2bit", "sink": 1} | fp16_scales
    yield "gear-2bit/block/int8/fp8s", {"codec": "gear-2bit", "outlier_dtype": "int8"}
    yield "gear-4bit/block/fp8/int4f", {"codec": "gear-4bit", "factor_dtype": "int4"}
    yield "kivi-2bit/sink1", {"codec": "kivi-2bit", "sink": 1}


def compile_gear(codec: str, arch: int = 90, sink: int = 0, **options) -> AotKernel:
    """PTX of the GEAR plugin for one codec (`options`: the codec's, e.g. outlier_scope, outlier_dtype)
    and cache (`sink` tokens), at GEAR_SHAPE."""
    from trtcompress.kv import get_codec
    from trtcompress.plugins.gear_attention import layout_for_codec
    from trtcompress.plugins.gear_attention.trt import compile_gear_attention_ptx

    shape = GEAR_SHAPE
    kv_codec = get_codec(codec, **options)
    layout = layout_for_codec(kv_codec, shape["head_dim"], sink)
    name = [codec]
    if codec.startswith("gear"):
        name += [kv_codec.outlier_scope] + ([kv_codec.outlier_dtype] if layout.outlier_scaled else [])
        name += ["int4f"] if layout.int4_factors else []
    name += ["fp8s"] if layout.scales_fp8 else []
    start = time.perf_counter()
    c = compile_gear_attention_ptx(
        layout, shape["heads"], shape["q_heads"], shape["head_dim"], shape["head_dim"] ** -0.5, arch
    )
    return AotKernel(
        "trtcompress::gear_attention",
        "/".join(name) + (f"/sink{sink}" if sink else ""),
        c.name,
        c.ptx,
        c.num_warps,
        c.shared,
        time.perf_counter() - start,
    )


def gear_launch(batch: int, heads: int, max_blocks: int, kernel: AotKernel) -> dict:
    """The launch the gear plugin's `aot_impl` describes: grid (B, KV heads, 1), extra arg max_blocks."""
    return {"grid": (batch, heads, 1), "block": (kernel.num_warps * 32, 1, 1), "shared": kernel.shared,
            "extra_args": (max_blocks,)}  # fmt: skip


def _gemm(plugin: str, config: str, compile_fn, tactic: int, arch: int) -> AotKernel:
    from trtcompress.plugins.gemm_trt import tile_for

    start = time.perf_counter()
    try:
        name, ptx, shared = compile_fn(arch)
    except ImportError as exc:  # the kernel owner's module is not there (yet)
        return AotKernel(plugin, config, unavailable=str(exc))
    return AotKernel(
        plugin, config, name, ptx, tile_for(tactic).num_warps, shared, time.perf_counter() - start
    )


def compile_w4a16(arch: int = 90, tactics: tuple[int, ...] | None = None, configs: int | None = None):
    from trtcompress.plugins.gemm_trt import TACTICS
    from trtcompress.plugins.w4a16_gemm import trt

    for group, sym in W4A16_CONFIGS[:configs]:
        for tactic in tactics or TACTICS:
            config = f"g{group}/{'sym' if sym else 'asym'}/tactic{tactic}"
            build = lambda a, g=group, s=sym, t=tactic: trt.compile_ptx(g, s, t, a)  # noqa: E731
            kernel = _gemm(trt.PLUGIN_ID, config, build, tactic, arch)
            yield kernel
            if kernel.unavailable:
                return


def compile_w4a4(arch: int = 90, tactics: tuple[int, ...] | None = None, configs: int | None = None):
    from trtcompress.plugins.gemm_trt import TACTICS
    from trtcompress.plugins.w4a4_fp4_gemm import trt

    for formats in W4A4_FORMATS[:configs]:
        for tactic in tactics or TACTICS:
            config = "w_e{}m{}/a_e{}m{}".format(*formats) + f"/ch/tactic{tactic}"
            build = lambda a, f=formats, t=tactic: trt.compile_ptx(f, 0, t, a)  # noqa: E731
            kernel = _gemm(trt.PLUGIN_ID, config, build, tactic, arch)
            yield kernel
            if kernel.unavailable:
                return


def compile_all(
    arch: int = 90,
    plugins: tuple[str, ...] = ("gear", "w4a16", "w4a4"),
    tactics: tuple[int, ...] | None = None,
    configs: int | None = None,
) -> list[AotKernel]:
    """Every kernel and configuration; `tactics` / `configs` (the first N GEMM configurations) narrow it."""
    out: list[AotKernel] = []
    if "gear" in plugins:
        out += [compile_gear(arch=arch, **cfg) for _, cfg in gear_configs()]
    if "w4a16" in plugins:
        out += list(compile_w4a16(arch, tactics, configs))
    if "w4a4" in plugins:
        out += list(compile_w4a4(arch, tactics, configs))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    parser.add_argument("--plugins", default="gear,w4a16,w4a4")
    parser.add_argument("--ptx-dir", help="also write each PTX here as <plugin>-<config>.ptx")
    parser.add_argument("--tactics", help="GEMM tactics to compile, e.g. 1 or 1,4 (default: all)")
    parser.add_argument("--configs", type=int, help="only the first N configurations of each GEMM")
    args = parser.parse_args(argv)
    tactics = tuple(int(t) for t in args.tactics.split(",")) if args.tactics else None
    kernels = compile_all(args.arch, tuple(args.plugins.split(",")), tactics, args.configs)
    if args.ptx_dir:
        from pathlib import Path

        root = Path(args.ptx_dir)
        root.mkdir(parents=True, exist_ok=True)
        for k in kernels:
            if k.ptx:
                stem = f"{k.plugin.split('::')[1]}-{k.config.replace('/', '-')}"
                (root / f"{stem}.ptx").write_text(k.ptx, encoding="utf-8")
    print(json.dumps([k.summary() for k in kernels], indent=1))


if __name__ == "__main__":
    main()
