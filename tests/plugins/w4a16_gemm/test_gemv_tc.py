"""Tensor-core decode GEMV (`w4a16_gemv_tc_kernel`, path "gemv_tc") == reference, interpreted on CPU:
INT4 symmetric / asymmetric, fp16 / bf16 x, M = 1, 3, 16 (all rows share one weight read), groups 64 and
128, split-K 1 and 2, partial groups, per-channel and odd K; every output element written exactly once;
shapes it does not cover (FP4, group 48) fall back to the elementwise GEMV."""

from __future__ import annotations

import pytest
import torch
import triton

from trtcompress.plugins.w4a16_gemm import op
from trtcompress.plugins.w4a16_gemm.kernel import gemv_tc_group, w4a16_gemm_triton, w4a16_gemv_tc_kernel
from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference


def _inputs(n: int, k: int, group: int, symmetric: bool, m: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)  # fresh random inputs per case
    groups = triton.cdiv(k, group)
    qweight = torch.randint(0, 256, (n, (k + 1) // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).half()
    zeros = None if symmetric else torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    return x, (qweight, scales, zeros, group, symmetric)


def _assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Both accumulate in fp32: the difference is the rounding of the output to x's dtype. fp16: the
    tolerance of the other kernel tests; bf16: one bf16 ulp (2**-7 relative; the interpreter's fp32 ->
    bf16 conversion may round the other way) plus 1e-3 of the largest output."""
    assert out.dtype == ref.dtype
    if out.dtype == torch.float16:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-2)
    else:
        atol = 1e-3 * ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=atol)


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gemv_tc_matches_reference(dtype, symmetric, group, m, split_k):
    seed = 1000 * (dtype == torch.bfloat16) + 100 * symmetric + group + 10 * m + split_k
    x, args = _inputs(96, 256, group, symmetric, m, dtype, seed)
    out = w4a16_gemm_triton(x, *args, path="gemv_tc", block_n=32, block_k=128, split_k=split_k)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


@pytest.mark.parametrize(
    ("n", "k", "group", "block_k", "m", "dtype"),
    [
        (40, 224, 64, 128, 2, torch.float16),  # partial last group (3.5 groups), two groups per block
        (40, 224, 64, 256, 5, torch.bfloat16),  # four groups per block, the last half empty
        (40, 250, 0, 128, 3, torch.float16),  # per-channel: one group covering K (GROUP 256 > BLOCK_K)
        (24, 37, 0, 64, 1, torch.bfloat16),  # odd K: the last byte holds one code
        (40, 256, 256, 128, 16, torch.float16),  # group larger than the K block
    ],
)
def test_gemv_tc_shapes(n, k, group, block_k, m, dtype):
    x, args = _inputs(n, k, group if group else k, False, m, dtype, seed=n + k + m)
    args = (args[0], args[1], args[2], group, False)
    out = w4a16_gemm_triton(x, *args, path="gemv_tc", block_n=16, block_k=block_k)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_tc_writes_every_output_once(split_k):
    """Poisoned output: split_k = 1 stores every (m < M, n < N) element and nothing else (the row past M
    keeps its NaNs); split-K adds its partial sums into a zeroed fp32 buffer."""
    m, n, k, group = 3, 96, 256, 64
    x, (qweight, scales, zeros, _, sym) = _inputs(n, k, group, False, m, torch.float16, seed=7)
    block_n, block_k = 64, 128  # N = 96: the second tile is partial
    if split_k == 1:
        buf = torch.full((m + 1, n), float("nan"), dtype=torch.float16)
    else:
        buf = torch.zeros(m + 1, n, dtype=torch.float32)
        buf[m] = float("nan")
    out = buf[:m]
    grid = (triton.cdiv(n, block_n), split_k)
    w4a16_gemv_tc_kernel[grid](
        x, qweight, scales, zeros, m, n, k, qweight.stride(0), out, 0, group, sym, block_n, block_k, split_k,
        16, False, False, False, False, False,
    )  # fmt: skip
    assert not out.isnan().any()
    assert buf[m].isnan().all()
    ref = w4a16_gemm_reference(x, qweight, scales, zeros, group, sym)
    _assert_matches(out.to(torch.float16), ref)


@pytest.mark.parametrize(
    ("n", "k", "m", "block_k", "per_sm", "dtype"),
    [
        (96, 256, 1, 64, 1, torch.float16),  # 12 steps on 4 programs: runs of 3 cross row blocks
        (96, 256, 3, 64, 2, torch.bfloat16),  # runs of 2: some end mid row block, some start there
        (80, 224, 2, 64, 3, torch.float16),  # partial last row block and last K block (MASK_K)
        (64, 512, 16, 128, 1, torch.float16),  # as many programs as row blocks x K blocks / 2
        (40, 128, 5, 128, 8, torch.float16),  # more programs asked for than there are steps
    ],
)
def test_gemv_tc_stream_k(n, k, m, block_k, per_sm, dtype):
    """Stream-K schedule (`stream_k` programs per SM; the interpreter counts 4 SMs): every program gets an
    equal run of (row block, K block) steps that may start or end inside a row block; the result equals
    the reference and no output row past M is touched."""
    x, args = _inputs(n, k, 64, False, m, dtype, seed=n + k + m + per_sm)
    out = w4a16_gemm_triton(x, *args, path="gemv_tc", block_n=32, block_k=block_k, stream_k=per_sm)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


def test_gemv_tc_stream_k_touches_only_real_rows():
    m, n, k, group, block_n, block_k = 3, 96, 256, 64, 32, 64
    x, (qweight, scales, zeros, _, sym) = _inputs(n, k, group, False, m, torch.float16, seed=8)
    buf = torch.zeros(m + 1, n, dtype=torch.float32)
    buf[m] = float("nan")
    steps = triton.cdiv(n, block_n) * triton.cdiv(k, block_k)  # 12
    work = 5  # runs 0-4, 5-9, 10-11: the first two end inside a row block
    w4a16_gemv_tc_kernel[(triton.cdiv(steps, work), 1, 1)](
        x, qweight, scales, zeros, m, n, k, qweight.stride(0), buf[:m], work, group, sym, block_n, block_k,
        1, 16, False, False, False, False, True,
    )  # fmt: skip
    assert buf[m].isnan().all()
    ref = w4a16_gemm_reference(x, qweight, scales, zeros, group, sym)
    _assert_matches(buf[:m].to(torch.float16), ref)


@pytest.mark.parametrize(("m", "block_m", "split_k"), [(70, 32, 1), (40, 16, 2)])
def test_gemv_tc_row_tiles_for_prefill(m: int, block_m: int, split_k: int) -> None:
    """More rows than one tile (prefill): the grid's third axis walks M in `block_m`-row tiles, partial
    last tile included; every output is written once."""
    x, args = _inputs(96, 256, 64, False, m, torch.float16, seed=m)
    kw = {"block_n": 32, "block_k": 128, "block_m": block_m, "split_k": split_k}
    out = w4a16_gemm_triton(x, *args, path="gemv_tc", **kw)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


@pytest.mark.parametrize(
    ("k", "group", "block_k", "fp_exp", "expected"),
    [
        (256, 128, 128, 0, 128),
        (256, 64, 256, 0, 64),
        (4096, 128, 512, 0, 128),
        (250, 250, 128, 0, 256),  # per-channel: a power-of-two group covering K
        (96, 48, 64, 0, None),  # not a power of two
        (96, 16, 64, 0, None),  # dots shorter than 16
        (96, 32, 64, 2, None),  # FP4: the elementwise GEMV
        (96, 32, 96, 0, None),  # BLOCK_K not a power of two
    ],
)
def test_gemv_tc_group(k, group, block_k, fp_exp, expected):
    assert gemv_tc_group(k, group, block_k, fp_exp) == expected


def test_gemv_tc_falls_back_for_fp4_and_odd_groups():
    from trtcompress.compressed import fpgrid
    from trtcompress.compressed.formats import FpFormat, IntFormat
    from trtcompress.compressed.state import QuantizedWeight

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 96).half()
    for fmt in (FpFormat(2, 1, 32), IntFormat(4, 48, True)):
        q = QuantizedWeight.round_to_nearest(w, fmt)
        fp = isinstance(fmt, FpFormat)
        scales = fpgrid.effective_scales(q.scales, q.global_scale, fmt) if fp else q.scales
        args = (q.qweight, scales, q.zeros, fmt.group_size, q.zeros is None,
                fmt.exp_bits if fp else 0, fmt.man_bits if fp else 0)  # fmt: skip
        out = w4a16_gemm_triton(x, *args, path="gemv_tc", block_n=16, block_k=32)
        _assert_matches(out, w4a16_gemm_reference(x, *args))


def test_auto_decode_and_op_pick_gemv_tc(monkeypatch):
    x, args = _inputs(40, 128, 64, True, 4, torch.float16, seed=11)
    ref = w4a16_gemm_reference(x, *args)
    _assert_matches(w4a16_gemm_triton(x, *args, decode="gemv_tc", block_n=16), ref)
    calls = []
    real = w4a16_gemv_tc_kernel.run

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(w4a16_gemv_tc_kernel, "run", spy)
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    monkeypatch.delenv("TRTCOMPRESS_W4A16_DECODE", raising=False)  # gemv_tc is the op's default
    monkeypatch.setitem(op.GEMV_TC_CONFIG, "block_k", 128)
    _assert_matches(op.w4a16_gemm(x, *args, 0, 0), ref)
    assert calls
    monkeypatch.setenv("TRTCOMPRESS_W4A16_DECODE", "gemv")  # the elementwise GEMV on request
    calls.clear()
    _assert_matches(op.w4a16_gemm(x, *args, 0, 0), ref)
    assert not calls


def test_op_prefill_picks_row_tiles_then_gemm(monkeypatch):
    """M > 16: the op runs the tensor-core GEMV in row tiles (its measured prefill default), the GEMM on
    request (`TRTCOMPRESS_W4A16_PREFILL=gemm`) and for groups the tensor-core GEMV does not take."""
    from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_kernel

    calls: list[str] = []
    for name, kernel in (("gemv_tc", w4a16_gemv_tc_kernel), ("gemm", w4a16_gemm_kernel)):
        real = kernel.run

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(kernel, "run", spy)
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    monkeypatch.delenv("TRTCOMPRESS_W4A16_PREFILL", raising=False)
    small = {"block_m": 32, "block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(op, "GEMV_TC_PREFILL_CONFIG", small)
    x, args = _inputs(48, 128, 64, False, 40, torch.float16, seed=12)  # 40 rows: two tiles, one partial
    _assert_matches(op.w4a16_gemm(x, *args, 0, 0), w4a16_gemm_reference(x, *args))
    assert calls == ["gemv_tc"]
    monkeypatch.setenv("TRTCOMPRESS_W4A16_PREFILL", "gemm")
    calls.clear()
    _assert_matches(op.w4a16_gemm(x, *args, 0, 0), w4a16_gemm_reference(x, *args))
    assert calls == ["gemm"]
    monkeypatch.delenv("TRTCOMPRESS_W4A16_PREFILL")
    x, args = _inputs(48, 96, 48, False, 20, torch.float16, seed=13)  # group 48: not a power of two
    calls.clear()
    _assert_matches(op.w4a16_gemm(x, *args, 0, 0), w4a16_gemm_reference(x, *args))
    assert calls == ["gemm"]
