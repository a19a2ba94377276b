"""`torch.ops.trtcompress.w4a4_fp4_gemm`: LLM-FP4 W4A4 (activation quantization fused, one FP GEMM).

CUDA tensors run the Triton kernel; CPU tensors run `reference.py` (`TRTCOMPRESS_GEMM_TRITON=1` with
`TRITON_INTERPRET=1` runs the kernel on CPU). `w4a4_linear(state)` maps a `CompressedLinearState` with an
FP4 weight and an FP4 activation quantizer onto the op.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from trtcompress.plugins.w4a4_fp4_gemm.reference import w4a4_fp4_gemm_reference
from trtcompress.plugins.w4a16_gemm.op import check_w4a16_args


def check_w4a4_args(
    k: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_scale: torch.Tensor,
    act_shift: torch.Tensor | None,
    w_exp: int,
    w_man: int,
    group_size: int,
) -> None:
    """Raise unless the tensors fit x's K (the kernel reads them by K and the group; the reference slices
    or broadcasts them: either would compute a wrong result silently)."""
    check_w4a16_args(k, qweight, scales, None, group_size, True, w_exp, w_man)
    if act_scale.numel() != 1:
        raise ValueError(f"act_scale must hold one value, got shape {tuple(act_scale.shape)}")
    if act_shift is not None and tuple(act_shift.shape) != (k,):
        raise ValueError(f"act_shift must have shape ({k},), got {tuple(act_shift.shape)}")


@torch.library.custom_op("trtcompress::w4a4_fp4_gemm", mutates_args=())
def w4a4_fp4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_scale: torch.Tensor,
    act_shift: torch.Tensor | None,
    w_exp: int,
    w_man: int,
    a_exp: int,
    a_man: int,
    group_size: int,
) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    check_w4a4_args(k, qweight, scales, act_scale, act_shift, w_exp, w_man, group_size)
    x2 = x.reshape(-1, k)
    args = (qweight, scales, act_scale, act_shift, w_exp, w_man, a_exp, a_man, group_size)
    use_triton = x2.is_cuda or os.environ.get("TRTCOMPRESS_GEMM_TRITON") == "1"
    if use_triton and x2.dtype == torch.float16:
        from trtcompress.plugins.w4a4_fp4_gemm.kernel import w4a4_fp4_gemm_triton

        # the kernel indexes its tensors as contiguous rows (no-op when they are)
        shift = None if act_shift is None else act_shift.contiguous()
        out = w4a4_fp4_gemm_triton(x2, qweight.contiguous(), scales.contiguous(), act_scale, shift, *args[4:])
    else:
        out = w4a4_fp4_gemm_reference(x2, *args)
    return out.reshape(*lead, qweight.shape[0])


@w4a4_fp4_gemm.register_fake
def _(x, qweight, scales, act_scale, act_shift, w_exp, w_man, a_exp, a_man, group_size) -> torch.Tensor:
    check_w4a4_args(x.shape[-1], qweight, scales, act_scale, act_shift, w_exp, w_man, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def w4a4_linear(state, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    from trtcompress.compressed import fpgrid
    from trtcompress.compressed.formats import FpFormat

    q, act = state.quantized, state.act_quant
    if q is None or act is None or not isinstance(q.format, FpFormat) or q.format.bits != 4:
        return None
    if act.exp_bits + act.man_bits != 3 or state.mask is not None or state.pre_quant_scale is not None:
        return None
    if state.lowrank_a is not None or act.saturate is not None:  # the op has no clamp below the grid's max
        return None
    fmt = q.format
    scales = fpgrid.effective_scales(q.scales, q.global_scale, fmt).to(device)
    shift = None if act.shift is None else act.shift.to(device)
    args = (q.qweight.to(device), scales, act.scale.to(device), shift, fmt.exp_bits, fmt.man_bits,
            act.exp_bits, act.man_bits, fmt.group_size)  # fmt: skip
    bias = None if state.bias is None else state.bias.to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = w4a4_fp4_gemm(x, *args)
        return out if bias is None else out + bias.to(out.dtype)

    return run
