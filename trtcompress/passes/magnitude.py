"""Magnitude pruning: keep the largest |W| (per N:M group, or per output row). The data-free floor that
activation-aware pruning (Wanda, SparseGPT) must beat."""

from __future__ import annotations

from typing import Literal

from trtcompress.compressed.sparsity import make_mask
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.passes.base import LinearPass, register_pass
from trtcompress.passes.pruning import PruneConfig, check_divisible, check_prunable, pruned_state


class MagnitudeConfig(PruneConfig):
    method: Literal["magnitude"] = "magnitude"


@register_pass
class MagnitudePass(LinearPass):
    config_type = MagnitudeConfig
    config: MagnitudeConfig
    prunes = True

    def compress_linear(self, name: str, state: CompressedLinearState) -> CompressedLinearState:
        check_prunable(name, state)
        check_divisible(name, state.in_features, self.config)
        weight = state.weight()
        keep = make_mask(weight.abs(), self.config.pattern, self.config.target_sparsity)
        return pruned_state(weight, keep, self.config, state.bias)
