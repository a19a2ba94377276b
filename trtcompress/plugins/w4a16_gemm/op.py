"""`torch.ops.trtcompress.w4a16_gemm`: x @ W4ᵀ for a packed 4-bit weight (INT4 or FP4 codes).

CUDA tensors run the Triton kernels; CPU tensors run `reference.py` (set `TRTCOMPRESS_GEMM_TRITON=1`
with `TRITON_INTERPRET=1` to run the kernels on CPU). Which kernel, by rows of x (M):
- decode, M = 1 or 2 with fp16 x: the lop3 GEMV on 32-bit weight words (`gemv_lop3.py`, launch by
  weight size, `gemv_lop3_config`: one kernel per call, its split-K partials added by the last split;
  on an H200, replayed from CUDA graphs, 1.9-2.4x of a bf16 matmul at K = N = 4096-14336 with these
  configs, BENCHMARKS.md); M = 1 with K not a multiple of 8 the
  packed-fp16 GEMV (`w4a16_gemv_h2_kernel`, `GEMV_H2_CONFIG`); unless `TRTCOMPRESS_W4A16_DECODE` names
  another path;
- decode, M <= 16: `TRTCOMPRESS_W4A16_DECODE` = "gemv_tc" (default: the tensor-core GEMV,
  `w4a16_gemv_tc_kernel`, with `GEMV_TC_CONFIG`; on an H100 1.3-2.0x of a bf16 matmul at M = 1..16,
  every row of x sharing one read of the weight), "gemv_lop3" (M <= 2) / "gemv_h2" (M = 1; other M
  take gemv_tc) or "gemv" (the elementwise GEMV for M <= 8, which re-reads the weight per row);
- prefill, M > 16: `TRTCOMPRESS_W4A16_PREFILL` = "gemv_tc" (default: the same kernel in 128-row tiles,
  `GEMV_TC_PREFILL_CONFIG`; on an H100 2.3-2.5x faster than the GEMM at M = 512 / 2048) or "gemm"
  (`w4a16_gemm_kernel`). FP4 codes and groups the tensor-core GEMV does not take (not a power of two)
  run the elementwise GEMV (up to 8 rows) or the GEMM.
`w4a16_linear(state)` turns a `CompressedLinearState` with a 4-bit weight into the op's arguments; on
CUDA, INT4 layers of whole 128-column chunks are held group-major instead and run through
`torch.ops.trtcompress.w4a16_gemm_group_major` (`group_major_op.py`; `TRTCOMPRESS_W4A16_LAYOUT=rows`
keeps this op).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from trtcompress.plugins.w4a16_gemm.group_major_op import use_group_major
from trtcompress.plugins.w4a16_gemm.reference import w4a16_gemm_reference

# launch parameters of the "gemv_tc" decode path: the best of the H100 tuning at M = 1 (second run, K = N
# = 4096 and 11008; within 3% of the best at 14336, where the stream-K schedule won by 1%;
# benchmarks/results/gemm_gpu_h100_gemv_tc.json)
GEMV_TC_CONFIG = {"block_n": 64, "block_k": 256, "split_k": 8, "num_warps": 4, "num_stages": 3}
# the "gemv_h2" decode path at M = 1: the best of the H200 tuning at K = N = 11008 and 14336 (32-row
# tiles were 1.5% faster at 4096; benchmarks/results/gemm_gpu_h200_gemv.json)
GEMV_H2_CONFIG = {"block_n": 128, "block_k": 256, "split_k": 8, "num_warps": 4, "num_stages": 2, "h2_sub": 8}
# the "gemv_lop3" decode path (fp16 x, M <= 2): the best configs of the H200 tuning, replayed from CUDA
# graphs with the weight read from HBM (benchmarks/gemv_graphs_gpu.py, two runs:
# benchmarks/results/gemv_graphs_gpu_h200*.json), by weight size N * K: split-K 16 on 2 warps at
# 4096 x 4096 (1.89-1.92x of the same run's bf16 matmul), 64-row tiles at 11008 x 11008 (2.33-2.37x),
# 128-row tiles at 14336 x 14336 (2.25x, first run; the second timed 512-column blocks instead, 2.30x);
# all with the one-kernel split-K sums and prefetching
GEMV_LOP3_CONFIGS = (  # (largest N * K, config), the first that fits
    (4096 * 4096, {"block_n": 128, "block_k": 256, "split_k": 16, "num_warps": 2, "num_stages": 1}),
    (11008 * 11008, {"block_n": 64, "block_k": 256, "split_k": 8, "num_warps": 4, "num_stages": 3}),
    (None, {"block_n": 128, "block_k": 256, "split_k": 8, "num_warps": 4, "num_stages": 3}),
)
GEMV_LOP3_OPTIONS = {"last_sums": True, "prefetch": True}
GEMV_LOP3_CONFIG = {**GEMV_LOP3_CONFIGS[-1][1], **GEMV_LOP3_OPTIONS}  # the largest layers'


def gemv_lop3_config(n: int, k: int) -> dict:
    """The lop3 GEMV's launch for an (N, K) weight (`GEMV_LOP3_CONFIGS`)."""
    config = next(cfg for limit, cfg in GEMV_LOP3_CONFIGS if limit is None or n * k <= limit)
    return {**config, **GEMV_LOP3_OPTIONS}


# prefill (M > 16) in block_m-row tiles: the best of six tiles at K = N = 4096, M = 2048 on the H100
# (benchmarks/results/gemm_gpu_h100_prefill_4096.json)
GEMV_TC_PREFILL_CONFIG = {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}


def _kernels(device: torch.device | str) -> bool:
    """Whether the ops run their Triton kernels on `device` (CUDA, or any with TRTCOMPRESS_GEMM_TRITON=1)."""
    return torch.device(device).type == "cuda" or os.environ.get("TRTCOMPRESS_GEMM_TRITON") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    return _kernels(x.device)


def _kernel_kwargs(
    m: int, n: int, k: int, group_size: int, fp_exp: int, dtype: torch.dtype = torch.float16
) -> dict:
    """`w4a16_gemm_triton` arguments for M rows of x and an (N, K) weight (see the module docstring)."""
    from trtcompress.plugins.w4a16_gemm.kernel import gemv_tc_group

    group = group_size if group_size > 0 else k
    if m <= 16:  # one weight read serves up to 16 rows
        decode = os.environ.get("TRTCOMPRESS_W4A16_DECODE")
        fp16 = dtype == torch.float16
        # gemv_lop3 re-reads the weight per row of x: faster than gemv_tc at 1 and 2 rows, not at 4
        lop3_ok = (
            fp16 and m <= 2 and k % 8 == 0 and gemv_tc_group(k, group, GEMV_LOP3_CONFIG["block_k"], fp_exp)
        )
        if decode in (None, "gemv_lop3") and lop3_ok:
            return {"path": "gemv_lop3", **gemv_lop3_config(n, k)}
        h2_ok = fp16 and m == 1 and gemv_tc_group(k, group, GEMV_H2_CONFIG["block_k"], fp_exp)
        if decode in (None, "gemv_h2", "gemv_lop3") and h2_ok:
            return {"path": "gemv_h2", **GEMV_H2_CONFIG}
        if decode in (None, "gemv_tc", "gemv_h2", "gemv_lop3") and gemv_tc_group(
            k, group, GEMV_TC_CONFIG["block_k"], fp_exp
        ):
            return {"path": "gemv_tc", **GEMV_TC_CONFIG}
        return {}  # "auto": the elementwise GEMV with its own launch defaults, or the GEMM past 8 rows
    prefill = os.environ.get("TRTCOMPRESS_W4A16_PREFILL", "gemv_tc")
    if prefill == "gemv_tc" and gemv_tc_group(k, group, GEMV_TC_PREFILL_CONFIG["block_k"], fp_exp):
        return {"path": "gemv_tc", **GEMV_TC_PREFILL_CONFIG}
    return {"path": "gemm"}


def check_w4a16_args(
    k: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    symmetric: bool,
    fp_exp: int,
    fp_man: int,
) -> None:
    """Raise unless the weight tensors fit x's K (the kernels read them by K and the group, the reference
    slices them: either would compute a wrong result silently from tensors of other shapes)."""
    n = qweight.shape[0]
    groups = 1 if group_size <= 0 else -(-k // group_size)
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (n, (k + 1) // 2):
        got = f"{qweight.dtype} {tuple(qweight.shape)}"
        raise ValueError(f"qweight must be uint8 ({n}, {(k + 1) // 2}) for K = {k}, got {got}")
    if tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"scales must be ({n}, {groups}) for K = {k}, group {group_size}: got {tuple(scales.shape)}"
        )
    if fp_exp > 0:
        if fp_exp + fp_man != 3:
            raise ValueError(f"FP4 codes need fp_exp + fp_man = 3, got E{fp_exp}M{fp_man}")
    elif not symmetric and (zeros is None or tuple(zeros.shape) != (n, groups)):
        got = None if zeros is None else tuple(zeros.shape)
        raise ValueError(f"asymmetric INT4 needs zeros of shape ({n}, {groups}), got {got}")


@torch.library.custom_op("trtcompress::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    symmetric: bool,
    fp_exp: int,
    fp_man: int,
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    check_w4a16_args(k, qweight, scales, zeros, group_size, symmetric, fp_exp, fp_man)
    x2 = x.reshape(-1, k)
    if _use_triton(x2) and x2.dtype in (torch.float16, torch.bfloat16):
        from trtcompress.plugins.w4a16_gemm.kernel import w4a16_gemm_triton

        # some kernels index the weight, scales and zeros as contiguous rows (no-op when they are)
        qweight, scales = qweight.contiguous(), scales.contiguous()
        zeros = None if zeros is None else zeros.contiguous()
        kwargs = _kernel_kwargs(x2.shape[0], qweight.shape[0], k, group_size, fp_exp, x2.dtype)
        out = w4a16_gemm_triton(x2, qweight, scales, zeros, group_size, symmetric, fp_exp, fp_man, **kwargs)
    else:
        out = w4a16_gemm_reference(x2, qweight, scales, zeros, group_size, symmetric, fp_exp, fp_man)
    return out.reshape(*lead, qweight.shape[0])


@w4a16_gemm.register_fake
def _(x, qweight, scales, zeros, group_size, symmetric, fp_exp, fp_man) -> torch.Tensor:
    check_w4a16_args(x.shape[-1], qweight, scales, zeros, group_size, symmetric, fp_exp, fp_man)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def w4a16_linear(state, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A callable computing `state`'s layer with the op, or None when the op does not cover it
    (not 4-bit, activation quantizer, sparsity mask, low-rank branch or pre-quant scale)."""
    from trtcompress.compressed import fpgrid
    from trtcompress.compressed.formats import FpFormat

    if not _covers(state):
        return None
    q = state.quantized
    fmt = q.format
    fp = isinstance(fmt, FpFormat)
    scales = fpgrid.effective_scales(q.scales, q.global_scale, fmt) if fp else q.scales
    bias = None if state.bias is None else state.bias.to(device)
    if _group_major_form(state, device):
        return _group_major_run(q.qweight, scales, q.zeros, fmt.group_size, state.in_features, bias, device)
    args = (
        q.qweight.to(device),
        scales.to(device),
        None if q.zeros is None else q.zeros.to(device),
        fmt.group_size,
        q.zeros is None,
        fmt.exp_bits if fp else 0,
        fmt.man_bits if fp else 0,
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        out = w4a16_gemm(x, *args)
        return out if bias is None else out + bias.to(out.dtype)

    return run


def w4a16_fused_linear(
    states: list, device: torch.device | str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One callable for several INT4 layers reading the same input (q / k / v, gate / up), their outputs
    side by side: one group-major weight of the concatenated rows, so a decode step runs one GEMV
    instead of one per layer (the small k / v projections alone would be launch-bound). None unless
    every layer takes the group-major path of `w4a16_linear` with the same K, group and zero points."""
    if len(states) < 2 or not all(_covers(s) and _group_major_form(s, device) for s in states):
        return None
    qs = [s.quantized for s in states]
    fmt, k = qs[0].format, states[0].in_features
    if not all(
        q.format == fmt and s.in_features == k and (q.zeros is None) == (qs[0].zeros is None)
        for s, q in zip(states, qs, strict=True)
    ):
        return None
    bias = None
    if any(s.bias is not None for s in states):
        zeros = [torch.zeros(s.out_features) if s.bias is None else s.bias.float() for s in states]
        bias = torch.cat(zeros).to(device)
    zero_points = None if qs[0].zeros is None else torch.cat([q.zeros for q in qs])
    qweight, scales = torch.cat([q.qweight for q in qs]), torch.cat([q.scales for q in qs])
    return _group_major_run(qweight, scales, zero_points, fmt.group_size, k, bias, device)


def _covers(state) -> bool:
    """Whether the op computes `state`'s layer: a 4-bit weight and nothing the op does not apply
    (activation quantizer, sparsity mask, low-rank branch, pre-quant scale)."""
    q = state.quantized
    return (
        q is not None
        and q.format.bits == 4
        and state.act_quant is None
        and state.mask is None
        and state.lowrank_a is None
        and state.pre_quant_scale is None
    )


def _group_major_form(state, device: torch.device | str) -> bool:
    """Whether a covered layer is held group-major on `device` (INT4 whose K and group fit the layout,
    the kernel path, not turned off; `use_group_major`)."""
    from trtcompress.compressed.formats import FpFormat

    fmt = state.quantized.format
    fp_exp = fmt.exp_bits if isinstance(fmt, FpFormat) else 0
    return _kernels(device) and use_group_major(state.in_features, fmt.group_size, fp_exp)


def _group_major_run(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group: int,
    k: int,
    bias: torch.Tensor | None,
    device: torch.device | str,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The layer held in the layout the decode GEMV reads fastest (the row layout is not kept: same
    memory), computed by the group-major op."""
    from trtcompress.plugins.w4a16_gemm.gemv_lop3 import GroupMajorWeight
    from trtcompress.plugins.w4a16_gemm.group_major_op import w4a16_gemm_group_major

    weight = GroupMajorWeight.from_packed(
        qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device), group, k
    )
    args = weight.op_args

    def run_group_major(x: torch.Tensor) -> torch.Tensor:
        out = w4a16_gemm_group_major(x, *args)
        return out if bias is None else out + bias.to(out.dtype)

    return run_group_major
