"""Structured pruning: remove whole FFN channels and attention heads, so the model gets really smaller
and plain dense kernels run faster (no sparse kernel needed).

Importance is activation-aware (the structured analogue of Wanda): an FFN channel j scores
||X_j||₂²·||W_down[:, j]||₂², a head the sum of that over its head_dim input channels of o_proj, where
X is the input of down_proj / o_proj on the calibration tokens (diag of the engine's Hessian). Heads
respect GQA: `head_unit: kv_group` removes a key/value head with all its query heads; `query_head`
removes the same number of query heads from every group (the group ratio stays an integer).
With `compensate`, the kept input columns of down_proj / o_proj are refit by least squares to the
full layer's output on the calibration inputs (W' = W·H[:, K]·H_KK⁻¹, damped toward the kept
weights), which the engine's Hessian gives for free.

During the sweep the pruned channels are zeroed in down_proj / o_proj (the same function as the smaller
layer), so later layers calibrate on the pruned model; after the sweep (`finish`) every affected linear
is sliced to its new shape and the model config gets the new sizes. Widths are uniform across layers
(each layer keeps the same count of its own best channels), so the result is a normal, smaller
Hugging Face model: `save_pretrained` / `from_pretrained` and the native artifact load it as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from trtcompress.compressed.linear import CompressedLinear, set_module
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import CompressionError
from trtcompress.models.layout import decoder_layers, layer_prefix
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import HESSIAN, CalibratedPass, GroupHandle, GroupStats, LayerSweep


class StructuredConfig(PassConfig):
    method: Literal["structured"] = "structured"
    ffn_ratio: float = Field(0.25, ge=0, lt=1, description="fraction of FFN channels removed in every layer")
    head_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed")
    head_unit: Literal["kv_group", "query_head"] = Field(
        "kv_group", description="kv_group: a KV head with its query heads; query_head: query heads per group"
    )
    round_to: int = Field(32, ge=1, description="kept FFN width is a multiple of this (kernel-friendly)")
    compensate: bool = Field(True, description="least-squares refit of down_proj / o_proj on kept inputs")
    damp: float = Field(0.01, gt=0, le=1, description="compensation damping (fraction of mean diag H)")

    @model_validator(mode="after")
    def _something_to_do(self) -> StructuredConfig:
        if self.ffn_ratio == 0 and self.head_ratio == 0:
            raise ValueError("structured pruning needs ffn_ratio > 0 or head_ratio > 0")
        return self


@dataclass
class _LayerPlan:
    ffn_keep: torch.Tensor | None = None  # kept intermediate channels (sorted)
    q_keep: torch.Tensor | None = None  # kept query heads (sorted)
    kv_keep: torch.Tensor | None = None  # kept key/value heads (sorted)
    done: set[str] = field(default_factory=set)


def kept_ffn_width(width: int, ratio: float, round_to: int) -> int:
    keep = max(round_to, round(width * (1 - ratio) / round_to) * round_to)
    return min(width, keep)


def heads_removed(config: StructuredConfig, n_kv: int, per_group: int) -> int:
    """KV groups (head_unit kv_group) or query heads per group (query_head) the pass removes."""
    units = n_kv if config.head_unit == "kv_group" else per_group
    return round(units * config.head_ratio)


def pruned_widths(
    config: StructuredConfig, n_heads: int, n_kv: int, intermediate: int
) -> tuple[int, int, int]:
    """(query heads, KV heads, intermediate size) the pass leaves in every layer, from its settings alone:
    which channels and heads it keeps needs calibration, how many does not, so exports can check the
    pruned widths before the compression. A ratio the pass refuses (removing none or all) leaves them."""
    heads, kv = n_heads, n_kv
    if config.head_ratio:
        per_group = n_heads // n_kv
        remove = heads_removed(config, n_kv, per_group)
        if config.head_unit == "kv_group" and 0 < remove < n_kv:
            kv = n_kv - remove
            heads = kv * per_group
        elif config.head_unit == "query_head" and 0 < remove < per_group:
            heads = n_kv * (per_group - remove)
    if config.ffn_ratio:
        intermediate = kept_ffn_width(intermediate, config.ffn_ratio, config.round_to)
    return heads, kv, intermediate


def refit_columns(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float
) -> torch.Tensor:
    """Least-squares weights on the kept input columns: argmin ||X Wᵀ - X_K W'ᵀ||² + λ||W' - W_K||²
    = (W·H[:, K] + λ·W_K)·(H_KK + λI)⁻¹. The damping pulls toward the kept weights as they are (not
    toward zero), so dropping channels that contribute nothing leaves the layer exactly unchanged."""
    h = hessian.double()
    w = weight.double()
    h_kk = h[keep][:, keep]
    lam = damp * float(h_kk.diagonal().mean())
    h_kk = h_kk + lam * torch.eye(len(keep), dtype=h.dtype)
    rhs = h[:, keep].T @ w.T + lam * w[:, keep].T  # (K, out)
    return torch.linalg.solve(h_kk, rhs).T.float()


@register_pass
class StructuredPass(CalibratedPass):
    config_type = StructuredConfig
    config: StructuredConfig
    needs = frozenset({HESSIAN})
    sweep_alone = True  # it changes shapes: passes after it must see them

    def __init__(self, config: StructuredConfig) -> None:
        super().__init__(config)
        self.plans: dict[int, _LayerPlan] = {}

    # ------------------------------------------------------------------------------------ during sweep

    def start_layer(self, sweep: LayerSweep, context: PassContext) -> None:
        # `finish` slices q/k/v and gate/up too, whatever the targets: one compressed by an earlier pass
        # used to be found only there, after the whole sweep and with earlier layers already sliced (a
        # model of mismatched shapes). Refuse it before this layer changes.
        rels = []
        if self.config.ffn_ratio:
            rels += ["mlp.gate_proj", "mlp.up_proj"]
        if self.config.head_ratio:
            rels += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        handle = sweep.handles[0]
        for rel in rels:
            name = layer_prefix(sweep.index) + rel
            _check_uncompressed(name, handle.current_state(name))

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        kind = group.group.name
        if kind not in ("attn_out", "mlp_out"):
            return  # q/k/v and gate/up are sliced in `finish`, following these decisions
        (name,) = names
        assert stats.hessian is not None
        weight = group.weight(name)
        attn = group.layer.self_attn
        plan = self.plans.setdefault(group.layer_index, _LayerPlan())
        importance = stats.hessian.diagonal() * weight.pow(2).sum(0)  # per input channel
        if kind == "mlp_out":
            if self.config.ffn_ratio == 0:
                return
            width = weight.shape[1]
            n_keep = kept_ffn_width(width, self.config.ffn_ratio, self.config.round_to)
            if n_keep >= width:  # rounding to whole multiples of round_to kept every channel
                raise CompressionError(
                    f"{group.prefix}mlp: ffn_ratio {self.config.ffn_ratio} of {width} channels in "
                    f"multiples of round_to {self.config.round_to} keeps all {width}; lower round_to or "
                    "raise ffn_ratio"
                )
            plan.ffn_keep = importance.topk(n_keep).indices.sort().values
            keep = plan.ffn_keep
        else:
            if self.config.head_ratio == 0:
                return
            plan.q_keep, plan.kv_keep = self._choose_heads(importance, attn)
            head_dim = attn.head_dim
            keep = (plan.q_keep[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
        # the refit below is a float weight: an earlier pass's codes / mask / factors would be lost
        _check_uncompressed(name, group.current_state(name))
        new = torch.zeros_like(weight)
        if self.config.compensate:
            new[:, keep] = refit_columns(weight, stats.hessian, keep, self.config.damp)
        else:
            new[:, keep] = weight[:, keep]
        bias = group.members[name].bias
        state = CompressedLinearState(
            weight.shape[0], weight.shape[1], dense_weight=new,
            bias=None if bias is None else bias.detach().clone(),
        )  # fmt: skip
        group.set_state(name, state)
        plan.done.add(kind)

    def _choose_heads(self, importance: torch.Tensor, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = attn.head_dim
        n_heads = importance.numel() // head_dim
        per_group = attn.num_key_value_groups
        n_kv = n_heads // per_group
        head_score = importance.reshape(n_heads, head_dim).sum(-1)
        remove = heads_removed(self.config, n_kv, per_group)
        if self.config.head_unit == "kv_group":
            if remove >= n_kv or remove == 0:
                raise CompressionError(
                    f"head_ratio {self.config.head_ratio} removes {remove} of {n_kv} KV groups; "
                    "it must remove at least one and keep at least one"
                )
            kv_keep = head_score.reshape(n_kv, per_group).sum(-1).topk(n_kv - remove).indices.sort().values
            q_keep = (kv_keep[:, None] * per_group + torch.arange(per_group)[None, :]).flatten()
            return q_keep, kv_keep
        if remove >= per_group or remove == 0:
            raise CompressionError(
                f"head_ratio {self.config.head_ratio} removes {remove} of the {per_group} query heads of "
                "each KV group; it must remove at least one and keep at least one "
                "(or use head_unit: kv_group)"
            )
        scores = head_score.reshape(n_kv, per_group)
        local = scores.topk(per_group - remove, dim=-1).indices.sort(-1).values
        q_keep = (torch.arange(n_kv)[:, None] * per_group + local).flatten()
        return q_keep, torch.arange(n_kv)

    # -------------------------------------------------------------------------------------- after sweep

    def finish(self, model: nn.Module, context: PassContext) -> None:
        layers = decoder_layers(model)
        wanted = {
            k for k, r in (("mlp_out", self.config.ffn_ratio), ("attn_out", self.config.head_ratio)) if r
        }
        missing = [i for i in range(len(layers)) if i not in self.plans or self.plans[i].done != wanted]
        if missing:
            raise CompressionError(
                f"structured pruning keeps widths uniform across layers, but its targets leave layers "
                f"{missing[:8]} unpruned; target every layer's o_proj / down_proj"
            )
        config = model.config
        for index, layer in enumerate(layers):
            plan = self.plans[index]
            prefix = layer_prefix(index)
            if plan.ffn_keep is not None:
                for rel in ("mlp.gate_proj", "mlp.up_proj"):
                    _slice(model, prefix + rel, rows=plan.ffn_keep)
                _slice(model, prefix + "mlp.down_proj", cols=plan.ffn_keep)
            if plan.q_keep is not None:
                attn = layer.self_attn
                d = attn.head_dim
                q_rows = _head_rows(plan.q_keep, d)
                kv_rows = _head_rows(plan.kv_keep, d)  # type: ignore[arg-type]
                _slice(model, prefix + "self_attn.q_proj", rows=q_rows)
                _slice(model, prefix + "self_attn.k_proj", rows=kv_rows)
                _slice(model, prefix + "self_attn.v_proj", rows=kv_rows)
                _slice(model, prefix + "self_attn.o_proj", cols=q_rows)
                attn.num_key_value_groups = len(plan.q_keep) // len(plan.kv_keep)  # type: ignore[arg-type]
        first = self.plans[0]
        if first.ffn_keep is not None:
            config.intermediate_size = len(first.ffn_keep)
        if first.q_keep is not None:
            config.head_dim = layers[0].self_attn.head_dim  # explicit: hidden / heads no longer gives it
            config.num_attention_heads = len(first.q_keep)
            config.num_key_value_heads = len(first.kv_keep)  # type: ignore[arg-type]
        context.log(
            f"structured: intermediate_size {config.intermediate_size}, heads "
            f"{config.num_attention_heads} (kv {config.num_key_value_heads})"
        )


def _check_uncompressed(name: str, state: CompressedLinearState | None) -> None:
    if state is not None and (
        state.quantized is not None
        or state.mask is not None
        or state.lowrank_a is not None
        or state.act_quant is not None
        or state.pre_quant_scale is not None
    ):
        raise CompressionError(
            f"{name} is already compressed ({state.format_name}); put structured pruning before "
            "quantization or unstructured pruning in the recipe"
        )


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def _slice(
    model: nn.Module, name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> None:
    """Replace linear `name` by a plain nn.Linear holding only the given rows / columns."""
    module = model.get_submodule(name)
    if isinstance(module, CompressedLinear):
        state = module.state
        _check_uncompressed(name, state)
        weight, bias = state.weight(), state.bias
    else:
        weight, bias = module.weight.detach(), module.bias
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias.detach()[rows]
    if cols is not None:
        weight = weight[:, cols]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight.float().contiguous()
    if bias is not None:
        linear.bias.data = bias.detach().float().contiguous()
    set_module(model, name, linear)


__all__ = ["StructuredConfig", "StructuredPass", "kept_ffn_width", "refit_columns"]
