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


LLAMA_GROUPS: tuple[LinearGroup, ...] = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    LinearGroup("attn_out", ("self_attn.o_proj",), "self_attn.v_proj"),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj"),
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


def check_exact_attention(model: nn.Module, context: int, who: str, fix: str) -> None:
    """Refuse what a KV-cache decoder (`who`) would silently compute differently from the model's own
    forward for sequences of up to `context` tokens: q/k norms, a sliding window shorter than the context
    (the cache decoders attend to every committed token), rotary frequencies that change with the
    sequence length. `fix`: the advice, formatted with the largest context that is exact."""
    cfg, inner = model.config, model.get_decoder()
    for layer in inner.layers:
        attn = layer.self_attn
        if getattr(attn, "q_norm", None) is not None:
            raise NotImplementedError(f"{who} supports LLaMA-style attention only (this model has q/k norms)")
        # Qwen2 keeps each layer's window on its attention (None: full attention); Mistral's attention
        # reads the config's
        window = getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None))
        if window and window < context:
            raise NotImplementedError(
                f"the model attends within a sliding window of {window} tokens, which {who} does not "
                f"implement: {fix.format(window)} (asked: {context})"
            )
    rotary = inner.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    limit = None
    if rope_type == "longrope":  # long factors for every token once a sequence passes the limit
        limit = params.get("original_max_position_embeddings") or getattr(
            cfg, "original_max_position_embeddings", None
        )
    elif "dynamic" in rope_type:  # frequencies recomputed for sequences beyond the limit
        limit = getattr(rotary, "original_max_seq_len", None) or cfg.max_position_embeddings
    if limit is not None and context > limit:
        raise NotImplementedError(
            f"rope_type {rope_type!r} changes the rotary frequencies of every token of a sequence "
            f"longer than {limit} tokens (by the longest position in a forward call), which a KV cache "
            f"cannot follow: {fix.format(limit)} (asked: {context})"
        )
