"""Exact byte counts of a model's weights as stored (codes, scales, zeros, dense tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trtcompress.compressed.linear import CompressedLinear
from trtcompress.passes.targets import select_linears


@dataclass(frozen=True)
class WeightStats:
    weight_bytes: int  # every stored tensor, tied tensors once
    params: int  # logical parameter count (a compressed (out, in) weight counts out*in)
    linear_weight_bytes: int  # decoder linear weights (the layers recipes compress), without bias
    linear_params: int

    @property
    def bits_per_param(self) -> float:
        """Average bits per weight of the decoder linear layers (the usual 'bits/weight' figure)."""
        return 8.0 * self.linear_weight_bytes / max(self.linear_params, 1)

    @property
    def bits_per_param_model(self) -> float:
        """Bits per parameter over the whole model, embeddings and norms included."""
        return 8.0 * self.weight_bytes / max(self.params, 1)


def weight_stats(model: nn.Module, linear_exclude: tuple[str, ...] = ("lm_head",)) -> WeightStats:
    # A tensor is the same stored tensor as one already counted only when it is the same view of the same
    # storage (tied weights), as the artifact writer dedups them (native._unique_tensors): distinct slices
    # of one storage are distinct tensors, each saved (GPTQ's q/k/v and gate/up scales are row slices of
    # one fused scales tensor; keyed by storage alone, k/v/up scales went uncounted).
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = params = 0
    for module in model.modules():
        compressed = isinstance(module, CompressedLinear)
        tensors = list(module.named_buffers(recurse=False)) + list(module.named_parameters(recurse=False))
        for name, tensor in tensors:
            if name in getattr(module, "_non_persistent_buffers_set", set()):
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
            if not compressed:
                params += tensor.numel()
        if compressed:
            bias = module.out_features if module.bias is not None else 0
            params += module.out_features * module.in_features + bias
    linear_bytes = linear_params = 0
    for _, module in select_linears(model, ["*"], linear_exclude):
        if isinstance(module, CompressedLinear):
            linear_bytes += module.state.weight_nbytes
        else:
            linear_bytes += module.weight.numel() * module.weight.element_size()
        linear_params += module.out_features * module.in_features
    return WeightStats(total, params, linear_bytes, linear_params)
