"""Hugging Face quantized checkpoint in NVIDIA ModelOpt's unified layout (`hf_quant_config.json`).

The TensorRT-LLM PyTorch backend (LLM API, `trtllm-serve`) loads this layout; vLLM's ModelOpt loader takes
its FP8, NVFP4 and W4A16_NVFP4 checkpoints (not W4A16_AWQ: it is missing from vLLM's modelopt QUANT_ALGOS).
Transformers has no `modelopt` quantizer. The layout: Hugging Face tensor names, `config.json` with
`quantization_config {quant_method: modelopt, quant_algo, ignore}`, and
`hf_quant_config.json {producer, quantization {quant_algo, kv_cache_quant_algo, group_size,
has_zero_point, pre_quant_scale, exclude_modules}}`. Per quantized linear, as ModelOpt's
`export_hf_checkpoint` writes it:
- W4A16_AWQ: `weight` uint8 (out/2, in), signed int4 codes of output rows 2k / 2k+1 in the low / high
  nibble; `weight_scale` fp32 (out, in/group); `pre_quant_scale` (in,) in the model dtype on o_proj
  and down_proj; the pre-quant scales of q/k/v and gate/up are folded into the norm before them (they
  must agree);
- FP8: `weight` float8_e4m3fn; `weight_scale`, `input_scale` fp32 scalars;
- NVFP4: `weight` uint8 (out, in/2); `weight_scale` float8_e4m3fn (out, in/16); `weight_scale_2`,
  `input_scale` fp32 scalars; W4A16_NVFP4 (the `nvfp4` recipe: weight-only) the same without `input_scale`.
Partial quantization groups are refused here (these loaders do not pad; the trtllm export does), and so
are q/k/v or gate/up groups with quantized and dense members (both loaders fuse each group into one linear).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import trtcompress
from trtcompress.checkpoints.trtllm_layout import ExportError, classify, pack_int4_rows, parts_of
from trtcompress.compressed import fpgrid
from trtcompress.compressed.linear import linear_state

SUPPORTED = ("W4A16_AWQ", "FP8", "NVFP4", "W4A16_NVFP4")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FUSED = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip
OWN_PQS = ("self_attn.o_proj", "mlp.down_proj")
# TensorRT-LLM's PyTorch backend and vLLM load q/k/v (and gate/up) into one fused linear with one
# precision: vLLM refuses a partly quantized one ("Detected some but not all shards of ... are
# quantized"), TensorRT-LLM makes the whole fused linear dense when any member is excluded and then
# cannot load the packed members; ModelOpt's own exporter asserts one format per fused group.
_PARTLY_QUANTIZED = (
    "{where}: {quantized} quantized but {dense} dense; TensorRT-LLM and vLLM load them as one fused "
    "{fused} with one precision and cannot load this mix (ModelOpt's exporter refuses it too): "
    "quantize all of them or none (a pass's exclude should name the whole group), or export native"
)


def _linear_tensors(kind: str, parts, own_pqs: bool) -> dict[str, torch.Tensor]:
    codes, scales = parts.codes, parts.scales
    in_f = codes.shape[1]
    if kind != "FP8" and in_f % parts.group_size:  # AWQ groups and NVFP4 blocks alike (in/16 scales)
        raise ExportError(
            f"{in_f} input channels do not fill whole groups of {parts.group_size} (a partial last "
            "group); the HF layout's loaders do not pad: use a group size that divides the width "
            "(e.g. 64 for 576)"
        )
    if kind == "W4A16_AWQ":
        if parts.zeros is not None:  # ModelOpt's HF AWQ layout is symmetric: it has no zero-point tensor
            raise ExportError(
                "asymmetric int4 (zero points) has no ModelOpt HF layout (its W4A16_AWQ is symmetric): "
                "use a symmetric int4 recipe, or --export trtllm / native"
            )
        out = {"weight": pack_int4_rows(codes.to(torch.int16) - 8).view(torch.uint8),
               "weight_scale": scales.float()}  # fmt: skip
        if own_pqs:
            pqs = parts.pre_quant_scale
            out["pre_quant_scale"] = torch.ones(in_f) if pqs is None else pqs.float()  # -> export dtype
        return out
    if kind == "FP8":
        return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scales.float().amax().reshape(()),
                "input_scale": parts.act_scale.float().reshape(())}  # fmt: skip
    out = {  # NVFP4, W4A16_NVFP4 (weight-only: no input scale)
        "weight": (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(),
        "weight_scale": scales.view(torch.float8_e4m3fn),
        "weight_scale_2": parts.global_scale.float().reshape(()),
    }
    if kind == "NVFP4":
        out["input_scale"] = (parts.act_scale.float() / fpgrid.E4M3_MAX).reshape(())
    return out


def legacy_rope_fields(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a `to_dict()`) with the rotary settings also under transformers 4's names, `rope_theta` and
    `rope_scaling`: transformers 5 writes only `rope_parameters`, which transformers 4 ignores, so the
    loaders of this layout that run on it (TensorRT-LLM 1.2's LLM API pins 4.57) read theta 10000 and no
    scaling, silently: a Llama-3 (theta 500000, llama3 scaling) or SmolLM2 (theta 100000) became
    another model. transformers 5 reads the same values from either spelling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # one setting for every layer
        if config.get("rope_theta") is None:
            config["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return config


def quantization_config(algo: str | None, quant: dict[str, Any], producer: dict[str, Any]) -> dict[str, Any]:
    """config.json's `quantization_config`, as ModelOpt's `convert_hf_quant_config_format` writes it.

    FP8 and NVFP4 also get a compressed-tensors `config_groups` entry (what vLLM reads)."""
    out: dict[str, Any] = {}
    if algo in ("FP8", "NVFP4", "W4A16_NVFP4"):
        bits = 8 if algo == "FP8" else 4
        group = {} if algo == "FP8" else {"group_size": quant.get("group_size", 16)}
        spec = {"dynamic": False, "num_bits": bits, "type": "float", **group}
        acts = {} if algo == "W4A16_NVFP4" else {"input_activations": dict(spec)}
        out["config_groups"] = {"group_0": {**acts, "weights": dict(spec), "targets": ["Linear"]}}
    out["ignore"] = quant.get("exclude_modules") or []
    if algo:
        out["quant_algo"] = algo
    if quant.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = producer
    out["quant_method"] = "modelopt"
    return out


def _kv_algo(model: nn.Module, kv_cache: str | None, scales: tuple[float, ...] | None) -> str | None:
    """FP8 KV cache -> "FP8" (per-layer k_scale / v_scale); other compressed caches have no HF form."""
    if kv_cache in (None, "fp16"):
        return None
    if kv_cache != "fp8":
        raise ExportError(
            f"the HF checkpoint layout (ModelOpt / TensorRT-LLM PyTorch backend / vLLM) carries FP8 "
            f"KV-cache scales only, not a {kv_cache} KV cache: use kv_cache.codec fp8, or export trtllm "
            "(INT8 KV, or a plugin entry for GEAR/KIVI), or serve natively"
        )
    n = model.config.num_hidden_layers
    if scales is None or len(scales) != n:
        raise ExportError(f"an FP8 KV cache needs one calibrated scale per decoder layer ({n})")
    return "FP8"


def _write_bias(state, name: str, tensors: dict, torch_dtype) -> None:
    """A linear's bias (Qwen2's q/k/v projections have them) in the model's dtype, quantized or not."""
    if state.bias is not None:
        tensors[f"{name}.bias"] = state.bias.detach().to(torch_dtype).contiguous()


def _quantized_kind(state, name: str, tensors: dict, excluded: list, torch_dtype) -> str | None:
    """The HF quantization kind of a linear; a dense one is written as is and listed as excluded (None)."""
    kind = classify(state, target="hf")
    if kind == "NO_QUANT":
        tensors[f"{name}.weight"] = state.weight().to(torch_dtype)
        excluded.append(name)
        return None
    if kind not in SUPPORTED:
        raise ExportError(f"{name}: {kind} has no ModelOpt HF layout here ({', '.join(SUPPORTED)})")
    return kind


def write_hf_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: Path,
    dtype: str = "float16",
    kv_cache: str | None = None,
    kv_cache_scales: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Write the checkpoint into `out_dir`; returns the `quantization` section of hf_quant_config.json.

    With `kv_cache="fp8"` and one calibrated scale per layer (checkpoints.trtllm.kv_cache_scales), each
    attention gets ModelOpt's `k_proj.k_scale` / `v_proj.v_scale` (fp32 scalars, amax / 448)."""
    torch_dtype = DTYPES[dtype]
    kv_algo = _kv_algo(model, kv_cache, kv_cache_scales)
    tensors: dict[str, torch.Tensor] = {}
    kinds: set[str] = set()
    excluded = ["lm_head", "model.embed_tokens"]
    groups: set[int] = set()  # group sizes of the W4A16_AWQ layers: the config has one
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}"
            for norm_name, members in FUSED.items():
                norm = getattr(layer, norm_name).weight.detach().float()
                pqs_seen, globals_seen, dense = [], [], []
                for name in members:
                    state = linear_state(layer.get_submodule(name))
                    _write_bias(state, f"{prefix}.{name}", tensors, torch_dtype)
                    kind = _quantized_kind(state, f"{prefix}.{name}", tensors, excluded, torch_dtype)
                    if kind is None:
                        dense.append(name)
                        continue
                    parts = parts_of(state, kind)
                    kinds.add(kind)
                    if kind == "W4A16_AWQ":
                        groups.add(parts.group_size)
                    pqs_seen.append(parts.pre_quant_scale)
                    if parts.global_scale is not None:
                        globals_seen.append(parts.global_scale)
                    for suffix, t in _linear_tensors(kind, parts, own_pqs=False).items():
                        tensors[f"{prefix}.{name}.{suffix}"] = t.contiguous()
                if dense and len(dense) < len(members):
                    quantized = ", ".join(n for n in members if n not in dense)
                    fused = "qkv_proj" if norm_name == "input_layernorm" else "gate_up_proj"
                    raise ExportError(
                        _PARTLY_QUANTIZED.format(
                            where=prefix, quantized=quantized, dense=", ".join(dense), fused=fused
                        )
                    )
                if any(not torch.equal(g, globals_seen[0]) for g in globals_seen):
                    raise ExportError(  # one fused GEMM, one weight_scale_2 (TensorRT-LLM asserts it)
                        f"{prefix}: the NVFP4 layers after {norm_name} have different tensor scales "
                        "(weight_scale_2); rebuild the artifact (the nvfp4 pass now shares one)"
                    )
                if any(p is not None for p in pqs_seen):
                    first = pqs_seen[0]
                    if any(p is None or not torch.equal(p, first) for p in pqs_seen):
                        raise ExportError(
                            f"{prefix}: layers after {norm_name} have different pre-quant scales"
                        )
                    norm = norm * first.float()  # x·diag(s) folded into the norm that produces x
                tensors[f"{prefix}.{norm_name}.weight"] = norm.to(torch_dtype)
            for name in OWN_PQS:
                state = linear_state(layer.get_submodule(name))
                _write_bias(state, f"{prefix}.{name}", tensors, torch_dtype)
                kind = _quantized_kind(state, f"{prefix}.{name}", tensors, excluded, torch_dtype)
                if kind is None:
                    continue
                kinds.add(kind)
                parts = parts_of(state, kind)
                if kind == "W4A16_AWQ":
                    groups.add(parts.group_size)
                for suffix, t in _linear_tensors(kind, parts, own_pqs=True).items():
                    if suffix == "pre_quant_scale":  # ModelOpt writes it in the model's dtype
                        t = t.to(torch_dtype)
                    tensors[f"{prefix}.{name}.{suffix}"] = t.contiguous()
        for i in range(model.config.num_hidden_layers if kv_algo else 0):
            scale = torch.tensor(float(kv_cache_scales[i]), dtype=torch.float32)  # type: ignore[index]
            tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"] = scale
            tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"] = scale.clone()
        tensors["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().to(torch_dtype)
        tensors["model.norm.weight"] = model.model.norm.weight.detach().to(torch_dtype)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        lm_head = linear_state(model.lm_head).weight().to(torch_dtype)
        if not (tied and torch.equal(lm_head, tensors["model.embed_tokens.weight"])):
            tensors["lm_head.weight"] = lm_head
            tied = False
    if len(kinds) > 1:
        raise ExportError(f"the HF layout takes one quant_algo, the model has {', '.join(sorted(kinds))}")
    if len(groups) > 1:
        raise ExportError(
            f"the int4 layers use several group sizes {sorted(groups)}; the HF layout's config has one "
            "group_size: quantize every layer with the same group size"
        )
    algo = kinds.pop() if kinds else None
    quant: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo}
    if algo == "W4A16_AWQ":
        quant |= {"group_size": groups.pop(), "has_zero_point": False, "pre_quant_scale": True}
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        quant |= {"group_size": 16}
    quant["exclude_modules"] = excluded
    producer = {"name": "trtcompress", "version": trtcompress.__version__}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    config = legacy_rope_fields(model.config.to_dict())
    config["tie_word_embeddings"] = tied
    config["torch_dtype"] = dtype
    config.pop("dtype", None)
    if algo is not None or kv_algo is not None:
        config["quantization_config"] = quantization_config(algo, quant, producer)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    (out_dir / "hf_quant_config.json").write_text(
        json.dumps({"producer": producer, "quantization": quant}, indent=4) + "\n", encoding="utf-8"
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return quant
