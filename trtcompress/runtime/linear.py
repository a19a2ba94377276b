"""Linear layers as the runtime runs them.

CPU (the reference path): the weight a `CompressedLinearState` stores is dequantized once at load and
the layer computes exactly what `CompressedLinearState.forward` computes (run-time activation
quantization for W4A4, the low-rank branch on the unquantized input), without re-dequantizing every
step. Projections that read the same input and carry no activation quantizer or low-rank branch
(q|k|v, gate|up) are fused into one GEMM.

CUDA: 4-bit weights run the plugin ops (`trtcompress::w4a16_gemm`, `trtcompress::w4a4_fp4_gemm`),
which dequantize in registers; other formats fall back to the dequantized weight.

Batch invariance. A CPU BLAS GEMM's result for one row depends on how many rows it is given (M = 1
takes a GEMV path, other M other blockings), so a token's logits would change with the batch it runs
in and greedy outputs with the server's load. Every GEMM here is therefore called on fixed tiles of
`tile` rows (the last tile zero-padded): a row's result then depends only on the row (checked in
tests/runtime/test_model.py), at the cost of at most `tile - 1` padded rows per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trtcompress.compressed.linear import CompressedLinear
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """F.linear over fixed `tile`-row slices of x (T, K) -> (T, N); rows never see their neighbours."""
    rows = x.shape[0]
    pad = (-rows) % tile
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    out = torch.cat([F.linear(x[i : i + tile], weight, bias) for i in range(0, rows + pad, tile)])
    return out[:rows]


class RuntimeLinear:
    """One or more fused linear layers reading the same input, computed on fixed row tiles."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tile: int,
        act_quant: ActQuantizer | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        splits: list[int] | None = None,
        plugin: object | None = None,
        pre_scale: torch.Tensor | None = None,
    ) -> None:
        self.weight, self.bias, self.tile = weight, bias, tile
        self.act_quant, self.lowrank, self.pre_scale = act_quant, lowrank, pre_scale
        self.splits = splits or [weight.shape[0]]
        self.plugin = plugin  # a CUDA kernel callable, or None for the reference path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plugin is not None:
            return self.plugin(x)
        delta = None
        if self.lowrank is not None:
            a, b = self.lowrank
            delta = tiled_linear(tiled_linear(x, b, None, self.tile), a, None, self.tile)
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.act_quant is not None:
            x = self.act_quant.gemm_operand(x)
        out = tiled_linear(x, self.weight, self.bias, self.tile)
        return out if delta is None else out + delta

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.splits, dim=-1)


def _state(module: nn.Module) -> CompressedLinearState:
    if isinstance(module, CompressedLinear):
        return module.state
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return CompressedLinearState(
            module.out_features, module.in_features, dense_weight=module.weight.detach(), bias=bias
        )
    raise TypeError(f"expected a linear layer, got {type(module).__name__}")


def _plain(state: CompressedLinearState) -> bool:
    return state.act_quant is None and state.lowrank_a is None and state.pre_quant_scale is None


def build_linear(modules: list[nn.Module], tile: int, device: torch.device) -> RuntimeLinear:
    """A RuntimeLinear for `modules` (fused when they can be), float32 on CPU."""
    states = [_state(m) for m in modules]
    if device.type == "cuda" and len(states) == 1:
        from trtcompress.runtime.plugins import plugin_for

        plugin = plugin_for(states[0], device)
        if plugin is not None:
            return RuntimeLinear(states[0].stored_weight(), None, tile, plugin=plugin)
    if len(states) > 1 and not all(_plain(s) for s in states):
        raise ValueError("only plain linears (no activation quantizer or low-rank branch) are fused")
    dtype = torch.float32
    weight = torch.cat([s.stored_weight(dtype) for s in states]).to(device).contiguous()
    biases = [s.bias for s in states]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.to(dtype) if b is not None else torch.zeros(s.out_features)
                for b, s in zip(biases, states, strict=True)
            ]
        ).to(device)
    state = states[0]
    lowrank = None
    if state.lowrank_a is not None:
        lowrank = (state.lowrank_a.to(device, dtype), state.lowrank_b.to(device, dtype))  # type: ignore[union-attr]
    pre_scale = None if state.pre_quant_scale is None else state.pre_quant_scale.to(device, dtype)
    return RuntimeLinear(
        weight,
        bias,
        tile,
        act_quant=state.act_quant,
        lowrank=lowrank,
        splits=[s.out_features for s in states],
        pre_scale=pre_scale,
    )


def build_group(modules: list[nn.Module], tile: int, device: torch.device) -> list[RuntimeLinear]:
    """Fuse a group of projections sharing an input when all are plain; otherwise one each."""
    states = [_state(m) for m in modules]
    if device.type != "cuda" and all(_plain(s) for s in states):
        return [build_linear(modules, tile, device)]
    return [build_linear([m], tile, device) for m in modules]
