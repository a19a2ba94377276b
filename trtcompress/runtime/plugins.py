"""CUDA linear layers through the quantized GEMM plugin ops (W4A16 INT4/FP4, LLM-FP4 W4A4)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trtcompress.compressed.state import CompressedLinearState


def plugin_for(state: CompressedLinearState, device: torch.device) -> Callable | None:
    """The op-backed callable for `state` on `device`, or None (the dequantized-weight path then runs)."""
    if device.type != "cuda":
        return None
    from trtcompress.plugins.w4a4_fp4_gemm.op import w4a4_linear
    from trtcompress.plugins.w4a16_gemm.op import w4a16_linear

    return w4a4_linear(state, device) or w4a16_linear(state, device)


def fused_plugin_for(states: list[CompressedLinearState], device: torch.device) -> Callable | None:
    """One op-backed callable for layers reading the same input (outputs side by side), or None."""
    if device.type != "cuda":
        return None
    from trtcompress.plugins.w4a16_gemm.op import w4a16_fused_linear

    return w4a16_fused_linear(states, device)
