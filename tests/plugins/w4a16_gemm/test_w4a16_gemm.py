"""W4A16 GEMM: reference == the canonical CompressedLinearState math; Triton kernels (interpreted on CPU)
== reference for INT4 (symmetric, asymmetric, partial groups, odd K) and FP4 (fp16, E8M0, E4M3 scales)."""

from __future__ import annotations

import pytest
import torch
import triton

from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import FpFormat, IntFormat
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.plugins import gemm_trt
from trtcompress.plugins.w4a16_gemm import trt
from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_triton, w4a16_gemm_trt_kernel
from trtcompress.plugins.w4a16_gemm.op import w4a16_gemm, w4a16_linear
from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference

FORMATS = {
    "int4_g64_sym": IntFormat(4, 64, True),
    "int4_g32_asym": IntFormat(4, 32, False),
    "int4_channel": IntFormat(4, 0, True),
    "int4_g48": IntFormat(4, 48, True),  # groups straddle K blocks: the element-wise path
    "fp4_e2m1_g32": FpFormat(2, 1, 32),
    "mxfp4": FpFormat(2, 1, 32, "e8m0"),
    "nvfp4": FpFormat(2, 1, 16, "e4m3"),
}


def _weight(name: str, n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    fmt = FORMATS[name]
    q = QuantizedWeight.round_to_nearest(w, fmt)
    fp = isinstance(fmt, FpFormat)
    scales = fpgrid.effective_scales(q.scales, q.global_scale, fmt) if fp else q.scales
    args = (q.qweight, scales, q.zeros, fmt.group_size, q.zeros is None,
            fmt.exp_bits if fp else 0, fmt.man_bits if fp else 0)  # fmt: skip
    return q, args


@pytest.mark.parametrize("name", list(FORMATS))
def test_reference_is_the_canonical_dequantized_linear(name):
    q, args = _weight(name, 24, 96)
    x = torch.randn(3, 96)
    expected = torch.nn.functional.linear(x, q.dequantize())
    torch.testing.assert_close(w4a16_gemm_reference(x, *args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "m", "n", "k", "path", "split_k", "block_k"),
    [
        ("int4_g64_sym", 1, 40, 96, "gemv", 1, 32),  # partial last group (64 + 32)
        ("int4_g32_asym", 3, 40, 96, "gemv", 2, 32),  # split-K with atomics
        ("int4_g32_asym", 2, 40, 96, "gemv", 1, 64),  # two groups per K block
        ("int4_channel", 2, 24, 37, "gemv", 1, 32),  # odd K: the last byte holds one code
        ("int4_g48", 1, 24, 96, "gemv", 1, 32),
        ("fp4_e2m1_g32", 1, 40, 96, "gemv", 1, 64),
        ("nvfp4", 2, 40, 80, "gemv", 1, 32),
        ("mxfp4", 20, 40, 96, "gemm", 1, 32),
        ("nvfp4", 20, 24, 80, "gemm", 1, 32),  # group 16 < BLOCK_K: the element-wise path
        ("int4_g32_asym", 33, 40, 96, "gemm", 1, 32),  # rows beyond a tile
        ("int4_g64_sym", 17, 40, 96, "gemm", 1, 32),
        ("int4_channel", 17, 24, 37, "gemm", 1, 32),
    ],
)
def test_kernel_matches_reference(name, m, n, k, path, split_k, block_k):
    _, args = _weight(name, n, k, seed=m)
    x = torch.randn(m, k).half()
    out = w4a16_gemm_triton(x, *args, path=path, split_k=split_k, block_n=16, block_k=block_k)
    ref = w4a16_gemm_reference(x, *args)
    # fp16 operands / output, fp32 accumulation in both: differences are fp16 rounding of the output
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-2)


def test_trt_entry_point_follows_the_plugin_contract():
    consts = trt.constants(32, False, 1)
    check_contract(trt.kernel(), trt, consts)
    _, args = _weight("int4_g32_asym", 40, 96)
    qweight, scales, zeros = args[:3]
    x = torch.randn(5, 96).half()
    out = torch.empty(5, 40, dtype=torch.float16)
    tile = gemm_trt.tile_for(1)
    grid = (triton.cdiv(5, tile.block_m), triton.cdiv(40, tile.block_n))
    w4a16_gemm_trt_kernel[grid](x, qweight, scales, zeros, 5, 40, 96, out, **consts)
    torch.testing.assert_close(out.float(), w4a16_gemm_reference(x, *args).float(), rtol=2e-3, atol=2e-2)


def test_op_and_linear_from_state(monkeypatch):
    q, args = _weight("int4_g64_sym", 24, 96)
    bias = torch.randn(24)
    state = CompressedLinearState(24, 96, q, bias=bias)
    x = torch.randn(2, 3, 96)
    torch.testing.assert_close(w4a16_linear(state, "cpu")(x), state.forward(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")  # the op dispatches fp16 inputs to the kernel
    xh = x.half()
    torch.testing.assert_close(
        w4a16_gemm(xh, *args).float(), w4a16_gemm_reference(xh, *args).float(), rtol=2e-3, atol=2e-2
    )
    assert w4a16_linear(CompressedLinearState(24, 96, dense_weight=torch.randn(24, 96)), "cpu") is None


def check_contract(kernel, plugin, consts) -> None:
    """The kernel's parameters in TensorRT's AOT order (the check `gemm_trt.check_kernel_interface` makes
    on a compiled kernel; under TRITON_INTERPRET the signature is read from the Python function)."""
    import inspect

    import triton.language as tl

    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters.values()
    constexprs = {p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")}
    runtime = [p.name for p in params if p.name not in constexprs]
    assert runtime == [*plugin.INPUTS, *plugin.EXTRA, *plugin.OUTPUTS]
    assert constexprs == set(consts)


def _bad_args(case: str) -> tuple:
    """The op's weight arguments for K = 64, broken as `case` says."""
    _, (qweight, scales, zeros, group, symmetric, *_) = _weight("int4_g32_asym", 8, 64)
    return {
        "K": (qweight[:, :30].contiguous(), scales, zeros, group, symmetric, 0, 0),  # a weight for K = 60
        "scale groups": (qweight, torch.cat([scales, scales], 1), zeros, group, symmetric, 0, 0),
        "no zeros": (qweight, scales, None, group, False, 0, 0),  # the kernels read zeros from qweight
        "zero groups": (qweight, scales, zeros[:, :1].contiguous(), group, False, 0, 0),
        "codes dtype": (qweight.to(torch.int32), scales, zeros, group, symmetric, 0, 0),
        "fp bits": (qweight, scales.float(), None, group, True, 2, 2),  # E2M2 is not a 4-bit code
    }[case]


@pytest.mark.parametrize("case", ["K", "scale groups", "no zeros", "zero groups", "codes dtype", "fp bits"])
def test_op_refuses_weight_tensors_that_do_not_fit_x(case):
    """Tensors that do not fit x's K were sliced by the reference and read out of place by the kernels:
    two different wrong results, no error (torch.compile's fake implementation refuses them too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _bad_args(case)
    with pytest.raises(ValueError, match=r"must be|need"):
        w4a16_gemm(torch.randn(2, 64), *args)
    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in (torch.empty(2, 64), *args)]
    with mode, pytest.raises(ValueError, match=r"must be|need"):
        w4a16_gemm(*fake)


def test_op_kernels_read_non_contiguous_scales_and_zeros(monkeypatch):
    """Scales / zeros given as transposed views (same shape, other strides) were read by the kernels as
    contiguous rows: a wrong result against the reference's right one."""
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    _, args = _weight("int4_g32_asym", 16, 64)
    qweight, scales, zeros = args[:3]
    strided = (qweight, scales.t().contiguous().t(), zeros.t().contiguous().t(), *args[3:])
    assert not strided[1].is_contiguous()
    x = torch.randn(3, 64).half()  # the tensor-core GEMV
    torch.testing.assert_close(
        w4a16_gemm(x, *strided).float(), w4a16_gemm_reference(x, *args).float(), rtol=2e-3, atol=2e-2
    )


@pytest.mark.parametrize("name", ["int4_g64_sym", "int4_g32_asym"])
def test_linear_holds_group_major_weights_on_the_kernel_path(monkeypatch, name):
    """On the kernel path (CUDA, or TRTCOMPRESS_GEMM_TRITON=1) an INT4 layer whose K is whole 128-column
    chunks is held as a `GroupMajorWeight` and computed by the group-major op: the lop3 GEMV at M <= 2,
    the tensor-core GEMV beyond (decode rows and prefill tiles), the same result as the layer's own math;
    TRTCOMPRESS_W4A16_LAYOUT=rows keeps the row layout, other values are refused."""
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    q, _ = _weight(name, 40, 256, seed=3)
    state = CompressedLinearState(40, 256, q, bias=torch.randn(40))
    run = w4a16_linear(state, "cpu")
    assert run.__name__ == "run_group_major"
    for m in (1, 2, 5, 20):
        x = torch.randn(m, 256).half()
        torch.testing.assert_close(run(x).float(), state.forward(x.float()), rtol=2e-3, atol=2e-2)
    x32 = torch.randn(3, 256)  # float32 x: the reference over the weight turned back into rows
    torch.testing.assert_close(run(x32), state.forward(x32), rtol=1e-5, atol=1e-5)
    odd = CompressedLinearState(40, 192, _weight(name, 40, 192)[0])  # 1.5 chunks: rows, no padding
    assert w4a16_linear(odd, "cpu").__name__ == "run"
    monkeypatch.setenv("TRTCOMPRESS_W4A16_LAYOUT", "rows")
    assert w4a16_linear(state, "cpu").__name__ == "run"
    monkeypatch.setenv("TRTCOMPRESS_W4A16_LAYOUT", "columns")
    with pytest.raises(ValueError, match="TRTCOMPRESS_W4A16_LAYOUT is 'group_major' or 'rows'"):
        w4a16_linear(state, "cpu")


def test_group_major_op_refuses_tensors_that_do_not_fit_x():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight
    from trtcompress.plugins.w4a16_gemm.group_major_op import w4a16_gemm_group_major

    _, (qweight, scales, zeros, *_) = _weight("int4_g32_asym", 16, 256)
    w = GroupMajorWeight.from_packed(qweight, scales, zeros, 32, 256)
    x = torch.randn(2, 256)
    torch.testing.assert_close(
        w4a16_gemm_group_major(x, w.words, w.scales, w.zeros, 256, 32), w4a16_gemm_reference(x, *_weight(
            "int4_g32_asym", 16, 256)[1]), rtol=1e-5, atol=1e-5,
    )  # fmt: skip
    bad = {
        "K": (torch.randn(2, 128), w.words, w.scales, w.zeros, 256, 32),
        "words": (x, w.words[:1].contiguous(), w.scales, w.zeros, 256, 32),
        "scales": (x, w.words, w.scales.t().contiguous(), w.zeros, 256, 32),
        "zeros": (x, w.words, w.scales, w.zeros[:2].contiguous(), 256, 32),
        "flat words": (x, w.words.flatten(), w.scales, w.zeros, 256, 32),
        "group": (x, w.words, w.scales[:1].contiguous(), w.zeros[:1].contiguous(), 256, 256),  # > a chunk
        "per channel": (x, w.words, w.scales[:1].contiguous(), w.zeros[:1].contiguous(), 256, 0),
    }
    for args in bad.values():
        with pytest.raises(ValueError, match="group-major"):
            w4a16_gemm_group_major(*args)
        mode = FakeTensorMode()
        with mode, pytest.raises(ValueError, match="group-major"):
            w4a16_gemm_group_major(*[mode.from_tensor(a) if torch.is_tensor(a) else a for a in args])


def test_fused_linear_runs_layers_side_by_side(monkeypatch):
    """INT4 layers reading one input (q / k / v) held as one group-major weight of their concatenated rows:
    one GEMV per step, outputs side by side as the layers' own math gives them, biases where they are;
    layers that differ in format, K or zero points, FP4 layers and single layers are not fused."""
    from trtcompress.plugins.w4a16_gemm.op import w4a16_fused_linear

    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")

    def state(name: str, n: int, k: int = 256, seed: int = 0, bias: bool = False) -> CompressedLinearState:
        b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
        return CompressedLinearState(n, k, _weight(name, n, k, seed=seed)[0], bias=b)

    for name in ("int4_g64_sym", "int4_g32_asym"):
        states = [
            state(name, 40, seed=1, bias=True),
            state(name, 16, seed=2),
            state(name, 16, seed=3, bias=True),
        ]
        run = w4a16_fused_linear(states, "cpu")
        for m in (1, 2, 5):
            x = torch.randn(m, 256).half()
            want = torch.cat([s.forward(x.float()) for s in states], dim=-1)
            torch.testing.assert_close(run(x).float(), want, rtol=2e-3, atol=2e-2)
    sym, asym = state("int4_g64_sym", 16), state("int4_g32_asym", 16)
    assert w4a16_fused_linear([sym, asym], "cpu") is None  # other group and zero points
    assert w4a16_fused_linear([sym, state("int4_g64_sym", 16, k=128)], "cpu") is None  # other K
    assert w4a16_fused_linear([state("nvfp4", 16), state("nvfp4", 16)], "cpu") is None  # FP4
    assert w4a16_fused_linear([sym], "cpu") is None
    odd = [state("int4_g64_sym", 16, k=192), state("int4_g64_sym", 16, k=192)]  # 1.5 chunks
    assert w4a16_fused_linear(odd, "cpu") is None
    monkeypatch.delenv("TRTCOMPRESS_GEMM_TRITON")
    assert w4a16_fused_linear([sym, sym], "cpu") is None  # the reference path: no kernel to fuse for
