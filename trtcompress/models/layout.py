"""Where the parts of a LLaMA-family decoder live, by module name.

Llama, Mistral and Qwen2 share this layout. The calibration engine needs two facts per decoder layer:
which linear layers read the same input (a *group*, in the order the forward calls them), and which
operation produces that input (where a per-channel input scale can be folded, as AWQ does).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from trtcompress.errors import ModelError


@dataclass(frozen=True)
class LinearGroup:
    name: str
    linears: tuple[str, ...]  # relative to the decoder layer, in call order
    producer: str  # module whose output is the group's input (a norm, or a linear for the output projections)
    producer_is_norm: bool


LLAMA_GROUPS: tuple[LinearGroup, ...] = (
    LinearGroup(
        "attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True
    ),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj", False),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", False),
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(
            f"{type(model).__name__}: no decoder layers at model.layers (not a LLaMA-family model)"
        )
    return layers


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."
