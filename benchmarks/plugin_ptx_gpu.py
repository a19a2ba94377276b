"""GPU check of the TensorRT plugins' AOT PTX: the PTX made on a CPU machine runs through the CUDA driver.

`prepare DIR` (CPU, needs trtcompress + triton): for each plugin kernel configuration, compile the PTX the
plugin's `aot_impl` hands TensorRT (plugins/aot.py), the launch parameters it computes, random inputs
in the plugin's layout and the torch reference output; saved with torch.save.
`run DIR OUT` (GPU, needs only torch and the CUDA driver): load each PTX with cuModuleLoadData (what
TensorRT does with an AOT plugin's PTX), launch it with cuLaunchKernel using exactly those parameters
(inputs, int32 extras, outputs, then null pointers for Triton's scratch parameters), compare with the
reference and time it; writes OUT/plugin_ptx_gpu.json.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

import torch


def _gear_case(codec_name: str, lengths: list[int], seed: int, sink: int = 0, **options) -> dict:
    from trtcompress.kv import get_codec
    from trtcompress.kv.paged import PagedKVCache
    from trtcompress.plugins.aot import GEAR_SHAPE, compile_gear, gear_launch
    from trtcompress.plugins.gear_attention import gear_attention_reference, layout_for_codec
    from trtcompress.plugins.gear_attention.trt import FIELDS

    heads, q_heads, dim = GEAR_SHAPE["heads"], GEAR_SHAPE["q_heads"], GEAR_SHAPE["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    codec = get_codec(codec_name, **options)
    cache = PagedKVCache(
        codec, 1, heads, dim, num_blocks=sum(n // 64 for n in lengths) + 1, max_seqs=len(lengths),
        sink_tokens=sink,
    )  # fmt: skip
    for s, n in enumerate(lengths):
        cache.add_sequence(s)
        cache.reserve(s, n)
        k = torch.randn(heads, n, dim, generator=gen) * 2
        k[:, :1] *= 5 if sink else 1  # a sink-like first token
        cache.write(0, s, k, torch.randn(heads, n, dim, generator=gen))
        cache.commit(s, n)
    seqs = list(range(len(lengths)))
    table, lens = cache.block_table(seqs)
    nb = lens // 64
    k_fields = {n: t[0] for n, t in cache.pools["k"].items()}
    v_fields = {n: t[0] for n, t in cache.pools["v"].items()}
    tails = (cache.tails["k"][0], cache.tails["v"][0])
    q = torch.randn(len(seqs), q_heads, dim, generator=gen).half()
    scale = dim**-0.5
    layout = layout_for_codec(codec, dim, sink)
    args = (k_fields, v_fields, *tails, table, nb, lens - nb * 64, cache.tail_slots(seqs))
    sinks = {"k_sink": cache.sinks["k"][0], "v_sink": cache.sinks["v"][0]} if sink else {}
    ref = gear_attention_reference(q.float(), *args, layout, scale, **sinks)
    kernel = compile_gear(codec_name, sink=sink, **options)
    placeholder = torch.zeros(1, dtype=torch.float16)

    def as_plugin_input(t: torch.Tensor) -> torch.Tensor:  # TensorRT has no fp8 input: E4M3 bits as INT8
        return t.view(torch.int8) if t.dtype == torch.float8_e4m3fn else t

    def fields(f):
        return [as_plugin_input(f[n].contiguous()) if n in f else placeholder for n in FIELDS]

    sink_inputs = [sinks[k].half().contiguous() for k in ("k_sink", "v_sink")] if sink else [placeholder] * 2
    i32 = [t.to(torch.int32).contiguous() for t in (table, nb, lens - nb * 64, cache.tail_slots(seqs))]
    inputs = [q, *i32, *fields(k_fields), *fields(v_fields), tails[0].contiguous(), tails[1].contiguous()]
    inputs += sink_inputs
    launch = gear_launch(len(seqs), heads, table.shape[1], kernel)
    return {
        "plugin": kernel.plugin, "config": kernel.config, "name": kernel.name, "ptx": kernel.ptx,
        "entry_params": kernel.entry_params(), "inputs": inputs, "extra_args": list(launch["extra_args"]),
        "outputs": [torch.empty(len(seqs), q_heads, dim, dtype=torch.float32)], "grid": launch["grid"],
        "block": launch["block"], "shared": launch["shared"], "reference": ref,
        "atol": 1e-3 + 1e-3 * float(ref.abs().max()),  # fp16 operands, fp32 accumulation (gear_attention.py)
    }  # fmt: skip


def _gemm_case(plugin: str, m: int, n: int, k: int, tactic: int, seed: int, **cfg) -> dict:
    """A W4A16 / W4A4 GEMM in the plugin's layout, its AOT PTX and launch parameters, the state's output."""
    from trtcompress.compressed.formats import FpFormat, IntFormat
    from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
    from trtcompress.plugins import gemm_trt
    from trtcompress.plugins.aot import AotKernel

    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=gen) * 0.05, torch.randn(m, k, generator=gen).half()
    if plugin == "w4a16":
        from trtcompress.plugins.w4a16_gemm import trt

        fmt = IntFormat(4, cfg["group"], cfg["symmetric"])
        q = QuantizedWeight.round_to_nearest(w, fmt)
        zeros = q.zeros if q.zeros is not None else torch.zeros(1, dtype=torch.uint8)
        inputs = [x, q.qweight, q.scales, zeros]
        state = CompressedLinearState(n, k, q)
        name, ptx, shared = trt.compile_ptx(cfg["group"], cfg["symmetric"], tactic)
        config = f"g{cfg['group']}/{'sym' if cfg['symmetric'] else 'asym'}"
    else:
        from trtcompress.plugins.w4a4_fp4_gemm import trt

        w_exp, w_man, a_exp, a_man = cfg["formats"]
        q = QuantizedWeight.round_to_nearest(w, FpFormat(w_exp, w_man, 0))
        shift = torch.randint(0, 2**a_exp, (k,), generator=gen, dtype=torch.uint8)
        act = ActQuantizer(a_exp, a_man, torch.tensor([float(x.float().abs().max()) / 6]), shift)
        inputs = [x, q.qweight, q.scales, act.scale, shift]
        state = CompressedLinearState(n, k, q, act_quant=act)
        name, ptx, shared = trt.compile_ptx(cfg["formats"], 0, tactic)
        config = "w_e{}m{}/a_e{}m{}".format(*cfg["formats"])
    launch = gemm_trt.launch_params(m, n, k, tactic, shared)
    ref = state.forward(x.float())
    kernel = AotKernel(trt.PLUGIN_ID, config, name, ptx)
    return {
        "plugin": trt.PLUGIN_ID,
        "config": f"{config}/M{m}xN{n}xK{k}/tactic{tactic}",
        "name": name,
        "ptx": ptx,
        "entry_params": kernel.entry_params(),
        "inputs": inputs,
        "extra_args": list(launch.extra_args),
        "outputs": [torch.empty(m, n, dtype=torch.float16)],
        "grid": (launch.grid_x, launch.grid_y, launch.grid_z),
        "block": (launch.block_x, 1, 1),
        "shared": launch.shared_mem,
        "reference": ref,
        "atol": 2e-3 * float(ref.abs().max()) + 1e-3,  # fp16 output of an fp32-accumulated GEMM
    }


def prepare(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [
        ("kivi-2bit", [150, 64], 0, {}),
        ("kivi-4bit", [128, 200, 37], 1, {}),
        ("gear-2bit", [200, 64, 37], 2, {"outlier_dtype": "fp16", "scale_dtype": "fp16"}),
        ("gear-2bit", [331], 3, {"outlier_scope": "group", "scale_dtype": "fp16"}),
        ("gear-4bit", [190, 129], 4, {}),  # the default: fp8 outlier values
        ("gear-2bit", [200, 64, 37], 5, {"outlier_dtype": "fp8", "sink": 1, "scale_dtype": "fp16"}),
        ("gear-2bit", [331, 70], 6, {"outlier_dtype": "int8"}),  # (with the default fp8 scales)
        ("kivi-2bit", [150, 64], 7, {"sink": 1}),
        ("gear-4bit", [190, 129], 8, {"factor_dtype": "int4"}),
        ("gear-2bit", [200, 64, 37], 9, {"sink": 1}),  # the serving default: fp8 outliers and scales
    ]
    for i, (codec, lengths, seed, options) in enumerate(cases):
        torch.save(_gear_case(codec, lengths, seed, **options), out_dir / f"case{i:02d}.pt")
    gemms = []
    for tactic in (1, 2, 3, 4):  # every tactic, decode-like and prefill-like M, SmolLM2 widths
        for m, n, k in ((1, 576, 1536), (37, 1536, 576), (300, 576, 576)):
            gemms.append(("w4a16", m, n, k, tactic, {"group": 128, "symmetric": True}))
            gemms.append(("w4a4", m, n, k, tactic, {"formats": (2, 1, 2, 1)}))
    gemms += [("w4a16", 64, 576, 576, 2, {"group": 64, "symmetric": False}),
              ("w4a4", 64, 576, 576, 3, {"formats": (3, 0, 2, 1)}),
              ("w4a4", 64, 576, 576, 1, {"formats": (1, 2, 3, 0)})]  # fmt: skip
    for j, (plugin, m, n, k, tactic, cfg) in enumerate(gemms):
        torch.save(_gemm_case(plugin, m, n, k, tactic, j, **cfg), out_dir / f"case{len(cases) + j:02d}.pt")
    print(f"prepared {len(cases) + len(gemms)} cases in {out_dir}")


def _driver():
    cuda = ctypes.CDLL("libcuda.so.1")

    def check(result: int, what: str) -> None:
        if result != 0:
            msg = ctypes.c_char_p()
            cuda.cuGetErrorString(result, ctypes.byref(msg))
            raise RuntimeError(f"{what}: CUDA error {result} {msg.value!r}")

    return cuda, check


def run(case_dir: Path, out_dir: Path) -> None:
    cuda, check = _driver()
    torch.zeros(1, device="cuda")  # the primary context, current on this thread
    stream = torch.cuda.current_stream()
    results = []
    for path in sorted(case_dir.glob("case*.pt")):
        case = torch.load(path, weights_only=False)
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        check(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(case["ptx"].encode())), "load PTX")
        check(cuda.cuModuleGetFunction(ctypes.byref(fn), module, case["name"].encode()), "get function")
        inputs = [t.cuda() for t in case["inputs"]]
        outputs = [t.cuda() for t in case["outputs"]]
        params = [ctypes.c_void_p(t.data_ptr()) for t in inputs]
        params += [ctypes.c_int32(v) for v in case["extra_args"]]
        params += [ctypes.c_void_p(t.data_ptr()) for t in outputs]
        params += [ctypes.c_void_p(0)] * (case["entry_params"] - len(params))  # Triton's scratch pointers
        argv = (ctypes.c_void_p * len(params))(
            *[ctypes.cast(ctypes.pointer(p), ctypes.c_void_p) for p in params]
        )

        def launch(fn=fn, case=case, argv=argv) -> None:
            grid, block = case["grid"], case["block"]
            handle = ctypes.c_void_p(stream.cuda_stream)
            check(cuda.cuLaunchKernel(fn, *grid, *block, case["shared"], handle, argv, None), "launch")

        launch()
        torch.cuda.synchronize()
        got = outputs[0].float().cpu()
        diff = (got - case["reference"]).abs()
        err, over = float(diff.max()), int((diff > case["atol"]).sum())
        for _ in range(3):
            launch()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            launch()
        torch.cuda.synchronize()
        us = (time.perf_counter() - start) / 50 * 1e6
        ok = err <= case["atol"]
        keys = ("plugin", "config", "grid", "block", "shared", "atol")
        results.append({k: case[k] for k in keys} | {"kernel": case["name"], "max_abs_err": err, "ok": ok,
                                                      "outputs": got.numel(), "outputs_over_atol": over,
                                                      "us_per_launch": round(us, 2)})  # fmt: skip
        print(json.dumps(results[-1]))
        check(cuda.cuModuleUnload(module), "unload")
    device = torch.cuda.get_device_name()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plugin_ptx_gpu.json").write_text(json.dumps({"device": device, "cases": results}, indent=1))
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    from _util import exit_if_help

    exit_if_help(__doc__)
    if sys.argv[1:2] == ["prepare"] and len(sys.argv) == 3:
        prepare(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 4:
        if not torch.cuda.is_available():
            raise SystemExit("plugin_ptx_gpu.py run launches PTX through the CUDA driver: needs a CUDA GPU")
        run(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("usage: python benchmarks/plugin_ptx_gpu.py prepare DIR | run DIR OUT")
