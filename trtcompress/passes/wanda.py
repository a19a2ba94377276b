"""Wanda (Sun et al., 2023): prune by |W_ij|·||X_j||₂, no weight update; optionally with Wanda++'s
regional gradient score (Yang et al., 2025).

The score compares weights within one output row (unstructured: the lowest `sparsity` of every row) or
within one aligned group of M inputs (N:M). ||X_j||₂² is the engine's SQ_NORMS statistic, taken on the
inputs the already-pruned layers produce (sequential, as upstream Wanda does).

Regional gradient score (RGS, `gradient_scale` α > 0): before the layer is pruned, the gradient of the
dense decoder layer's output norm ||f(X_n)||₂ with respect to each weight is taken per calibration
sequence n; G_ij is its root mean square over sequences, and the score becomes |W_ij|·(||X_j||₂ + α·G_ij).
G sees what the activation norm cannot: how much the layer's *output* (after attention, the MLP's
gating and the residual) depends on that weight. It costs one forward and backward of the layer per
sequence used (`gradient_samples`), never the whole model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trtcompress.compressed.sparsity import make_mask
from trtcompress.passes.base import PassContext, register_pass
from trtcompress.passes.engine import SQ_NORMS, CalibratedPass, GroupHandle, GroupStats, LayerSweep
from trtcompress.passes.pruning import PruneConfig, check_divisible, check_prunable, pruned_state
from trtcompress.passes.targets import matches_any

# The paper's α multiplies ||X_j||₂ taken over 128 x 2,048 tokens; here ||X_j||₂ is normalised to this
# many tokens, so that one α means the same whatever the calibration size.
REFERENCE_TOKENS = 128 * 2048


def wanda_scores(
    weight: torch.Tensor, sq_norms: torch.Tensor, gradient: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    importance = sq_norms.sqrt()[None, :]
    if gradient is not None and alpha > 0:
        importance = importance + alpha * gradient
    return weight.abs() * importance


def regional_gradients(sweep: LayerSweep, names: list[str], samples: int) -> dict[str, torch.Tensor]:
    """name -> RMS over the first `samples` sequences of d||f(X_n)||₂/dW for the dense layer."""
    weights = {name: sweep.linears[name].weight for name in names}
    frozen = [p for p in sweep.layer.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    n = min(samples, sweep.inputs.shape[0])
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for i in range(n):
                out = sweep.layer(sweep.inputs[i : i + 1], **sweep.kwargs)
                out = out[0] if isinstance(out, tuple) else out
                grads = torch.autograd.grad(out.float().norm(), list(weights.values()))
                for name, g in zip(weights, grads, strict=True):
                    sums[name] += g.float().pow(2)
    finally:
        for w in weights.values():
            w.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return {name: (s / n).sqrt_() for name, s in sums.items()}


class WandaConfig(PruneConfig):
    method: Literal["wanda"] = "wanda"
    gradient_scale: float = Field(
        0.0, ge=0, description="Wanda++ regional gradient score weight α (0 = plain Wanda)"
    )
    gradient_samples: int = Field(32, ge=1, description="calibration sequences for the regional gradients")


@register_pass
class WandaPass(CalibratedPass):
    config_type = WandaConfig
    config: WandaConfig
    needs = frozenset({SQ_NORMS})
    prunes = True

    def __init__(self, config: WandaConfig) -> None:
        super().__init__(config)
        self._gradients: dict[str, torch.Tensor] = {}

    def start_layer(self, sweep: LayerSweep, context: PassContext) -> None:
        cfg = self.config
        self._gradients = {}
        if cfg.gradient_scale <= 0:
            return
        names = [n for n in sweep.linears if matches_any(n, cfg.targets) and not matches_any(n, cfg.exclude)]
        if names:
            self._gradients = regional_gradients(sweep, names, cfg.gradient_samples)

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        assert stats.sq_norms is not None
        sq_norms = stats.sq_norms * (REFERENCE_TOKENS / stats.tokens)
        for name in names:
            check_prunable(name, group.current_state(name))
            weight = group.weight(name)
            check_divisible(name, weight.shape[1], self.config)
            scores = wanda_scores(weight, sq_norms, self._gradients.get(name), self.config.gradient_scale)
            keep = make_mask(scores, self.config.pattern, self.config.target_sparsity)
            group.set_state(name, pruned_state(weight, keep, self.config, group.members[name].bias))
