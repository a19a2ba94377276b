"""Wanda++ regional optimization (Yang et al., 2025): after a decoder layer is pruned, a few gradient
steps on that layer's pruned weights (mask fixed) so its output matches the dense layer's output.

It runs in the same sweep as the pruning pass placed before it in the recipe: the engine hands it the
layer's inputs (outputs of the already pruned layers) and the layer's output before the sweep pruned
it (LAYER_OUTPUTS), and recomputes the layer's output afterwards for the next layer. It ends that sweep:
passes after it in the recipe (gptq) run in the next one, on what it trained. Only linears that
hold a pruned dense weight are trained (quantized weights have no gradient on their grid); gradients
at pruned positions are zeroed, so the mask cannot change. Regional means cheap: one layer's forward and
backward on a few sequences per step, never the whole model. If the optimised layer matches the dense
output worse than before on the sequences it used, its weights are restored.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import torch
from pydantic import Field

from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import (
    LAYER_OUTPUTS,
    CalibratedPass,
    GroupHandle,
    GroupStats,
    LayerSweep,
    rerun_layer,
)
from trtcompress.passes.targets import matches_any


class RegionalConfig(PassConfig):
    method: Literal["regional"] = "regional"
    steps: int = Field(10, ge=1, description="optimizer steps per decoder layer")
    samples: int = Field(32, ge=1, description="calibration sequences used (the first ones)")
    batch_size: int = Field(4, ge=1, description="sequences per step")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    optimizer: Literal["rmsprop", "adam"] = Field("rmsprop", description="Wanda++ uses RMSprop")


def _output(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@register_pass
class RegionalPass(CalibratedPass):
    config_type = RegionalConfig
    config: RegionalConfig
    needs = frozenset({LAYER_OUTPUTS})
    ends_sweep = True  # it trains after the layer's forward: a later gptq must quantize what it trained

    def __init__(self, config: RegionalConfig) -> None:
        super().__init__(config)
        self.history: list[dict[str, float]] = []  # per layer: loss before / after, seconds

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        return None  # works on the whole layer, in finish_layer

    def _trainable(self, sweep: LayerSweep) -> dict[str, torch.Tensor]:
        """name -> keep-mask of the pruned dense linears this pass targets."""
        cfg = self.config
        return {
            name: state.mask.dense()
            for name, state in sweep.states.items()
            if state.mask is not None
            and state.quantized is None
            and matches_any(name, cfg.targets)
            and not matches_any(name, cfg.exclude)
        }

    def _loss(self, sweep: LayerSweep, batch: slice) -> torch.Tensor:
        # As the engine computed the dense target: with the activation quantizers of W4A4 linears.
        out = _output(rerun_layer(sweep.layer, sweep.handles, sweep.inputs[batch], sweep.kwargs))
        target = sweep.dense_outputs[batch]  # type: ignore[index]
        return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)

    def finish_layer(self, sweep: LayerSweep, context: PassContext) -> bool:
        masks = self._trainable(sweep)
        if not masks or sweep.dense_outputs is None:
            return False
        cfg = self.config
        start = time.perf_counter()
        n = min(cfg.samples, sweep.inputs.shape[0])
        batches = [slice(i, min(i + cfg.batch_size, n)) for i in range(0, n, cfg.batch_size)]
        params = {name: sweep.linears[name].weight for name in masks}
        saved = {name: p.detach().clone() for name, p in params.items()}
        # A linear's weight here is the state's effective one, stored weight + low-rank factors (EoRA
        # earlier in the sweep): the mask holds the stored weight at zero, i.e. this one at A·B.
        pinned = {name: sweep.states[name].lowrank_delta(p.dtype) for name, p in params.items()}
        before = sum(float(self._loss(sweep, b)) * (b.stop - b.start) for b in batches) / n
        frozen = [p for p in sweep.layer.parameters() if p.requires_grad]  # norms: not trained here
        for p in frozen:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt_cls = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.Adam
        optimizer = opt_cls(list(params.values()), lr=cfg.lr)
        try:
            with torch.enable_grad():
                for step in range(cfg.steps):
                    optimizer.zero_grad(set_to_none=True)
                    self._loss(sweep, batches[step % len(batches)]).backward()
                    for name, p in params.items():
                        p.grad.masked_fill_(~masks[name], 0)  # type: ignore[union-attr]
                    optimizer.step()
                    with torch.no_grad():  # the optimizer's own terms must not move pruned weights either
                        for name, p in params.items():
                            p.copy_(torch.where(masks[name], p, pinned[name]))
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
            for p in frozen:
                p.requires_grad_(True)
        after = sum(float(self._loss(sweep, b)) * (b.stop - b.start) for b in batches) / n
        improved = after < before
        for name, p in params.items():
            if not improved:
                p.data.copy_(saved[name])
                continue
            state = sweep.states[name]
            dense = (p.detach() - pinned[name]).to(state.dense_weight.dtype)  # type: ignore[union-attr]
            sweep.set_state(name, dataclasses.replace(state, dense_weight=dense))
        seconds = time.perf_counter() - start
        self.history.append({"layer": sweep.index, "before": before, "after": after, "seconds": seconds})
        context.log(
            f"regional: layer {sweep.index} relative output error {before:.4f} -> {after:.4f}"
            + ("" if improved else " (no gain: weights restored)")
        )
        return improved
