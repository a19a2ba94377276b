"""Decode GEMV on 32-bit weight words (`w4a16_gemv_lop3_kernel`, path "gemv_lop3") == reference,
interpreted on CPU (the integer twin of its lop3 PTX): INT4 symmetric / asymmetric, groups 64 and 128
(and larger than the K block), split-K 1 and 2, several rows of x, a K that ends inside a block; what it
does not take (bf16 x, FP4, group 48, K not a multiple of 8) falls back to the packed-fp16 GEMV (or its
elementwise fallback). The PTX itself is emulated on the CPU below, compiles for sm_90 here
(test_gemv_cost.py) and is checked against the reference on a GPU by benchmarks/gemv_graphs_gpu.py
before any timing."""

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
def test_gemv_lop3_matches_reference(symmetric, group, m, split_k):
    x, args = _inputs(
        96, 256, group, symmetric, m, torch.float16, seed=7 * group + 10 * m + split_k + symmetric
    )
    out = w4a16_gemm_triton(x, *args, path="gemv_lop3", block_n=32, block_k=128, split_k=split_k)
    _assert_matches(out, w4a16_gemm_reference(x, *args))


@pytest.mark.parametrize(
    ("n", "k", "group", "block_k"),
    [
        (40, 224, 64, 128),  # K ends inside a block (3.5 groups): masked words and x
        (40, 256, 256, 128),  # group larger than the K block: two sub-blocks share a scale
        (24, 192, 32, 64),  # one run of 4 words per group
    ],
)
def test_gemv_lop3_shapes(n, k, group, block_k):
    x, args = _inputs(n, k, group, False, 2, torch.float16, seed=n + k)
    ref = w4a16_gemm_reference(x, *args)
    for split_k in (1, 3):
        _assert_matches(
            w4a16_gemm_triton(x, *args, path="gemv_lop3", block_n=16, block_k=block_k, split_k=split_k), ref
        )


@pytest.mark.parametrize("split_k", [1, 3, 4])
@pytest.mark.parametrize(
    ("prefetch", "last_sums", "stages"),
    [(True, False, 0), (False, True, 0), (True, True, 0), (2, True, 0), (False, True, 3)],
)
def test_gemv_lop3_prefetch_and_last_split_sums(prefetch, last_sums, stages, split_k):
    """The prefetching loops (one or two steps ahead, or Triton's pipeline) and the one-kernel split-K
    (the last split of a tile adds the partials): same results, K ending inside a block, and every
    launch leaves the arrival counters at zero."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import split_counters

    for m, k in ((1, 224), (3, 256)):
        x, args = _inputs(40, k, 64, m == 1, m, torch.float16, seed=split_k + m)
        ref = w4a16_gemm_reference(x, *args)
        for _ in range(2):  # the second call reuses the counters the first left behind
            out = w4a16_gemm_triton(
                x, *args, path="gemv_lop3", block_n=16, block_k=128, split_k=split_k, prefetch=prefetch,
                last_sums=last_sums, stages=stages,
            )  # fmt: skip
            assert out.dtype == torch.float16
            _assert_matches(out, ref)
        assert not split_counters(x.device, 1).any()


@pytest.mark.parametrize(
    ("dtype", "group", "k"), [(torch.bfloat16, 64, 192), (torch.float16, 48, 192), (torch.float16, 64, 196)]
)
def test_gemv_lop3_falls_back_where_it_does_not_apply(dtype, group, k):
    x, args = _inputs(32, k, group, True, 1, dtype, seed=5)
    out = w4a16_gemm_triton(x, *args, path="gemv_lop3", block_n=16, block_k=64)
    fallback = w4a16_gemm_triton(x, *args, path="gemv_h2", block_n=16, block_k=64)  # or its "gemv"
    torch.testing.assert_close(out, fallback, rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_lop3_ptx_pairs_each_code_with_its_column(symmetric):
    """The PTX of one run (4 words = 32 codes) against the plain sum of (code - zero) * x (asymmetric:
    with the kernel's correction by the PTX sum of x)."""
    import numpy as np

    from tests.plugins.ptx_emulation import prmt, run_ptx
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import (
        HIGH_HALVES,
        LOW_HALVES,
        _run_asm,
        _x_sum_asm,
        pair_operand,
        word_operand,
    )

    rng = np.random.default_rng(11 + symmetric)
    for _ in range(20):
        words = rng.integers(0, 2**32, 4, dtype=np.uint64)
        x = rng.standard_normal(32).astype(np.float16)
        zero = 8 if symmetric else int(rng.integers(0, 16))
        pairs = {}
        x_words = x.view(np.uint32)  # what the kernel loads: x[2j] | x[2j + 1] << 16
        for w in range(4):  # P_i of word w from x's words 4w .. 4w + 3, by the kernel's prmt selectors
            a = [np.uint64(v) for v in x_words[4 * w : 4 * w + 4]]
            for i, (lo, hi, sel) in enumerate(
                [(0, 2, LOW_HALVES), (0, 2, HIGH_HALVES), (1, 3, LOW_HALVES), (1, 3, HIGH_HALVES)]
            ):
                pairs[(i, w)] = prmt(a[lo], a[hi], int(sel.value, 16))
        regs = {word_operand(w): np.uint64(words[w]) for w in range(4)}
        regs |= {pair_operand(i, w): v for (i, w), v in pairs.items()}
        got = float(run_ptx(_run_asm(), regs)["$0"])  # sum of (code - 8) * x
        if not symmetric:  # the kernel's zero-point correction: + (8 - zero) * sum(x) (PTX-summed)
            x_regs = {pair_operand(i, w, first=1): v for (i, w), v in pairs.items()}
            got += (8 - zero) * float(run_ptx(_x_sum_asm(), x_regs)["$0"])
        codes = [(int(words[w]) >> (4 * i)) & 0xF for w in range(4) for i in range(8)]
        want = sum((c - zero) * float(v) for c, v in zip(codes, x, strict=True))
        assert abs(got - want) <= 2e-3 * np.abs(x).sum() * 8, (got, want)


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("gemv_tc", {}),
        ("gemv_h2", {}),
        ("gemv_lop3", {}),
        ("gemv_lop3", {"prefetch": True, "last_sums": True}),  # the op's loop: never past K; guarded as is
    ],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_decode_gemvs_read_no_scale_past_k(path, options, symmetric):
    """K = 96 in a 256-column block: the sub-blocks past K have no group. Their scales (and zeros) must
    not be read: here the memory after the scales holds NaN, which 0 * NaN would carry into the last
    row's output (a CI run caught this as a 1-in-many NaN, depending on what followed the tensor)."""
    x, (qweight, scales, zeros, group, sym) = _inputs(24, 96, 64, symmetric, 3, torch.float16, seed=9)
    poisoned = torch.full((scales.numel() + 64,), float("nan"), dtype=torch.float16)
    poisoned[: scales.numel()] = scales.flatten()
    scales = poisoned[: scales.numel()].view(scales.shape)
    if zeros is not None:
        padded = torch.full((zeros.numel() + 64,), 255, dtype=torch.uint8)
        padded[: zeros.numel()] = zeros.flatten()
        zeros = padded[: zeros.numel()].view(zeros.shape)
    args = (qweight, scales, zeros, group, sym)
    for m in (1, 3):
        split_k = 2 if options.get("last_sums") else 1
        out = w4a16_gemm_triton(x[:m], *args, path=path, block_n=16, block_k=256, split_k=split_k, **options)
        assert torch.isfinite(out).all(), (path, m)
        _assert_matches(out, w4a16_gemm_reference(x[:m], *args))


@pytest.mark.parametrize(
    ("path", "options"),
    [
        ("gemv_lop3", {}),
        ("gemv_lop3", {"prefetch": True, "last_sums": True}),  # the op's launch
        ("gemv_lop3", {"prefetch": 2, "last_sums": True}),
        ("gemv_lop3", {"stages": 3, "last_sums": True}),
        ("gemv_h2", {}),
        ("gemv_tc", {"deq_asm": True}),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_decode_gemv_ptx_paths_match_reference(emulated_ptx, path, options, symmetric):
    """The kernels as a GPU runs them, inline PTX included (emulated on the CPU): x loads, pairing,
    the 4-word runs Triton splits out of the tile, zero points, K ending inside a block, split-K."""
    for m, n, k, split_k in ((1, 40, 256, 1), (2, 24, 224, 3), (1, 72, 576, 2)):
        if path == "gemv_h2" and m > 1:
            continue
        x, args = _inputs(n, k, 64, symmetric, m, torch.float16, seed=n + k + m + symmetric)
        out = w4a16_gemm_triton(x, *args, path=path, block_n=16, block_k=128, split_k=split_k, **options)
        _assert_matches(out, w4a16_gemm_reference(x, *args))


def _group_major_cases():
    # (m, n, k, group, symmetric, launch): K ending inside a chunk (576 = 4.5 chunks), N not a multiple
    # of the row tile, group 64 (two steps a chunk), split-K with and without the last-split sums
    return [
        (1, 40, 576, 64, True, {"block_n": 16, "block_k": 128, "split_k": 2}),
        (2, 24, 256, 128, False, {"block_n": 16, "block_k": 128, "split_k": 1}),
        (1, 72, 576, 128, False, {"block_n": 32, "block_k": 256, "split_k": 3, "prefetch": 2}),
        (1, 40, 384, 64, True, {"block_n": 16, "block_k": 64, "split_k": 2, "last_sums": False}),
        (1, 40, 320, 64, False, {"block_n": 16, "block_k": 128, "split_k": 2, "prefetch": 0, "stages": 3}),
    ]


@pytest.mark.parametrize("ptx", [False, True], ids=["interpreted", "ptx"])
def test_gemv_lop3_group_major_weight_matches_reference(ptx, request):
    """The same kernel over a `GroupMajorWeight` (column chunks outermost, scales (G, N)): the reference's
    result, with the integer twin and with the PTX (emulated)."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_lop3_group_major

    if ptx:
        request.getfixturevalue("emulated_ptx")
    for m, n, k, group, symmetric, launch in _group_major_cases():
        x, (qweight, scales, zeros, _, _) = _inputs(n, k, group, symmetric, m, torch.float16, seed=n + k)
        weight = GroupMajorWeight.from_packed(qweight, scales, zeros, group, k)
        assert weight.words.shape == (-(-k // 128), n, 16) and weight.scales.shape == (-(-k // group), n)
        out = gemv_lop3_group_major(x, weight, **launch)
        _assert_matches(out, w4a16_gemm_reference(x, qweight, scales, zeros, group, symmetric))


def test_group_major_launch_by_shape_then_size():
    """Shapes tuned on their own (a Llama-3-8B layer) get their launch, others the size rule's, and
    each tuned launch gives the reference's result (interpreted, on a weight as wide as one tile)."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_lop3_group_major
    from trtcompress.plugins.w4a16_gemm.group_major_op import (
        GROUP_MAJOR_LOP3_CONFIGS,
        GROUP_MAJOR_LOP3_SHAPES,
        group_major_lop3_config,
    )

    assert group_major_lop3_config(28672, 4096)["block_k"] == 512
    assert group_major_lop3_config(4096, 14336)["split_k"] == 16
    by_size = dict(zip(("block_n", "block_k", "split_k"), GROUP_MAJOR_LOP3_CONFIGS[1][1], strict=False))
    assert by_size.items() <= group_major_lop3_config(4096, 28672).items()  # the transpose: by size
    shapes = {launch: shape for shape, launch in GROUP_MAJOR_LOP3_SHAPES.items()}.values()  # one per launch
    for launch in (group_major_lop3_config(*shape) for shape in shapes):
        n, k = launch["block_n"] + 8, 2 * launch["block_k"] + 128  # a partial row tile, a partial last step
        x, (qweight, scales, zeros, _, _) = _inputs(n, k, 128, True, 1, torch.float16, seed=k)
        out = gemv_lop3_group_major(x, GroupMajorWeight.from_packed(qweight, scales, zeros, 128, k), **launch)
        _assert_matches(out, w4a16_gemm_reference(x, qweight, scales, zeros, 128, True))


def test_group_major_weight_refuses_what_it_cannot_hold():
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_lop3_group_major

    x, (qweight, scales, zeros, _, _) = _inputs(16, 256, 256, True, 1, torch.float16, seed=1)
    with pytest.raises(ValueError, match="K a multiple of 8"):
        GroupMajorWeight.from_packed(qweight[:, :100], scales, zeros, 256, 256)
    weight = GroupMajorWeight.from_packed(qweight, scales, zeros, 256, 256)
    with pytest.raises(ValueError, match="at most 128 columns"):  # group and block_k 256: 2 chunks a step
        gemv_lop3_group_major(x, weight, block_k=256)
    with pytest.raises(ValueError, match="fp16 x"):
        gemv_lop3_group_major(x.bfloat16(), weight, block_k=128)
    with pytest.raises(ValueError, match=r"scales must be \(N, groups\) = \(16, 1\)"):
        GroupMajorWeight.from_packed(qweight, scales.t(), zeros, 256, 256)
    with pytest.raises(ValueError, match="prefetch is 0, 1 or 2"):
        gemv_lop3_group_major(x, weight, block_k=128, prefetch=3)
    x2 = torch.randn(1, 257).half()[:, 1:]  # 2-byte aligned: read as int32 words from a copy
    weight = GroupMajorWeight.from_packed(qweight, scales.repeat(1, 2), zeros, 128, 256)
    _assert_matches(
        gemv_lop3_group_major(x2, weight, block_n=16, block_k=128, split_k=1),
        w4a16_gemm_reference(x2, qweight, scales.repeat(1, 2), zeros, 128, True),
    )


@pytest.mark.parametrize("ptx", [False, True], ids=["interpreted", "ptx"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gemv_lop3_two_rows_per_program(ptx, symmetric, request):
    """rows=2: one program serves two rows of x from one read of the weight (the PTX makes the codes
    once for both): M = 2 and 3 (the last program's second row absent), split-K with and without the
    last-split sums, K ending inside a block, the group-major layout."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_lop3_group_major

    if ptx:
        request.getfixturevalue("emulated_ptx")
    for m, k, launch in (
        (2, 256, {"split_k": 1}),
        (3, 576, {"split_k": 3, "prefetch": True, "last_sums": True}),
        (3, 320, {"split_k": 2}),
        (2, 576, {"split_k": 2, "prefetch": 2, "last_sums": True}),
    ):
        x, args = _inputs(40, k, 64, symmetric, m, torch.float16, seed=m + k + symmetric)
        ref = w4a16_gemm_reference(x, *args)
        out = w4a16_gemm_triton(x, *args, path="gemv_lop3", block_n=16, block_k=128, rows=2, **launch)
        _assert_matches(out, ref)
        weight = GroupMajorWeight.from_packed(*args[:4], k)
        _assert_matches(gemv_lop3_group_major(x, weight, block_n=16, block_k=128, rows=2, **launch), ref)
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import split_counters

    assert not split_counters(x.device, 1).any()
    with pytest.raises(ValueError, match="1 or 2 rows"):
        w4a16_gemm_triton(x, *args, path="gemv_lop3", block_n=16, block_k=128, rows=4)


@pytest.mark.parametrize("ptx", [False, True], ids=["interpreted", "ptx"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gemv_tc_group_major_weight_matches_reference(ptx, dtype, request):
    """The tensor-core GEMV over a `GroupMajorWeight` (what a runtime holding only that layout runs for
    M > 2 and prefill): decode rows and prefill tiles, symmetric and with zero points, K ending inside a
    chunk, group 64 (two sub-blocks a chunk) and larger than the K block, split-K and stream-K."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_tc_group_major

    if ptx:
        if dtype == torch.bfloat16:
            pytest.skip("the PTX codes are fp16 only")
        request.getfixturevalue("emulated_ptx")
    cases = [  # (m, n, k, group, symmetric, launch)
        (3, 40, 576, 64, True, {"block_n": 16, "block_k": 128, "split_k": 2}),
        (16, 24, 256, 128, False, {"block_n": 16, "block_k": 64, "split_k": 1}),
        (40, 72, 576, 128, False, {"block_n": 32, "block_k": 128, "block_m": 16}),  # 3 prefill tiles
        (5, 40, 512, 256, True, {"block_n": 16, "block_k": 128, "stream_k": 1}),  # group over 2 chunks
    ]
    for m, n, k, group, symmetric, launch in cases:
        x, (qweight, scales, zeros, _, _) = _inputs(n, k, group, symmetric, m, dtype, seed=n + k + m)
        weight = GroupMajorWeight.from_packed(qweight, scales, zeros, group, k)
        out = gemv_tc_group_major(x, weight, deq_asm=ptx, **launch)
        _assert_matches(out, w4a16_gemm_reference(x, qweight, scales, zeros, group, symmetric))


def test_group_major_weight_round_trip_and_tc_refusals():
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight, gemv_tc_group_major

    for k, symmetric in ((576, False), (256, True)):
        x, (qweight, scales, zeros, _, _) = _inputs(24, k, 64, symmetric, 1, torch.float16, seed=k)
        back = GroupMajorWeight.from_packed(qweight, scales, zeros, 64, k).to_packed()
        assert torch.equal(back[0], qweight) and torch.equal(back[1], scales)
        assert (back[2] is None) == symmetric and (symmetric or torch.equal(back[2], zeros))
    wide = torch.randint(0, 256, (24, 129), dtype=torch.uint8)  # rows in place: unaligned, strided
    back = GroupMajorWeight.from_packed(wide[:, 1:], scales, zeros, 64, 256).to_packed()
    assert torch.equal(back[0], wide[:, 1:])
    weight = GroupMajorWeight.from_packed(qweight, scales, zeros, 64, 256)
    with pytest.raises(ValueError, match="fp16 / bf16 x with K = 256"):
        gemv_tc_group_major(x.float(), weight)
    with pytest.raises(ValueError, match="fp16 / bf16 x with K = 256"):
        gemv_tc_group_major(torch.randn(1, 128).half(), weight)
