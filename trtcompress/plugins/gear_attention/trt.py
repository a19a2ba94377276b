"""TensorRT quickly-deployable plugin `trtcompress::gear_attention` (tensorrt imported lazily).

Its `aot_impl` returns PTX compiled ahead of time from the same Triton kernel as the torch op
(`kernel.gear_decode_trt_kernel`, one split), so an engine runs it with no Python at inference
time (REFERENCE section 3). `compile_gear_attention_ptx` needs only `triton` and runs on CPU; the
plugin registration needs TensorRT >= 10.9 (`tensorrt.plugin.aot_impl`).

Plugin inputs, in order (the kernel's parameter order; QDP appends int32 extra args, then outputs):
q (B, Hq, D) fp16; block_table (B, M) int32; num_blocks, tail_lens, slots (B,) int32; the 12 key fields
then the 12 value fields of one layer's pools (codes, scale, zero, out_val, out_idx, lr_a, lr_a_scale,
lr_b, lr_b_scale, out_scale, scale_max, zero_max; 1-element placeholders where the codec has none);
k_tail, v_tail (S, H, T, D) fp16; k_sink, v_sink (S, H, sink, D) fp16 (placeholders without sink tokens).
fp8 group scales and zeros (`scale_dtype: fp8`) travel as INT8 bits like fp8 outlier values.
TensorRT has no int16: block-scope outlier indices (int16) are passed bitcast to float16. One-byte
outlier values (`outlier_dtype` int8 / fp8) travel as INT8; fp8 ones are E4M3 bits (`.view(torch.int8)`),
which the kernel reads as float8e4nv.
Extra arg: M (max blocks per sequence). Output: (B, Hq, D) fp32. Grid: (B, H, 1).
"""

from dataclasses import dataclass

from trtcompress.errors import MissingDependencyError
from trtcompress.plugins.gear_attention.reference import GearLayout
from trtcompress.plugins.registration import TRT_HINT, import_trtp, register_once

PLUGIN_ID = "trtcompress::gear_attention"
INSTALL_HINT = TRT_HINT


@dataclass(frozen=True)
class CompiledPlugin:
    name: str  # kernel entry in the PTX
    ptx: str
    num_warps: int
    shared: int
    grid_y: int  # KV heads


OUTLIER_VALUE_TYPES = {"fp16": ("*fp16", "FP16"), "int8": ("*i8", "INT8"), "fp8": ("*fp8e4nv", "INT8")}


def _signature(layout: GearLayout) -> dict[str, str]:
    factor = "*u8" if layout.int4_factors else ("*i8" if layout.int8_factors else "*fp16")
    index = "*i16" if layout.outlier_scope == "block" else "*u8"
    value = OUTLIER_VALUE_TYPES[layout.outlier_dtype][0]
    meta = "*fp8e4nv" if layout.scales_fp8 else "*fp16"
    types = ("*u8", meta, meta, value, index, factor, "*fp16", factor, "*fp16", "*fp16", "*fp16", "*fp16")
    sig = {"q_ptr": "*fp16", "block_table_ptr": "*i32", "num_blocks_ptr": "*i32", "tail_len_ptr": "*i32"}
    sig["slot_ptr"] = "*i32"
    names_k = ("kc_ptr", "ks_ptr", "kz_ptr", "kov_ptr", "koi_ptr", "ka_ptr", "kas_ptr", "kb_ptr", "kbs_ptr")
    names_v = ("vc_ptr", "vs_ptr", "vz_ptr", "vov_ptr", "voi_ptr", "va_ptr", "vas_ptr", "vb_ptr", "vbs_ptr")
    sig |= dict(zip((*names_k, "kos_ptr", "ksm_ptr", "kzm_ptr"), types, strict=True))
    sig |= dict(zip((*names_v, "vos_ptr", "vsm_ptr", "vzm_ptr"), types, strict=True))
    sig |= {"kt_ptr": "*fp16", "vt_ptr": "*fp16", "ksink_ptr": "*fp16", "vsink_ptr": "*fp16"}
    sig |= {"max_blocks": "i32", "out_ptr": "*fp32"}
    return sig


def kernel_constants(
    layout: GearLayout, heads: int, q_heads: int, head_dim: int, sm_scale: float, asm: bool = True
) -> dict:
    """The constexprs `gear_decode_trt_kernel` is compiled with for one cache layout and head shape
    (`asm=False` only to run the kernel under TRITON_INTERPRET): the decode kernel's, one split (the
    entry has no SPLITS parameter), the softmax scale baked in."""
    from trtcompress.plugins.gear_attention.kernel import layout_constants

    constants = layout_constants(
        layout, heads, q_heads // heads, head_dim, splits=1, asm=asm,  # ASM: PTX unpacking on the GPU
        prefetch=not any(layout.outliers),  # as gear_attention_triton's default
        # one-hot outlier sums: this PTX is the one run through the CUDA driver on an H100
        # (benchmarks/plugin_ptx_gpu.py); "runs", faster in the Python op, is not yet checked that way
        outlier_sums="onehot",
    )  # fmt: skip
    del constants["SPLITS"]
    return {"SM_SCALE": sm_scale} | constants


def compile_gear_attention_ptx(
    layout: GearLayout, heads: int, q_heads: int, head_dim: int, sm_scale: float, arch: int = 90
) -> CompiledPlugin:
    """PTX for `gear_decode_trt_kernel` specialized on the cache layout (runs on CPU, no GPU needed)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise MissingDependencyError(
            "compiling the GEAR attention kernel needs `pip install triton==3.6.0`"
        ) from None
    from trtcompress.plugins.gear_attention.kernel import gear_decode_trt_kernel

    constants = kernel_constants(layout, heads, q_heads, head_dim, sm_scale)
    signature = _signature(layout) | dict.fromkeys(constants, "constexpr")
    src = triton.compiler.ASTSource(fn=gear_decode_trt_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    return CompiledPlugin(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        num_warps=compiled.metadata.num_warps,
        shared=compiled.metadata.shared,
        grid_y=heads,
    )


FIELDS = (  # the kernel's FIELD_ORDER, then the one-byte outlier values' and fp8 scales' block maxima
    "codes", "scale", "zero", "out_val", "out_idx", "lr_a", "lr_a_scale", "lr_b", "lr_b_scale", "out_scale",
    "scale_max", "zero_max",
)  # fmt: skip
INPUT_NAMES = (
    "q", "block_table", "num_blocks", "tail_lens", "slots",
    *(f"k_{f}" for f in FIELDS), *(f"v_{f}" for f in FIELDS), "k_tail", "v_tail", "k_sink", "v_sink",
)  # fmt: skip


def io_types(
    out_k: int, out_v: int, rank_k: int, rank_v: int, int8_factors: int, block_outliers: int,
    outlier_dtype: str = "fp16", int4_factors: int = 0, scales_fp8: int = 0,
) -> str:  # fmt: skip
    """The autotune type combination (inputs in INPUT_NAMES order, then the output) for one cache layout.

    Absent fields (no outliers, no low-rank factors, no one-byte outlier scales, no sink) are 1-element
    FP16 placeholders, as the torch op passes them; block-scope outlier indices (int16) travel bitcast to
    FP16 (TensorRT has no int16), one-byte outlier values as INT8, int4 factor codes as UINT8 (two per
    byte)."""
    value_type = _outlier_value_type(outlier_dtype)

    def side(outliers: int, rank: int) -> list[str]:
        index = "FP16" if outliers == 0 or block_outliers else "UINT8"
        value = value_type if outliers else "FP16"
        factor = ("UINT8" if int4_factors else "INT8") if rank and int8_factors else "FP16"
        meta = "INT8" if scales_fp8 else "FP16"
        return ["UINT8", meta, meta, value, index, factor, "FP16", factor, "FP16", "FP16", "FP16", "FP16"]

    types_ = ["FP16", "INT32", "INT32", "INT32", "INT32", *side(out_k, rank_k), *side(out_v, rank_v)]
    return ", ".join([*types_, "FP16", "FP16", "FP16", "FP16", "FP32"])


def _outlier_value_type(outlier_dtype: str) -> str:
    if outlier_dtype not in OUTLIER_VALUE_TYPES:
        raise ValueError(
            f"gear_attention plugin: outlier_dtype must be one of {sorted(OUTLIER_VALUE_TYPES)}, "
            f"got {outlier_dtype!r}"
        )
    return OUTLIER_VALUE_TYPES[outlier_dtype][1]


def plugin_functions(trtp):
    """(register, autotune, aot_impl) of the plugin, annotated with `trtp`'s classes (not yet registered).

    tensorrt.plugin reads the parameter names: one TensorDesc per input (no *args), then the attributes;
    autotune and aot_impl repeat the inputs and the attributes they use, in the same order."""
    D = trtp.TensorDesc
    Result = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]

    def register(
        q: D, block_table: D, num_blocks: D, tail_lens: D, slots: D,
        k_codes: D, k_scale: D, k_zero: D, k_out_val: D, k_out_idx: D, k_lr_a: D, k_lr_a_scale: D, k_lr_b: D,
        k_lr_b_scale: D, k_out_scale: D, k_scale_max: D, k_zero_max: D,
        v_codes: D, v_scale: D, v_zero: D, v_out_val: D, v_out_idx: D, v_lr_a: D, v_lr_a_scale: D, v_lr_b: D,
        v_lr_b_scale: D, v_out_scale: D, v_scale_max: D, v_zero_max: D,
        k_tail: D, v_tail: D, k_sink: D, v_sink: D,
        bits: int, block: int, group: int, out_k: int, out_v: int, rank_k: int, rank_v: int,
        int8_factors: int, int4_factors: int, block_outliers: int, sink: int, outlier_dtype: str,
        scales_fp8: int, sm_scale: float,
    ) -> D:  # fmt: skip
        return _describe(q)

    def autotune(
        q, block_table, num_blocks, tail_lens, slots,
        k_codes, k_scale, k_zero, k_out_val, k_out_idx, k_lr_a, k_lr_a_scale, k_lr_b, k_lr_b_scale,
        k_out_scale, k_scale_max, k_zero_max,
        v_codes, v_scale, v_zero, v_out_val, v_out_idx, v_lr_a, v_lr_a_scale, v_lr_b, v_lr_b_scale,
        v_out_scale, v_scale_max, v_zero_max,
        k_tail, v_tail, k_sink, v_sink,
        out_k: int, out_v: int, rank_k: int, rank_v: int, int8_factors: int, int4_factors: int,
        block_outliers: int, outlier_dtype: str, scales_fp8: int, outputs,
    ):  # fmt: skip
        types_ = io_types(
            out_k,
            out_v,
            rank_k,
            rank_v,
            int8_factors,
            block_outliers,
            outlier_dtype,
            int4_factors,
            scales_fp8,
        )
        return [trtp.AutoTuneCombination(types_, "LINEAR")]

    def aot_impl(
        q, block_table, num_blocks, tail_lens, slots,
        k_codes, k_scale, k_zero, k_out_val, k_out_idx, k_lr_a, k_lr_a_scale, k_lr_b, k_lr_b_scale,
        k_out_scale, k_scale_max, k_zero_max,
        v_codes, v_scale, v_zero, v_out_val, v_out_idx, v_lr_a, v_lr_a_scale, v_lr_b, v_lr_b_scale,
        v_out_scale, v_scale_max, v_zero_max,
        k_tail, v_tail, k_sink, v_sink,
        bits: int, block: int, group: int, out_k: int, out_v: int, rank_k: int, rank_v: int,
        int8_factors: int, int4_factors: int, block_outliers: int, sink: int, outlier_dtype: str,
        scales_fp8: int, sm_scale: float, outputs, tactic: int,
    ) -> Result:  # fmt: skip
        _outlier_value_type(outlier_dtype)
        if outlier_dtype != "fp16" and not block_outliers:
            raise ValueError("gear_attention plugin: one-byte outlier values need block-scope outliers")
        if int4_factors and not int8_factors:
            raise ValueError("gear_attention plugin: int4 factors are integer codes: set int8_factors too")
        layout = GearLayout(bits, block, group, (out_k, out_v), (rank_k, rank_v), bool(int8_factors),
                            "block" if block_outliers else "group", sink, outlier_dtype,
                            bool(int4_factors), bool(scales_fp8))  # fmt: skip
        return _aot(trtp, q, block_table, k_tail, layout, sm_scale)

    return register, autotune, aot_impl


def _describe(q):
    import tensorrt as trt

    out = q.like()
    out.dtype = trt.float32
    return out


def _constant(expr, what: str) -> int:
    """A build-time constant dimension: tensorrt.plugin's `ShapeExpr.constant_value` is a method (TensorRT
    python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py), not a property."""
    if not expr.is_constant:
        raise ValueError(f"gear_attention plugin: the {what} must be a build-time constant (the kernel is "
                         "specialized on it)")  # fmt: skip
    return int(expr.constant_value())


def _aot(trtp, q, block_table, k_tail, layout: GearLayout, sm_scale: float):
    """Compile for the layout and the (build-time constant) head counts; grid (B, KV heads, 1)."""
    heads, head_dim = k_tail.shape_expr[1], k_tail.shape_expr[3]
    compiled = compile_gear_attention_ptx(
        layout,
        _constant(heads, "KV heads (k_tail dim 1)"),
        _constant(q.shape_expr[1], "query heads (q dim 1)"),
        _constant(head_dim, "head dim (k_tail dim 3)"),
        sm_scale,
    )
    launch = trtp.KernelLaunchParams()
    launch.grid_x = q.shape_expr[0]
    launch.grid_y = heads
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(block_table.shape_expr[1])])
    return compiled.name.encode(), compiled.ptx.encode(), launch, extra


def register_trt_plugin() -> None:
    """Register `trtcompress::gear_attention` with TensorRT's plugin registry (idempotent)."""
    register_once(PLUGIN_ID, plugin_functions, import_trtp(INSTALL_HINT))
