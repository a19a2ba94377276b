"""Wanda (Sun et al., 2023): prune by |W_ij|·||X_j||₂, no weight update.

The score compares weights within one output row (unstructured: the lowest `sparsity` of every row) or
within one aligned group of M inputs (N:M). ||X_j||₂² is the engine's SQ_NORMS statistic, taken on the
inputs the already-pruned layers produce (sequential, as upstream Wanda does).
"""

from __future__ import annotations

from typing import Literal

import torch

from trtcompress.compressed.sparsity import make_mask
from trtcompress.passes.base import PassContext, register_pass
from trtcompress.passes.engine import SQ_NORMS, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.pruning import PruneConfig, check_divisible, pruned_state


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    return weight.abs() * sq_norms.sqrt()[None, :]


class WandaConfig(PruneConfig):
    method: Literal["wanda"] = "wanda"


@register_pass
class WandaPass(CalibratedPass):
    config_type = WandaConfig
    config: WandaConfig
    needs = frozenset({SQ_NORMS})

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        assert stats.sq_norms is not None
        for name in names:
            weight = group.weight(name)
            check_divisible(name, weight.shape[1], self.config)
            keep = make_mask(wanda_scores(weight, stats.sq_norms), self.config.pattern, self.config.sparsity)
            group.set_state(name, pruned_state(weight, keep, self.config, group.members[name].bias))
