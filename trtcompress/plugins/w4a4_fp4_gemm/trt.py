"""TensorRT quickly-deployable plugin `trtcompress::w4a4_fp4_gemm` (LLM-FP4 W4A4; tensorrt imported lazily).

Inputs: x (M, K) fp16; qweight (N, ceil(K/2)) uint8 (4-bit ExMy codes, LSB-first along K); scales
(N, groups) fp16 (per channel: groups = 1); act_scale (1,) fp32 (the tensor-wise activation scale);
act_shift (K,) uint8 (per-channel power-of-two pre-shift; zeros when the layer has none). Attrs: the
weight and activation element formats (w_exp, w_man, a_exp, a_man) and group_size (0 = per channel).
Output out (M, N) fp16: the activations are quantized in the kernel (x / act_scale * 2**shift rounded to
the a_exp/a_man grid), then one FP4 x FP4 GEMM: CompressedLinearState.forward.

Kernel contract (`kernel.py`, issue 6): `w4a4_fp4_gemm_trt_kernel(x_ptr, w_ptr, s_ptr, as_ptr, sh_ptr,
M, N, K, out_ptr, W_EXP, W_MAN, A_EXP, A_MAN, GROUP, BLOCK_M, BLOCK_N, BLOCK_K)`: TensorRT's AOT order,
grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)). `compile_ptx` checks the kernel against it before compiling.
No `from __future__ import annotations` (tensorrt.plugin needs real annotation classes).
"""

from trtcompress.plugins import gemm_trt as g
from trtcompress.plugins.registration import register_once
from trtcompress.plugins.w4a16_gemm.trt import symbolic_launch

PLUGIN_ID = "trtcompress::w4a4_fp4_gemm"
KERNEL = "w4a4_fp4_gemm_trt_kernel"
INPUTS = {"x_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp16", "as_ptr": "*fp32", "sh_ptr": "*u8"}
EXTRA = {"M": "i32", "N": "i32", "K": "i32"}
OUTPUTS = {"out_ptr": "*fp16"}
IO_TYPES = "FP16, UINT8, FP16, FP32, UINT8, FP16"
# (w_exp, w_man) x (a_exp, a_man) the LLM-FP4 search can pick: E3M0, E2M1, E1M2 for each side
FORMATS = ((3, 0), (2, 1), (1, 2))


def kernel():
    return g.import_kernel(PLUGIN_ID, "trtcompress.plugins.w4a4_fp4_gemm.kernel", KERNEL)


def constants(formats: tuple[int, int, int, int], group_size: int, tactic: int) -> dict:
    w_exp, w_man, a_exp, a_man = formats
    for exp, man in ((w_exp, w_man), (a_exp, a_man)):
        if (exp, man) not in FORMATS:
            raise ValueError(f"E{exp}M{man} is not a 4-bit FP format the kernel takes ({FORMATS})")
    tile = g.tile_for(tactic)
    return {"W_EXP": w_exp, "W_MAN": w_man, "A_EXP": a_exp, "A_MAN": a_man, "GROUP": group_size,
            "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k}  # fmt: skip


def compile_ptx(formats: tuple[int, int, int, int], group_size: int, tactic: int, arch: int = 90):
    """(entry name, PTX, shared bytes) for one format pair, group size and tactic; runs on CPU."""
    fn = kernel()
    consts = constants(formats, group_size, tactic)
    g.check_kernel_interface(fn, list(INPUTS), list(EXTRA), list(OUTPUTS), consts)
    return g.compile_triton_ptx(fn, INPUTS | EXTRA | OUTPUTS, consts, g.tile_for(tactic).num_warps, arch)


def plugin_functions(trtp):
    """(register, autotune, aot_impl) of the plugin, annotated with `trtp`'s classes (not yet registered)."""
    Desc = trtp.TensorDesc
    AotResult = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    def register(
        x: Desc, qweight: Desc, scales: Desc, act_scale: Desc, act_shift: Desc,
        w_exp: int, w_man: int, a_exp: int, a_man: int, group_size: int,
    ) -> Desc:  # fmt: skip
        out = x.like()
        out.shape_expr[-1] = qweight.shape_expr[0]
        return out

    def autotune(x, qweight, scales, act_scale, act_shift, w_exp: int, w_man: int, a_exp: int, a_man: int,
                 group_size: int, outputs):  # fmt: skip
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR", list(g.TACTICS))]

    def aot_impl(x, qweight, scales, act_scale, act_shift, w_exp: int, w_man: int, a_exp: int, a_man: int,
                 group_size: int, outputs, tactic: int) -> AotResult:  # fmt: skip
        name, ptx, shared = compile_ptx((w_exp, w_man, a_exp, a_man), group_size, tactic)
        launch, extra = symbolic_launch(trtp, x, qweight, tactic, shared)
        return name.encode(), ptx.encode(), launch, extra

    return register, autotune, aot_impl


def register_trt_plugin() -> None:
    """Register `trtcompress::w4a4_fp4_gemm` with TensorRT's plugin registry (idempotent)."""
    _, trtp = g.import_trt()
    register_once(PLUGIN_ID, plugin_functions, trtp)


__all__ = [
    "FORMATS",
    "KERNEL",
    "PLUGIN_ID",
    "compile_ptx",
    "constants",
    "plugin_functions",
    "register_trt_plugin",
]
