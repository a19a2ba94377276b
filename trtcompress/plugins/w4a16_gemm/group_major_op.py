"""`torch.ops.trtcompress.w4a16_gemm_group_major`: x @ W4ᵀ for an INT4 weight held as a `GroupMajorWeight`.

The layout a CUDA runtime holds its INT4 weights in (`w4a16_linear` converts them once at load; the
artifact keeps the canonical row layout): column chunks of 128 outermost, so that the (rows x 64
bytes) a decode GEMV program reads per step are one contiguous piece of memory. On an H200 this op
ran 3.17x of a bf16 matmul at K = N = 14336, M = 1, where the row-layout op ran 2.22x in the same run
(benchmarks/gemv_graphs_gpu.py --group-major, BENCHMARKS.md). Which kernel, by rows of x (M):
- M <= 2 with fp16 x: the lop3 GEMV (`gemv_lop3_group_major`, `group_major_lop3_config`: launch by
  exact shape where one was tuned, else by weight size; at M = 2 with a symmetric weight both rows in
  one program);
- M <= 16: the tensor-core GEMV (`gemv_tc_group_major`, `GEMV_TC_CONFIG`), every row of x sharing
  one read of the weight;
- prefill: the same kernel in 128-row tiles (`GEMV_TC_PREFILL_CONFIG`).
CPU tensors run the reference on the weight turned back into rows (set `TRTCOMPRESS_GEMM_TRITON=1` with
`TRITON_INTERPRET=1` to run the kernels on CPU).
"""

from __future__ import annotations

import os

import torch

from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference

# the lop3 GEMV over group-major weights, by weight size N * K (the first that fits): the best launches of
# the H200 tunings over this layout at M = 1, replayed from CUDA graphs with the weight read from HBM
# (benchmarks/gemv_graphs_gpu.py --group-major, benchmarks/results/gemv_graphs_gpu_h200_group_major*.json;
# the 14336 grid is flat: five launches within 0.3%). The op with them, in the last run: 0.0081 / 0.0227
# / 0.0329 ms at K = N = 4096 / 11008 / 14336, 1.66x / 2.86x / 3.17x of that run's bf16 matmul
GROUP_MAJOR_LOP3_CONFIGS = (  # (largest N * K, (block_n, block_k, split_k, num_warps, num_stages, prefetch))
    (4096 * 4096, (128, 256, 16, 2, 1, 1)),
    (11008 * 11008, (64, 256, 8, 4, 2, 1)),
    (None, (128, 256, 8, 4, 2, 1)),
)
# shapes whose best launch differs from the size rule above, tuned on that exact (N, K): a Llama-3-8B /
# Mistral-7B layer as the CUDA runtime runs it (fused q/k/v, o, fused gate/up, down; H200, thirteenth
# session, benchmarks/results/gemv_group_major_llama8b_gpu_h200.json). By the size rule these ran 1.73x /
# 2.58x / 1.82x of bf16 (6144 x 4096, 28672 x 4096, 4096 x 14336); their tuned launches 1.80x / 2.96x / 2.10x
GROUP_MAJOR_LOP3_SHAPES = {  # (N, K): (block_n, block_k, split_k, num_warps, num_stages, prefetch)
    (6144, 4096): (128, 256, 16, 2, 1, 0),
    (28672, 4096): (64, 512, 4, 2, 1, 0),
    (4096, 14336): (128, 256, 16, 2, 1, 1),
}
_LAUNCH = ("block_n", "block_k", "split_k", "num_warps", "num_stages", "prefetch")
GROUP_MAJOR_GROUPS = (32, 64, 128)  # a step (one group) inside one 128-column chunk


def group_major_lop3_config(n: int, k: int) -> dict:
    """The lop3 launch for an (N, K) weight: its own tuned launch if it has one, else by size."""
    config = GROUP_MAJOR_LOP3_SHAPES.get((n, k)) or next(
        cfg for limit, cfg in GROUP_MAJOR_LOP3_CONFIGS if limit is None or n * k <= limit
    )
    return {**dict(zip(_LAUNCH, config, strict=True)), "last_sums": True}


def group_major_applies(k: int, group_size: int, fp_exp: int) -> bool:
    """Whether an INT4 weight of K columns and this group has a group-major form the kernels take
    without padding: power-of-two groups of at most one chunk, K whole chunks."""
    return fp_exp == 0 and group_size in GROUP_MAJOR_GROUPS and k % 128 == 0


def _weight(words, scales, zeros, k: int, group_size: int):
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight

    return GroupMajorWeight(words, scales, zeros, k, group_size)


def check_group_major_args(
    k: int, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, weight_k: int, group: int
) -> None:
    """Raise unless the tensors form a group-major weight that fits x's K, with a group the kernels take."""
    if group not in GROUP_MAJOR_GROUPS:
        raise ValueError(f"a group-major weight has groups of {GROUP_MAJOR_GROUPS}, not {group}")
    n = words.shape[1] if words.dim() == 3 else -1
    groups = -(-weight_k // group)
    if k != weight_k or words.dtype != torch.int32 or tuple(words.shape) != (-(-k // 128), n, 16):
        raise ValueError(
            f"a group-major weight for K = {k} is int32 ({-(-k // 128)}, N, 16) words built for that K; got "
            f"{words.dtype} {tuple(words.shape)} for K = {weight_k}"
        )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != (groups, n):
            raise ValueError(
                f"group-major {name} must be (groups, N) = ({groups}, {n}), got {tuple(t.shape)}"
            )


@torch.library.custom_op("trtcompress::w4a16_gemm_group_major", mutates_args=())
def w4a16_gemm_group_major(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    k: int,
    group_size: int,
) -> torch.Tensor:
    """x (..., K) @ Wᵀ for a `GroupMajorWeight`'s tensors (zeros None: symmetric, zero point 8)."""
    from trtcompress.plugins.w4a16_gemm.op import GEMV_TC_CONFIG, GEMV_TC_PREFILL_CONFIG, _use_triton

    check_group_major_args(x.shape[-1], words, scales, zeros, k, group_size)
    zeros = None if zeros is None else zeros.contiguous()  # the kernels index them as stored
    weight = _weight(words.contiguous(), scales.contiguous(), zeros, k, group_size)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if _use_triton(x2) and x2.dtype in (torch.float16, torch.bfloat16):
        from trtcompress.plugins.w4a16_gemm.gemv_lop3 import gemv_lop3_group_major, gemv_tc_group_major

        if m <= 2 and x2.dtype == torch.float16:
            # M = 2, symmetric: both rows of x in one program, one read of the weight (H200: 1.01-1.10x
            # and 0.93-1.26x of one row per program in two runs, the gain growing with the weight; with
            # zero points the two-row loop costs more registers than it saves)
            rows = 2 if m == 2 and zeros is None else 1
            out = gemv_lop3_group_major(x2, weight, rows=rows, **group_major_lop3_config(weight.n, k))
        else:
            out = gemv_tc_group_major(x2, weight, **(GEMV_TC_CONFIG if m <= 16 else GEMV_TC_PREFILL_CONFIG))
    else:
        qweight, row_scales, row_zeros = weight.to_packed()
        out = w4a16_gemm_reference(x2, qweight, row_scales, row_zeros, group_size, zeros is None)
    return out.reshape(*x.shape[:-1], weight.n)


@w4a16_gemm_group_major.register_fake
def _(x, words, scales, zeros, k, group_size) -> torch.Tensor:
    check_group_major_args(x.shape[-1], words, scales, zeros, k, group_size)
    return x.new_empty(*x.shape[:-1], words.shape[1])


def use_group_major(k: int, group_size: int, fp_exp: int) -> bool:
    """The runtime's choice: group-major where it applies, unless `TRTCOMPRESS_W4A16_LAYOUT=rows` or a
    row-layout kernel is forced (`TRTCOMPRESS_W4A16_DECODE` / `_PREFILL` name row-layout paths)."""
    layout = os.environ.get("TRTCOMPRESS_W4A16_LAYOUT", "group_major")
    if layout not in ("group_major", "rows"):
        raise ValueError(f"TRTCOMPRESS_W4A16_LAYOUT is 'group_major' or 'rows', not {layout!r}")
    forced = os.environ.get("TRTCOMPRESS_W4A16_DECODE") or os.environ.get("TRTCOMPRESS_W4A16_PREFILL")
    return layout == "group_major" and not forced and group_major_applies(k, group_size, fp_exp)
