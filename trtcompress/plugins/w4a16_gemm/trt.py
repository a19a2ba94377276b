"""TensorRT quickly-deployable plugin `trtcompress::w4a16_gemm` (tensorrt imported lazily).

Inputs: x (M, K) fp16; qweight (N, ceil(K/2)) uint8 (int4 codes, LSB-first along K); scales
(N, ceil(K/group)) fp16; zeros (N, groups) uint8 (a 1-element placeholder when symmetric). Attrs:
group_size (> 0; a per-channel weight uses K), symmetric (0/1). Output: out (M, N) fp16 =
x @ ((codes - zero) * scale)ᵀ, zero = 8 when symmetric: CompressedLinearState.forward.

Kernel contract (`kernel.py`, issue 6): `w4a16_gemm_trt_kernel(x_ptr, w_ptr, s_ptr, z_ptr, M, N, K,
out_ptr, GROUP, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K)`: TensorRT's AOT order (inputs, int32 extras,
output), one program per (BLOCK_M, BLOCK_N) output tile, grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
`compile_ptx` checks the kernel against it before compiling.

No `from __future__ import annotations` here: `tensorrt.plugin` inspects the annotations of the plugin
functions and needs real classes, not strings (see qdp_schema.py).
"""

from trtcompress.plugins import gemm_trt as g
from trtcompress.plugins.registration import register_once

PLUGIN_ID = "trtcompress::w4a16_gemm"
KERNEL = "w4a16_gemm_trt_kernel"
INPUTS = {"x_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*u8"}
EXTRA = {"M": "i32", "N": "i32", "K": "i32"}
OUTPUTS = {"out_ptr": "*fp16"}
IO_TYPES = "FP16, UINT8, FP16, UINT8, FP16"  # inputs then the output, for the autotune combination


def kernel():
    """The Triton kernel TensorRT launches (from the kernel owner's module)."""
    return g.import_kernel(PLUGIN_ID, "trtcompress.plugins.w4a16_gemm.kernel", KERNEL)


def constants(group_size: int, symmetric: bool, tactic: int) -> dict:
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0 (a per-channel weight uses K), got {group_size}")
    tile = g.tile_for(tactic)
    return {"GROUP": group_size, "SYMMETRIC": bool(symmetric), "BLOCK_M": tile.block_m,
            "BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k}  # fmt: skip


def compile_ptx(group_size: int, symmetric: bool, tactic: int, arch: int = 90) -> tuple[str, str, int]:
    """(entry name, PTX, shared bytes) for one attribute set and tactic; runs on CPU."""
    fn = kernel()
    consts = constants(group_size, symmetric, tactic)
    g.check_kernel_interface(fn, list(INPUTS), list(EXTRA), list(OUTPUTS), consts)
    signature = INPUTS | EXTRA | OUTPUTS
    return g.compile_triton_ptx(fn, signature, consts, g.tile_for(tactic).num_warps, arch)


def symbolic_launch(trtp, x, qweight, tactic: int, shared: int):
    """`gemm_trt.launch_params` on TensorRT's symbolic shapes (M = all leading dims of x)."""
    tile = g.tile_for(tactic)
    k = x.shape_expr[-1]
    m = x.shape_expr.numel() // k
    n = qweight.shape_expr[0]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(m, tile.block_m)
    launch.grid_y = trtp.cdiv(n, tile.block_n)
    launch.block_x = tile.num_warps * 32
    launch.shared_mem = shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(m), trtp.SymInt32(n), trtp.SymInt32(k)])
    return launch, extra


def plugin_functions(trtp):
    """(register, autotune, aot_impl) of the plugin, annotated with `trtp`'s classes (not yet registered)."""
    Desc = trtp.TensorDesc
    AotResult = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    def register(x: Desc, qweight: Desc, scales: Desc, zeros: Desc, group_size: int, symmetric: int) -> Desc:
        out = x.like()
        out.shape_expr[-1] = qweight.shape_expr[0]
        return out

    def autotune(x, qweight, scales, zeros, group_size: int, symmetric: int, outputs):
        return [trtp.AutoTuneCombination(IO_TYPES, "LINEAR", list(g.TACTICS))]

    def aot_impl(
        x, qweight, scales, zeros, group_size: int, symmetric: int, outputs, tactic: int
    ) -> AotResult:
        name, ptx, shared = compile_ptx(group_size, bool(symmetric), tactic)
        launch, extra = symbolic_launch(trtp, x, qweight, tactic, shared)
        return name.encode(), ptx.encode(), launch, extra

    return register, autotune, aot_impl


def register_trt_plugin() -> None:
    """Register `trtcompress::w4a16_gemm` with TensorRT's plugin registry (idempotent)."""
    _, trtp = g.import_trt()
    register_once(PLUGIN_ID, plugin_functions, trtp)


__all__ = ["KERNEL", "PLUGIN_ID", "compile_ptx", "constants", "plugin_functions", "register_trt_plugin"]
