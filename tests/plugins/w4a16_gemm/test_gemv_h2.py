"""Packed-fp16 decode GEMV (`w4a16_gemv_h2_kernel`, path "gemv_h2") == reference, interpreted on CPU:
INT4 symmetric / asymmetric, groups 64 and 128 (and larger than the K block), split-K 1 and 2, several
rows of x, partial last groups; its fp16 short sums stay within the fp16 output's tolerance at K = 4096;
what it does not cover (bf16 x, FP4, group 48) falls back to the elementwise GEMV."""

from __future__ import annotations

import pytest
import torch

from tests.plugins.w4a16_gemm.test_gemv_tc import _assert_matches, _inputs
from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_triton
from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gemv_h2_matches_reference(symmetric, group, m, split_k):
    x, args = _inputs(
        96, 256, group, symmetric, m, torch.float16, seed=7 * group + 10 * m + split_k + symmetric
    )
    out = w4a16_gemm_triton(x, *args, path="gemv_h2", block_n=32, block_k=128, split_k=split_k, h2_sub=8)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


@pytest.mark.parametrize(
    ("n", "k", "group", "block_k", "sub"),
    [
        (40, 224, 64, 128, 16),  # partial last group (3.5 groups), two groups per block
        (40, 256, 256, 128, 8),  # group larger than the K block: two sub-blocks share a scale
        (24, 192, 64, 64, 32),  # one group per block, the whole group in one fp16 run
    ],
)
def test_gemv_h2_shapes(n, k, group, block_k, sub):
    x, args = _inputs(n, k, group, False, 2, torch.float16, seed=n + k)
    ref = w4a16_gemm_reference(x, *args)
    for split_k in (1, 3):
        out = w4a16_gemm_triton(
            x, *args, path="gemv_h2", block_n=16, block_k=block_k, h2_sub=sub, split_k=split_k
        )
        _assert_matches(out, ref)


def test_gemv_h2_fp16_sums_stay_accurate_over_a_long_row():
    x, args = _inputs(32, 4096, 128, True, 1, torch.float16, seed=3)
    ref = w4a16_gemm_reference(x, *args).float()
    out = w4a16_gemm_triton(x, *args, path="gemv_h2", block_n=32, block_k=256, split_k=4, h2_sub=16).float()
    assert (out - ref).abs().max() / ref.abs().max() < 2e-3


@pytest.mark.parametrize(("dtype", "group"), [(torch.bfloat16, 64), (torch.float16, 48)])
def test_gemv_h2_falls_back_where_it_does_not_apply(dtype, group):
    x, args = _inputs(32, 192, group, True, 1, dtype, seed=5)
    out = w4a16_gemm_triton(x, *args, path="gemv_h2", block_n=16, block_k=64)
    fallback = w4a16_gemm_triton(x, *args, path="gemv", block_n=16, block_k=64)
    torch.testing.assert_close(out, fallback, rtol=0, atol=0)


def test_op_runs_single_rows_of_fp16_on_gemv_lop3(monkeypatch):
    """The op's decode choice: M = 1 or 2 with fp16 x takes the lop3 GEMV (measured faster there), M = 1
    with K not a multiple of 8 the packed-fp16 GEMV, more rows or bf16 x the tensor-core GEMV, and
    `TRTCOMPRESS_W4A16_DECODE` = gemv_h2 / gemv_tc forces those."""
    from trtcompress.plugins.w4a16_gemm import op
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import w4a16_gemv_lop3_kernel
    from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemv_h2_kernel, w4a16_gemv_tc_kernel

    calls: list[str] = []
    kernels = (
        ("gemv_lop3", w4a16_gemv_lop3_kernel),
        ("gemv_h2", w4a16_gemv_h2_kernel),
        ("gemv_tc", w4a16_gemv_tc_kernel),
    )
    for name, kernel in kernels:
        real = kernel.run
        monkeypatch.setattr(
            kernel, "run", lambda *a, _n=name, _r=real, **kw: (calls.append(_n), _r(*a, **kw))[1]
        )
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    monkeypatch.delenv("TRTCOMPRESS_W4A16_DECODE", raising=False)
    monkeypatch.setitem(op.GEMV_TC_CONFIG, "block_k", 128)
    monkeypatch.setitem(op.GEMV_H2_CONFIG, "block_n", 16)
    for m, k, dtype, env, want in [
        (1, 256, torch.float16, None, "gemv_lop3"),
        (1, 252, torch.float16, None, "gemv_h2"),
        (2, 256, torch.float16, None, "gemv_lop3"),
        (3, 256, torch.float16, None, "gemv_tc"),
        (1, 256, torch.bfloat16, None, "gemv_tc"),
        (1, 256, torch.float16, "gemv_h2", "gemv_h2"),
        (1, 256, torch.float16, "gemv_tc", "gemv_tc"),
    ]:
        if env:
            monkeypatch.setenv("TRTCOMPRESS_W4A16_DECODE", env)
        x, args = _inputs(40, k, 64, True, m, dtype, seed=m)
        calls.clear()
        _assert_matches(op.w4a16_gemm(x, *args, 0, 0), w4a16_gemm_reference(x, *args))
        assert calls == [want], (m, k, dtype, env, calls)


def test_lop3_launch_by_weight_size():
    """The lop3 GEMV's launch follows the measured best per weight size (op.GEMV_LOP3_CONFIGS)."""
    from trtcompress.plugins.w4a16_gemm.op import GEMV_LOP3_CONFIG, gemv_lop3_config

    small, mid, large = (
        gemv_lop3_config(576, 576),
        gemv_lop3_config(11008, 11008),
        gemv_lop3_config(14336, 14336),
    )
    assert (small["split_k"], small["num_warps"]) == (16, 2) and gemv_lop3_config(4096, 4096) == small
    assert mid["block_n"] == 64 and large == GEMV_LOP3_CONFIG and large["block_n"] == 128
    assert all(c["last_sums"] and c["prefetch"] for c in (small, mid, large))
