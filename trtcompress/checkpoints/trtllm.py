"""TensorRT-LLM checkpoint writer: `config.json` + `rank{N}.safetensors` for LLaMA-family models.

Written from the model's CompressedLinearStates (never re-quantized), for tensor- and pipeline-parallel
mappings: rank = pp_rank * tp_size + tp_rank; q|k|v fused along the output dim and split per rank by
heads (KV heads are replicated when tp_size exceeds them, as TensorRT-LLM does), column-parallel layers
(qkv, mlp.fc = gate_proj, mlp.gate = up_proj, lm_head) split by output rows, row-parallel layers
(attention.dense, mlp.proj) by input channels; decoder layers split evenly across pipeline stages
(the first `layers % pp` stages take one more) with stage-local indices, the embedding on the first
stage, `ln_f` and `lm_head` on the last. Tensor names and layouts follow NVIDIA ModelOpt's
`export_tensorrt_llm_checkpoint` (see trtllm_layout.py for each quantization layout); the tests compare
the two tensor for tensor. Writing needs only torch; building an engine from it needs TensorRT-LLM
(builders/engine.py).

Layers TensorRT-LLM has no name for (LLM-FP4 W4A4, GEAR/KIVI KV caches) are written with their own
tensors and listed under the config's top-level `trtcompress.plugins`; `stock_trtllm_build` is false
then, and `trtcompress build --engine` refuses them with a message instead of building a wrong engine.
The lm_head is always written dense (its dequantized weight when it was quantized: the same function).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import trtcompress
from trtcompress.checkpoints import trtllm_layout as lay
from trtcompress.checkpoints.trtllm_layout import ExportError, LinearParts
from trtcompress.compressed.linear import linear_state

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
KV_ALGOS = {"int8": "INT8", "fp8": "FP8"}
KV_QMAX = {"INT8": 127.0, "FP8": 448.0}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PLUGIN_GEMM = "trtcompress::w4a4_fp4_gemm"
PLUGIN_GEAR = "trtcompress::gear_attention"
ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "dense": "o_proj"}
MLP = {"fc": "gate_proj", "gate": "up_proj", "proj": "down_proj"}


@dataclass(frozen=True)
class TrtllmOptions:
    tp_size: int = 1
    pp_size: int = 1
    dtype: str = "float16"
    kv_cache: str | None = None  # the recipe's kv_cache.codec
    kv_cache_scales: tuple[float, ...] | None = None  # per decoder layer, for INT8 / FP8 KV caches


@dataclass
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int
    tp: int
    pp: int

    @property
    def kv_per_rank(self) -> int:
        return max(self.kv_heads // self.tp, 1)

    def kv_head_range(self, rank: int) -> tuple[int, int]:
        if self.kv_heads >= self.tp:
            n = self.kv_heads // self.tp
            return rank * n, (rank + 1) * n
        head = rank // (self.tp // self.kv_heads)  # replicated KV head (tp_size > KV heads)
        return head, head + 1

    def stage_layers(self, stage: int) -> range:
        base, extra = divmod(self.layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))


def _geometry(config: Any, tp: int, pp: int) -> Geometry:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_size = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    geo = Geometry(
        config.num_hidden_layers, config.hidden_size, heads, kv, head_size,
        config.intermediate_size, config.vocab_size, tp, pp,
    )  # fmt: skip
    if tp < 1 or pp < 1:
        raise ExportError(f"tp_size and pp_size must be >= 1, got {tp} and {pp}")
    if heads % tp:
        raise ExportError(
            f"tp_size {tp} does not divide the {heads} attention heads (TensorRT-LLM splits whole heads per "
            f"rank); use a tp_size that divides {heads}"
        )
    if kv % tp and tp % kv:
        raise ExportError(f"tp_size {tp} must divide the {kv} KV heads or be a multiple of them")
    if config.intermediate_size % tp:
        raise ExportError(f"tp_size {tp} does not divide intermediate_size {config.intermediate_size}")
    if pp > config.num_hidden_layers:
        raise ExportError(f"pp_size {pp} exceeds the {config.num_hidden_layers} decoder layers")
    return geo


def _rope(config: Any) -> tuple[float, dict | None]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta", 10000.0)
    legacy = getattr(config, "rope_scaling", None)
    rope_type = params.get("rope_type") or (legacy or {}).get("rope_type") or "default"
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in (legacy or params).items() if k not in ("rope_theta", "rope_type")}
    return float(theta), {"type": rope_type, **scaling}


# ------------------------------------------------------------------------------------------- the model


@dataclass
class DecoderLinears:
    attn: dict[str, LinearParts]  # q, k, v, dense
    mlp: dict[str, LinearParts]  # fc, gate, proj


def _collect(model: nn.Module) -> tuple[list[DecoderLinears], str | None, dict[str, Any]]:
    """LinearParts of every decoder linear, the single quant_algo they share, and config details."""
    layers = []
    kinds: dict[str, set[str]] = {}
    groups, pqs, zeros = set(), False, False
    for i, layer in enumerate(model.model.layers):
        attn = {k: linear_state(getattr(layer.self_attn, v)) for k, v in ATTN.items()}
        mlp = {k: linear_state(getattr(layer.mlp, v)) for k, v in MLP.items()}
        parts: dict[str, dict[str, LinearParts]] = {"attn": {}, "mlp": {}}
        for section, states in (("attn", attn), ("mlp", mlp)):
            for key, state in states.items():
                try:
                    kind = lay.classify(state)
                except ExportError as exc:
                    raise ExportError(f"layer {i} {section}.{key}: {exc}") from None
                p = lay.parts_of(state, kind)
                parts[section][key] = p
                kinds.setdefault(kind, set()).add(f"{i}.{key}")
                if kind in lay.GROUPWISE:
                    groups.add(p.group_size)
                    pqs |= p.pre_quant_scale is not None
                    zeros |= p.zeros is not None
        layers.append(DecoderLinears(parts["attn"], parts["mlp"]))
    if zeros:  # has_zero_point gives every group-wise layer a `zero`: symmetric ones get zero point 8 (= 0)
        for layer_parts in layers:
            for section in (layer_parts.attn, layer_parts.mlp):
                for key, p in section.items():
                    if p.kind in lay.GROUPWISE and p.zeros is None:
                        full = torch.full(p.scales.shape, 8, dtype=torch.uint8)  # type: ignore[union-attr]
                        section[key] = dataclasses.replace(p, zeros=full)
    quantized = sorted(k for k in kinds if k != "NO_QUANT")
    if len(quantized) > 1:
        raise ExportError(
            f"decoder linears use several TensorRT-LLM modes ({', '.join(quantized)}); a checkpoint has one "
            "quant_algo (mixed precision is not supported by this writer)"
        )
    if len(groups) > 1:
        raise ExportError(
            f"group-wise layers use several group sizes {sorted(groups)}; TensorRT-LLM takes one"
        )
    algo = quantized[0] if quantized else None
    details = {
        "group_size": groups.pop() if groups else None,
        "pre_quant_scale": pqs,
        "has_zero_point": zeros,
    }
    if algo is not None and "NO_QUANT" in kinds:
        details["dense"] = sorted(kinds["NO_QUANT"])
    if algo == lay.PLUGIN_W4A4:  # the plugin's attributes per checkpoint linear (LLM-FP4 picks per layer)
        details["plugin_layers"] = {}
        for i, layer_parts in enumerate(layers):
            modules = {"attention.qkv": layer_parts.attn["q"], "attention.dense": layer_parts.attn["dense"]}
            modules |= {f"mlp.{key}": layer_parts.mlp[key] for key in MLP}
            for module, p in modules.items():
                if p.kind == lay.PLUGIN_W4A4:  # (a layer left dense is a plain linear)
                    details["plugin_layers"][f"transformer.layers.{i}.{module}"] = _w4a4_attributes(p)
    return layers, algo, details


def _w4a4_attributes(parts: LinearParts) -> dict[str, int]:
    """`trtcompress::w4a4_fp4_gemm`'s attributes for one layer (its fused q/k/v share them)."""
    assert parts.fp_element is not None and parts.act_element is not None
    (w_exp, w_man), (a_exp, a_man) = parts.fp_element, parts.act_element
    return {"w_exp": w_exp, "w_man": w_man, "a_exp": a_exp, "a_man": a_man, "group_size": parts.group_size}


def _unit_prequant(parts: LinearParts, needed: bool) -> LinearParts:
    """A layer without a pre-quant scale in a checkpoint that has them gets ones (exact)."""
    if not needed or parts.kind not in lay.GROUPWISE or parts.pre_quant_scale is not None:
        return parts
    return dataclasses.replace(parts, pre_quant_scale=torch.ones(parts.shape[1], dtype=torch.float16))


# ------------------------------------------------------------------------------------------- sharding


def _qkv_shard(layer: DecoderLinears, geo: Geometry, rank: int) -> LinearParts:
    hd = geo.head_size
    q_heads = geo.heads // geo.tp
    q = layer.attn["q"].rows(rank * q_heads * hd, (rank + 1) * q_heads * hd)
    lo, hi = geo.kv_head_range(rank)
    k = layer.attn["k"].rows(lo * hd, hi * hd)
    v = layer.attn["v"].rows(lo * hd, hi * hd)
    return lay.concat_rows([q, k, v], "attention q/k/v")


def even_split(n: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s [start, stop) of `n` channels split over `tp` ranks."""
    size = n // tp
    return rank * size, (rank + 1) * size


def _emit_linear(
    out: dict[str, torch.Tensor], name: str, parts: LinearParts, full: tuple[int, int], column: bool,
    geo: Geometry, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Write one rank's shard; `full` = the layer's (out, in) over all ranks, for TensorRT-LLM's padding."""
    pad_to = None
    if parts.kind in lay.GROUPWISE:
        g, tp = parts.group_size, geo.tp
        out_pad, in_pad = lay.padded_features(full[0], g, tp), lay.padded_features(full[1], g, tp)
        pad_to = (out_pad // tp, in_pad) if column else (out_pad, in_pad // tp)
    else:
        lay.check_divisible(parts.kind, parts.shape[1], name)
    try:
        tensors = lay.emit(parts, dtype, pad_to)
    except ExportError as exc:
        raise ExportError(f"{name}: {exc}") from None
    out.update({f"{name}.{suffix}": t.contiguous().clone() for suffix, t in tensors.items()})  # own storage


def _rank_tensors(
    model: nn.Module, layers: list[DecoderLinears], geo: Geometry, tp_rank: int, pp_rank: int,
    details: dict[str, Any], options: TrtllmOptions,
) -> dict[str, torch.Tensor]:  # fmt: skip
    dtype = DTYPES[options.dtype]
    out: dict[str, torch.Tensor] = {}
    vocab_rows = -(-geo.vocab // geo.tp)  # ceil: TensorRT-LLM pads the vocabulary to a multiple of tp_size
    v0, v1 = tp_rank * vocab_rows, (tp_rank + 1) * vocab_rows

    def vocab_shard(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float()
        w = torch.nn.functional.pad(w, (0, 0, 0, vocab_rows * geo.tp - w.shape[0]))
        return w[v0:v1].to(dtype)

    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = vocab_shard(model.model.embed_tokens.weight)
    q_out = (geo.heads + 2 * geo.kv_per_rank * geo.tp) * geo.head_size
    kv_algo = KV_ALGOS.get(options.kv_cache or "")
    for local, index in enumerate(geo.stage_layers(pp_rank)):
        hf, parts = model.model.layers[index], layers[index]
        prefix = f"transformer.layers.{local}"
        out[f"{prefix}.input_layernorm.weight"] = hf.input_layernorm.weight.detach().to(dtype)
        out[f"{prefix}.post_layernorm.weight"] = hf.post_attention_layernorm.weight.detach().to(dtype)
        needs_pqs = details["pre_quant_scale"]
        qkv = _unit_prequant(_qkv_shard(parts, geo, tp_rank), needs_pqs)
        _emit_linear(out, f"{prefix}.attention.qkv", qkv, (q_out, geo.hidden), True, geo, dtype)
        c0, c1 = even_split(geo.heads * geo.head_size, geo.tp, tp_rank)
        dense = _unit_prequant(parts.attn["dense"].cols(c0, c1), needs_pqs)
        _emit_linear(out, f"{prefix}.attention.dense", dense, (geo.hidden, geo.heads * geo.head_size), False,
                     geo, dtype)  # fmt: skip
        r0, r1 = even_split(geo.intermediate, geo.tp, tp_rank)
        for key in ("fc", "gate"):
            shard = _unit_prequant(parts.mlp[key].rows(r0, r1), needs_pqs)
            _emit_linear(out, f"{prefix}.mlp.{key}", shard, (geo.intermediate, geo.hidden), True, geo, dtype)
        proj = _unit_prequant(parts.mlp["proj"].cols(r0, r1), needs_pqs)
        _emit_linear(out, f"{prefix}.mlp.proj", proj, (geo.hidden, geo.intermediate), False, geo, dtype)
        if kv_algo:
            scale = options.kv_cache_scales[index]  # type: ignore[index]
            out[f"{prefix}.attention.kv_cache_scaling_factor"] = torch.tensor([scale], dtype=torch.float32)
    if pp_rank == geo.pp - 1:
        out["transformer.ln_f.weight"] = model.model.norm.weight.detach().to(dtype)
        out["lm_head.weight"] = vocab_shard(linear_state(model.lm_head).weight())
    return out


# ---------------------------------------------------------------------------------------------- config


def _plugins(algo: str | None, options: TrtllmOptions, details: dict[str, Any]) -> dict[str, Any]:
    plugins: dict[str, Any] = {}
    if algo == lay.PLUGIN_W4A4:
        plugins[PLUGIN_GEMM] = {
            "layers": details["plugin_layers"],  # checkpoint linear -> the plugin's attributes
            "tensors": ["qweight", "scales", "act_scale", "act_shift"],
        }
    codec = options.kv_cache or ""
    if codec.startswith(("gear", "kivi")):
        plugins[PLUGIN_GEAR] = {"codec": codec}
    return plugins


def build_config(model: nn.Module, geo: Geometry, algo: str | None, details: dict[str, Any],
                 options: TrtllmOptions) -> dict[str, Any]:  # fmt: skip
    config = model.config
    theta, scaling = _rope(config)
    kv_algo = KV_ALGOS.get(options.kv_cache or "")
    quant: dict[str, Any] = {
        "quant_algo": None if algo == lay.PLUGIN_W4A4 else algo,
        "kv_cache_quant_algo": kv_algo,
    }
    if algo in lay.GROUPWISE:
        quant |= {
            "group_size": details["group_size"],
            "has_zero_point": details["has_zero_point"],
            "pre_quant_scale": details["pre_quant_scale"],
        }
    if quant["quant_algo"] is not None:
        excluded = ["lm_head"]
        for name in details.get("dense", []):
            layer, key = name.split(".")
            section = "attention" if key in ATTN else "mlp"
            excluded.append(f"transformer.layers.{layer}.{section}.{'qkv' if key in 'qkv' else key}")
        quant["exclude_modules"] = sorted(set(excluded))
    plugins = _plugins(algo, options, details)
    return {
        "producer": {"name": "trtcompress", "version": trtcompress.__version__},
        "architecture": ARCHITECTURES[config.model_type],
        "dtype": options.dtype,
        "logits_dtype": options.dtype,
        "num_hidden_layers": geo.layers,
        "num_attention_heads": geo.heads,
        "num_key_value_heads": geo.kv_heads,
        "hidden_size": geo.hidden,
        "norm_epsilon": float(config.rms_norm_eps),
        "vocab_size": geo.vocab,
        "max_position_embeddings": int(config.max_position_embeddings),
        "hidden_act": config.hidden_act,
        "use_parallel_embedding": True,
        "embedding_sharding_dim": 0,
        "head_size": geo.head_size,
        "intermediate_size": geo.intermediate,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": theta,
        "rotary_scaling": scaling,
        "share_embedding_table": False,
        "residual_mlp": False,
        "bias": False,
        "rotary_pct": 1.0,
        "rank": 0,
        "decoder": "llama",
        "rmsnorm": True,
        "lm_head_bias": False,
        "mapping": {"world_size": geo.tp * geo.pp, "tp_size": geo.tp, "pp_size": geo.pp},
        "quantization": quant,
        # Ignored by TensorRT-LLM (extra top-level keys become attributes); read by builders/engine.py.
        "trtcompress": {
            "plugins": plugins,
            "stock_trtllm_build": not plugins,
            "weight_layout": "modelopt",
            "groupwise_padding": "in/out features padded to max(64, group) * tp_size, per rank at the end",
        },
    }


# ------------------------------------------------------------------------------------------------ write


def _check_model(model: nn.Module, options: TrtllmOptions) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"the TensorRT-LLM writer handles LLaMA-family models ({', '.join(ARCHITECTURES)}), "
            f"got {model_type!r}"
        )
    biased = [k for k in ("attention_bias", "mlp_bias") if getattr(model.config, k, False)]
    if biased:
        raise ExportError(
            f"the model's config sets {' and '.join(f'{k}: true' for k in biased)}: linear biases are not "
            "supported by the TensorRT-LLM writer (export native or hf)"
        )
    if options.dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    kv_algo = KV_ALGOS.get(options.kv_cache or "")
    n = model.config.num_hidden_layers
    if kv_algo and (options.kv_cache_scales is None or len(options.kv_cache_scales) != n):
        raise ExportError(
            f"an {kv_algo} KV cache needs one calibrated scale per decoder layer ({n}); "
            "see checkpoints.trtllm.kv_cache_scales"
        )


def check_exportable(model: nn.Module, options: TrtllmOptions, config: Any = None) -> None:
    """The writer's checks of the model itself (architecture, biases, dtype, tp/pp geometry), which the
    build runs as soon as the model is loaded, before minutes of compression (without a KV codec: its
    calibrated scales come later and are checked when the checkpoint is written). `config`: the model's
    config as the compression will leave it (head counts and widths after structured pruning)."""
    _check_model(model, options)
    _geometry(config if config is not None else model.config, options.tp_size, options.pp_size)


def write_trtllm_checkpoint(
    model: nn.Module, out_dir: Path, options: TrtllmOptions | None = None
) -> dict[str, Any]:
    """Write `out_dir/config.json` and one `rank{N}.safetensors` per rank; returns the config."""
    options = options or TrtllmOptions()
    _check_model(model, options)
    geo = _geometry(model.config, options.tp_size, options.pp_size)
    layers, algo, details = _collect(model)
    if algo and details.get("dense") and geo.pp > 1:
        raise ExportError("partly excluded layers cannot be named per pipeline stage; use pp_size 1")
    config = build_config(model, geo, algo, details, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for pp_rank in range(geo.pp):
            for tp_rank in range(geo.tp):
                tensors = _rank_tensors(model, layers, geo, tp_rank, pp_rank, details, options)
                save_file(tensors, str(out_dir / f"rank{pp_rank * geo.tp + tp_rank}.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def kv_cache_scales(model: nn.Module, input_ids: torch.Tensor, algo: str) -> tuple[float, ...]:
    """Static per-layer KV-cache scales (TensorRT-LLM's `kv_cache_scaling_factor`) from calibration tokens.

    scale = max(|k|, |v|) / qmax (127 for INT8, 448 for FP8). Keys are measured before RoPE, so each
    rotated pair (i, i + d/2) contributes its norm: an upper bound of both entries after any rotation.
    """
    geo = _geometry(model.config, 1, 1)
    amax = [0.0] * geo.layers
    hooks = []

    def hook(index: int, is_key: bool):
        def fn(_module, _inputs, output):
            x = output.detach().float().reshape(*output.shape[:-1], -1, geo.head_size)
            if is_key:
                half = geo.head_size // 2
                x = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
            amax[index] = max(amax[index], float(x.abs().max()))

        return fn

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(hook(i, True)))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(hook(i, False)))
    try:
        with torch.no_grad():
            for row in input_ids:
                model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    qmax = KV_QMAX[algo]
    return tuple(max(a, 1e-6) / qmax for a in amax)
