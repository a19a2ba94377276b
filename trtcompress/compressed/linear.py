"""CompressedLinear: an nn.Module that computes from a CompressedLinearState.

This is the reference path: the weight is dequantized on the fly at every forward, so what runs is
exactly what the artifact stores. A state with an activation quantizer (W4A4) also quantizes the
input at run time, as its deployed kernel would. Optimised kernels (plugins/) must match it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from trtcompress.compressed.state import CompressedLinearState


class CompressedLinear(nn.Module):
    def __init__(self, state: CompressedLinearState) -> None:
        super().__init__()
        self.in_features = state.in_features
        self.out_features = state.out_features
        meta = state.meta()
        keys = ("shape", "quant", "act", "extra", "sparsity", "lowrank")
        self._meta = {k: meta[k] for k in keys if k in meta}
        self._tensor_names = tuple(state.tensors())
        for name, tensor in state.tensors().items():
            self.register_buffer(name, tensor)
        if state.bias is None:
            self.bias = None  # same attribute surface as nn.Linear

    def _apply(self, fn: Any, recurse: bool = True) -> CompressedLinear:
        """Device moves apply; dtype casts (`.to(torch.bfloat16)`, `.half()`, `.float()`) do not: the
        buffers are the stored format (fp16 / E4M3 / E8M0 scales, the fp32 activation scale), which a cast
        would silently change (bf16 scales move the weights, fp32 ones double their bytes) or make
        invalid. The forward casts to the input's dtype anyway."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    @property
    def state(self) -> CompressedLinearState:
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return CompressedLinearState.from_tensors(self._meta, tensors)

    @property
    def format_name(self) -> str:
        return self.state.format_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def compressed_linears(model: nn.Module) -> Iterator[tuple[str, CompressedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            yield name, module


def linear_state(module: nn.Module) -> CompressedLinearState:
    """The state of a plain nn.Linear (dense weight) or of a CompressedLinear."""
    if isinstance(module, CompressedLinear):
        return module.state
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return CompressedLinearState(
            module.out_features, module.in_features, dense_weight=module.weight.detach(), bias=bias
        )
    raise TypeError(f"expected a linear layer, got {type(module).__name__}")
