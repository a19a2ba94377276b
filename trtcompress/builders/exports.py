"""Write the recipe's extra artifact formats next to the native artifact: trtllm, hf, engine.

Called by the build pipeline inside its atomic directory, after the native weights, so a failed export
leaves no artifact. The exporters read the model's CompressedLinearStates; nothing is re-quantized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from trtcompress.errors import RecipeError
from trtcompress.recipe import Recipe, with_overrides

KV_STATIC = {"int8": "INT8", "fp8": "FP8"}
LOWRANK_PASSES = {"eora", "kd"}  # they leave low-rank factors, which neither checkpoint layout has
W4A4_PASSES = {"llmfp4", "minmax-fp4"}  # plugin entries: no stock trtllm-build engine
# W4A16_MXFP4: TensorRT-LLM's engine path has no MXFP4 linear (see engine.ENGINE_UNSUPPORTED_ALGOS)
NO_ENGINE_PASSES = {"mxfp4"}
FP_QUANTIZER_PASSES = {"nvfp4", "mxfp4", "minmax-fp4", "llmfp4"}  # integer quantizers have a `format`
HF_UNSUPPORTED_FP_PASSES = {"mxfp4", "minmax-fp4", "llmfp4"}
KV_CALIBRATION_SAMPLES = 16  # sequences of calibration.seq_len tokens for the static KV-cache scales


def check_recipe(recipe: Recipe) -> None:
    """Refuse, before any work, export requests the recipe's passes cannot satisfy (the exporters check
    every layer again; this catches the clear-cut cases before minutes of compression)."""

    methods = {p.method for p in recipe.passes}
    formats = set(recipe.export.formats) - {"native"}
    codec = recipe.kv_cache.codec or "fp16"
    if formats and methods & LOWRANK_PASSES:
        raise RecipeError(
            f"export {', '.join(sorted(formats))}: the {', '.join(sorted(methods & LOWRANK_PASSES))} pass "
            "leaves low-rank correction factors, which TensorRT-LLM and HF quantized checkpoints cannot "
            "hold; export native only (export.formats: [native])"
        )
    if "trtllm" in formats and "nvfp4" in methods:
        raise RecipeError(
            "export trtllm: the nvfp4 pass is weight-only, and TensorRT-LLM's NVFP4 also quantizes "
            "activations; export hf (W4A16_NVFP4) or use the mxfp4 recipe (TensorRT-LLM W4A16_MXFP4)"
        )
    per_linear = [  # (one searched format: every linear has it, shared or not)
        i
        for i, p in enumerate(recipe.passes)
        if p.method == "llmfp4" and not p.shared_weight_format and len(set(p.formats)) > 1
    ]
    if "trtllm" in formats and per_linear:
        raise RecipeError(
            f"export trtllm: passes.{per_linear[0]} (llmfp4) picks a weight format per linear, and "
            "TensorRT-LLM runs q/k/v as one GEMM with one format; set "
            f"passes.{per_linear[0]}.shared_weight_format: true (on SmolLM2: ppl 80.8 instead of 77.2)"
        )
    _check_weight_formats(recipe, formats)
    if "hf" in formats and codec not in ("fp16", "fp8"):
        raise RecipeError(
            f"export hf: the HF layout carries FP8 KV-cache scales only, not kv_cache.codec {codec}"
        )
    if recipe.export.engine.enabled and (methods & W4A4_PASSES or codec.startswith(("gear", "kivi"))):
        what = sorted(methods & W4A4_PASSES) + ([codec] if codec.startswith(("gear", "kivi")) else [])
        raise RecipeError(
            f"--engine: {', '.join(what)} need the trtcompress TensorRT plugins, which stock trtllm-build "
            "cannot insert into TensorRT-LLM's LLaMA graph; export trtllm without --engine, or serve natively"
        )
    if recipe.export.engine.enabled:
        _check_engine(recipe, methods)


def _weight_quantizers(recipe: Recipe) -> list[tuple[int, Any]]:
    """(index, config) of every weight-quantizing pass."""
    return [
        (i, p)
        for i, p in enumerate(recipe.passes)
        if p.method in FP_QUANTIZER_PASSES or getattr(p, "format", None) is not None
    ]


def _final_quantizers(recipe: Recipe) -> list[tuple[int, Any]]:
    """(index, config) of the last weight-quantizing pass, if any. Only it is checked here: a later
    quantizer may replace an earlier one's layers (the exporters check every layer anyway)."""
    return _weight_quantizers(recipe)[-1:]


def _check_weight_formats(recipe: Recipe, formats: set[str]) -> None:
    """Weight formats that neither checkpoint layout holds (int3, asymmetric per-channel, weight-only
    per-channel FP4 for trtllm; anything but symmetric group-wise int4, NVFP4 and FP8 for hf)."""
    from trtcompress.checkpoints.trtllm_layout import ExportError, int_weight_kind

    for i, p in _final_quantizers(recipe):
        fmt = getattr(p, "format", None)
        where = f"passes.{i} ({p.method})"
        if fmt is not None:
            try:
                kind = int_weight_kind(fmt)
            except ExportError as exc:
                if "trtllm" in formats:
                    raise RecipeError(f"export trtllm: {where}: {exc}") from None
                kind = None
            if "hf" in formats and (kind != "W4A16_AWQ" or not fmt.symmetric):
                raise RecipeError(
                    f"export hf: {where} writes {fmt.name}; the ModelOpt HF layout holds integer weights "
                    "only as symmetric group-wise int4 (W4A16_AWQ): use bits 4, a group size and "
                    "symmetric: true, or --export trtllm / native"
                )
        elif p.method == "llmfp4" and not p.quantize_activations and "trtllm" in formats:
            raise RecipeError(
                f"export trtllm: {where} with quantize_activations: false writes weight-only FP4 with "
                "per-channel scales, which has no TensorRT-LLM checkpoint layout; export native, or use "
                "the mxfp4 recipe (W4A16_MXFP4)"
            )
        elif p.method in HF_UNSUPPORTED_FP_PASSES and "hf" in formats:
            raise RecipeError(
                f"export hf: {where} writes a format the ModelOpt HF layout does not hold (it has "
                "W4A16_AWQ, FP8, NVFP4 and W4A16_NVFP4); export trtllm or native"
            )


def _check_engine(recipe: Recipe, methods: set[str]) -> None:
    """`--engine` requests trtllm-build would refuse only after the whole compression."""
    from trtcompress.builders.engine import ATTENTION_PLUGIN_CHOICES, GEMM_PLUGIN_CHOICES, TRTLLM_VERSION

    if methods & NO_ENGINE_PASSES:
        raise RecipeError(
            f"--engine: the {', '.join(sorted(methods & NO_ENGINE_PASSES))} pass writes W4A16_MXFP4, which "
            f"TensorRT-LLM {TRTLLM_VERSION} implements only in its PyTorch backend's fused MoE, not in "
            "trtllm-build's TensorRT path; export trtllm without --engine, or serve natively"
        )
    engine = recipe.export.engine
    for flag, value, choices in (
        ("gemm_plugin", engine.gemm_plugin, GEMM_PLUGIN_CHOICES),
        ("gpt_attention_plugin", engine.gpt_attention_plugin, ATTENTION_PLUGIN_CHOICES),
    ):
        if value not in choices:
            raise RecipeError(
                f"export.engine.{flag} {value!r}: trtllm-build {TRTLLM_VERSION} takes one of "
                f"{', '.join(choices)}"
            )


def resolve_export_dtype(recipe: Recipe, model_dir: Path) -> Recipe:
    """`export.dtype: auto` made concrete from the source checkpoint's config: a bfloat16 model stays
    bfloat16 (fp16 tops out at 65504 where bf16 reaches 3e38: its activations may overflow fp16; a fixed
    float16 default exported Llama-3's bf16 weights as fp16), anything else (fp32, fp16, the packaged
    GGUF's float32) is float16."""
    if recipe.export.dtype != "auto":
        return recipe
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (the loader read it already: not expected)
        config = {}
    source = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return with_overrides(recipe, [("export.dtype", "bfloat16" if source == "bfloat16" else "float16")])


def export_dtype(recipe: Recipe) -> str:
    """The dense dtype the writers use: `export.dtype`, float16 where `auto` was not resolved from a source
    checkpoint (a model handed to the writers directly, in memory)."""
    return "float16" if recipe.export.dtype == "auto" else recipe.export.dtype


def check_model(recipe: Recipe, model: nn.Module) -> None:
    """Refuse, once the model is loaded and before minutes of compression and evaluation, export requests
    its config rules out: the trtllm writer's architecture, bias and tp/pp geometry checks (`--tp-size 3` on
    a model with 4 heads failed only when the checkpoint was written, after the whole build), and
    quantization groups the layouts cannot hold (see `_check_group_widths`)."""
    formats = set(recipe.export.formats)
    if "trtllm" in formats:
        from trtcompress.checkpoints.trtllm import TrtllmOptions, check_exportable

        cfg = recipe.export
        options = TrtllmOptions(tp_size=cfg.tp_size, pp_size=cfg.pp_size, dtype=export_dtype(recipe))
        check_exportable(model, options, pruned_config(recipe, model))
        _check_attention_window(recipe, model)
    _check_group_widths(recipe, model, formats)
    _check_fused_groups(recipe, model, formats)
    _check_requantized_shards(recipe, model, formats)


def _check_attention_window(recipe: Recipe, model: nn.Module) -> None:
    """A sliding window (Mistral's `sliding_window`) shorter than the engine's sequences: the TensorRT-LLM
    checkpoint has no field for it (upstream's converter drops it too) and TensorRT-LLM takes the window
    only at run time (`max_attention_window_size`), so an engine of longer sequences attends to every
    token, silently another model past the window."""

    window = getattr(model.config, "sliding_window", None)
    limit = recipe.export.engine.max_seq_len
    if window and window < limit:
        raise RecipeError(
            f"export trtllm: the model attends within a sliding window of {window} tokens, which a "
            "TensorRT-LLM checkpoint cannot carry (TensorRT-LLM takes it at run time only, as "
            f"max_attention_window_size): an engine of export.engine.max_seq_len {limit} (the --engine "
            "build's, or one you build from the checkpoint with trtllm-build's --max_seq_len) would attend "
            f"beyond it; set export.engine.max_seq_len <= {window}, or export native / hf"
        )


def _decoder_linears(model: nn.Module) -> dict[nn.Module, bool]:
    """The decoder linears both writers export -> whether trtllm splits their inputs across ranks
    (o_proj and down_proj are row-parallel)."""
    roles = {}
    for layer in model.model.layers:
        for sub, module in layer.named_modules():
            leaf = sub.rsplit(".", 1)[-1]
            if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"):
                roles[module] = leaf in ("o_proj", "down_proj")
    return roles


def _group_size(config: Any) -> int:
    """Input channels per scale of a weight-quantizing pass's format (0: per channel)."""
    from trtcompress.compressed.formats import MXFP4, NVFP4

    fmt = getattr(config, "format", None)
    if fmt is not None:
        return fmt.group_size
    return {"nvfp4": NVFP4.group_size, "mxfp4": MXFP4.group_size}.get(config.method, 0)


def _check_group_widths(recipe: Recipe, model: nn.Module, formats: set[str]) -> None:
    """Group-wise weights whose groups a layout cannot hold, from the model's widths: the HF layout's
    loaders do not pad a partial last group (a width the group size does not divide), and a trtllm
    tensor-parallel split of o_proj / down_proj inputs must fall on group boundaries. Checked where the
    last weight quantizer is the last pass, so its format is the one the writers see on every layer it
    selects, on the widths the layers will have then (`_pruned_inputs`: structured pruning before it)."""
    from trtcompress.checkpoints import trtllm_layout as lay
    from trtcompress.checkpoints.trtllm import even_split
    from trtcompress.passes.targets import select_linears

    tp = recipe.export.tp_size if "trtllm" in formats else 1
    final = _final_quantizers(recipe)
    if not final or final[0][0] != len(recipe.passes) - 1:
        return
    index, config = final[0]
    group = _group_size(config)
    mxfp4_trtllm = "trtllm" in formats and config.method == "mxfp4"
    if not group or not ("hf" in formats or tp > 1 or mxfp4_trtllm):
        return
    roles = _decoder_linears(model)
    pruned = _pruned_inputs(recipe, model)
    where = f"passes.{index} ({config.method})"
    for name, module in select_linears(model, config.targets, config.exclude):
        if module not in roles:
            continue
        width = pruned.get(name.rsplit(".", 1)[-1], module.in_features)
        if "hf" in formats and width % group:
            raise RecipeError(
                f"export hf: {where} quantizes {name} ({width} input channels) in groups of {group}, a "
                "partial last group, and the HF layout's loaders do not pad; use a group size that "
                f"divides the model's widths, or --export trtllm / native"
            )
        try:  # the writer's own checks, on the shards it would cut (row-parallel inputs split evenly)
            if roles[module] and tp > 1:
                for rank in range(tp):
                    lay.check_group_split(width, group, *even_split(width, tp, rank))
            if mxfp4_trtllm:
                lay.check_divisible("W4A16_MXFP4", width // tp if roles[module] else width, name)
        except lay.ExportError as exc:
            raise RecipeError(f"export trtllm: tp_size {tp}, {name} ({where}): {exc}") from None


def pruned_config(recipe: Recipe, model: nn.Module) -> Any:
    """The model's config as the recipe's structured pruning will leave it (head counts and FFN width,
    every layer alike; the model's own config without such a pass), for the checks that run before the
    compression: `structured` (head_ratio 0.5) with `--tp-size 4` on a 4-head model passed them and was
    refused by the writer once the model was compressed."""
    import copy

    from trtcompress.passes.structured import pruned_widths

    config = model.config
    passes = [p for p in recipe.passes if p.method == "structured"]
    if not passes:
        return config
    config = copy.copy(config)
    config.head_dim = model.model.layers[0].self_attn.head_dim  # (hidden / heads no longer gives it)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    ffn = config.intermediate_size
    for p in passes:
        heads, kv, ffn = pruned_widths(p, heads, kv, ffn)
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = heads, kv, ffn
    return config


def _pruned_inputs(recipe: Recipe, model: nn.Module) -> dict[str, int]:
    """Input widths of o_proj / down_proj after the recipe's structured pruning, or nothing without it:
    `structured` + `mxfp4` with `head_ratio` 0.5 left o_proj 48 inputs on the tiny model, which trtllm's
    MXFP4 blocks of 32 cannot hold, refused only once the model was compressed."""
    if not any(p.method == "structured" for p in recipe.passes):
        return {}
    config = pruned_config(recipe, model)
    return {"o_proj": config.num_attention_heads * config.head_dim, "down_proj": config.intermediate_size}


def _check_fused_groups(recipe: Recipe, model: nn.Module, formats: set[str]) -> None:
    """Linears the loaders fuse into one GEMM of one precision (q/k/v; gate/up too for hf: TensorRT-LLM's
    PyTorch backend and vLLM) that the recipe's weight quantizers select only in part (an `exclude` naming
    v_proj): both writers refuse the compressed model, so refuse it before the compression."""
    from trtcompress.models.layout import LLAMA_GROUPS, layer_prefix
    from trtcompress.passes.targets import select_linears

    if not {"hf", "trtllm"} & formats:
        return
    fused = {"attn_in"} | ({"mlp_in"} if "hf" in formats else set())
    quantizers = _weight_quantizers(recipe)
    selected: set[str] = set()
    for _, config in quantizers:
        selected |= {name for name, _ in select_linears(model, config.targets, config.exclude)}
    if not selected:
        return
    for index in range(len(model.model.layers)):
        for group in LLAMA_GROUPS:
            names = [layer_prefix(index) + rel for rel in group.linears]
            chosen = [name for name in names if name in selected]
            if group.name in fused and chosen and len(chosen) < len(names):
                dense = ", ".join(name.rsplit(".", 1)[-1] for name in names if name not in chosen)
                where = ", ".join(f"passes.{i} ({p.method})" for i, p in quantizers)
                what = "export " + (
                    "hf" if group.name == "mlp_in" else "/".join(sorted({"hf", "trtllm"} & formats))
                )
                raise RecipeError(
                    f"{what}: {where} quantize {', '.join(chosen)} but not {dense}; TensorRT-LLM "
                    f"and vLLM load {'/'.join(n.rsplit('.', 1)[-1] for n in names)} as one fused "
                    "linear of one precision: exclude the whole group or none of it, or export native"
                )


def _check_requantized_shards(recipe: Recipe, model: nn.Module, formats: set[str]) -> None:
    """W8A16 / W4A16 (symmetric per-channel int8 / int4) with tp_size > 1: TensorRT-LLM re-quantizes each
    rank's part of a row-parallel row on its own and gets the recipe's codes only where that part reaches
    the row's largest code, a property of the weights rather than the config. When the recipe is one
    data-free gsq pass, its codes are known before the build: the writer's check runs here on o_proj and
    down_proj (round to nearest, one layer at a time), instead of after the compression and evaluation."""
    import torch

    from trtcompress.checkpoints import trtllm_layout as lay
    from trtcompress.checkpoints.trtllm import DTYPES, even_split
    from trtcompress.compressed.linear import linear_state
    from trtcompress.passes import build_pass
    from trtcompress.passes.targets import select_linears

    tp = recipe.export.tp_size
    if "trtllm" not in formats or tp < 2 or [p.method for p in recipe.passes] != ["gsq"]:
        return
    config = recipe.passes[0]
    if config.group_size or export_dtype(recipe) not in DTYPES:
        return
    try:
        kind = lay.int_weight_kind(config.format)
    except lay.ExportError:
        return  # (check_recipe refuses it)
    gsq = build_pass(config)
    roles = _decoder_linears(model)
    with torch.no_grad():
        for name, module in select_linears(model, config.targets, config.exclude):
            if not roles.get(module):
                continue
            state = linear_state(module)
            if not torch.isfinite(state.weight()).all():
                return  # the pass itself refuses it, naming the layer
            parts = lay.parts_of(gsq.compress_linear(name, state), kind)
            for rank in range(tp):
                try:
                    lay.emit(parts.cols(*even_split(parts.shape[1], tp, rank)), DTYPES[export_dtype(recipe)])
                except lay.ExportError as exc:
                    where = f"passes.0 (gsq) on {name}, tp rank {rank}"
                    raise RecipeError(f"export trtllm: {where}: {exc}") from None


def calibrates_kv_scales(recipe: Recipe) -> bool:
    """Whether the build calibrates static KV-cache scales (an int8 / fp8 codec with the trtllm or hf
    export), on `calibration.num_samples` (at most 16) x `calibration.seq_len` tokens."""
    return recipe.kv_cache.codec in KV_STATIC and bool({"trtllm", "hf"} & set(recipe.export.formats))


def _kv_scales(model: nn.Module, tokenizer: Any, recipe: Recipe, log) -> tuple[float, ...] | None:
    codec = recipe.kv_cache.codec
    if not calibrates_kv_scales(recipe):
        return None
    from trtcompress.checkpoints.trtllm import kv_cache_scales
    from trtcompress.models.calibration import calibration_tokens

    cal = recipe.calibration
    n = min(cal.num_samples, KV_CALIBRATION_SAMPLES)
    log(f"calibrating {KV_STATIC[codec]} KV-cache scales on {n} x {cal.seq_len} tokens")
    tokens = calibration_tokens(tokenizer, n, cal.seq_len, skip_tokens=recipe.eval.ppl_tokens)
    return kv_cache_scales(model, tokens, KV_STATIC[codec])


def write_checkpoints(
    model: nn.Module, tokenizer: Any, recipe: Recipe, out: Path, log=lambda m: None
) -> dict:
    """Write the trtllm and hf checkpoints `recipe.export` asks for under `out`; returns their manifest
    `exports` entries. The build runs this before its evaluation, so that a layout the writers refuse
    costs no evaluation."""
    exports: dict[str, Any] = {}
    cfg = recipe.export
    kv_scales = _kv_scales(model, tokenizer, recipe, log) if {"trtllm", "hf"} & set(cfg.formats) else None
    if "trtllm" in cfg.formats:
        from trtcompress.checkpoints.trtllm import TrtllmOptions, write_trtllm_checkpoint

        options = TrtllmOptions(
            tp_size=cfg.tp_size, pp_size=cfg.pp_size, dtype=export_dtype(recipe),
            kv_cache=recipe.kv_cache.codec, kv_cache_scales=kv_scales,
        )  # fmt: skip
        log(f"writing the TensorRT-LLM checkpoint (tp {cfg.tp_size}, pp {cfg.pp_size})")
        config = write_trtllm_checkpoint(model, out / "trtllm", options)
        exports["trtllm"] = {
            "dir": "trtllm",
            "quantization": config["quantization"],
            "mapping": config["mapping"],
            "plugins": sorted(config["trtcompress"]["plugins"]),
        }
    if "hf" in cfg.formats:
        from trtcompress.checkpoints.hf_quant import write_hf_checkpoint

        log("writing the Hugging Face quantized checkpoint (ModelOpt hf_quant_config.json layout)")
        quant = write_hf_checkpoint(
            model,
            tokenizer,
            out / "hf",
            dtype=export_dtype(recipe),
            kv_cache=recipe.kv_cache.codec,
            kv_cache_scales=kv_scales,
        )
        exports["hf"] = {"dir": "hf", **quant}
    return exports


def export_formats(
    model: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    out: Path,
    log=lambda m: None,
    final: Path | None = None,
    checkpoints: dict | None = None,
) -> dict:
    """Write each non-native format of `recipe.export` under `out`; returns the manifest's `exports` entry.

    `out` is the build's temporary directory, `final` the artifact's path after the atomic rename (what
    the generated Triton repository refers to); `checkpoints`: the entries of the checkpoints already in
    `out` (written by `write_checkpoints`), else they are written now."""
    exports = (
        dict(checkpoints)
        if checkpoints is not None
        else write_checkpoints(model, tokenizer, recipe, out, log)
    )
    cfg = recipe.export
    if cfg.engine.enabled:
        from trtcompress.builders.engine import build_engine, fill_triton_repository

        exports["engine"] = build_engine(out / "trtllm", out / "engine", cfg.engine, log=log)
        fill_triton_repository(out, Path(final or out).resolve(), recipe.deploy, log=log, engine=cfg.engine)
        exports["engine"]["triton_repository"] = "triton/trtllm"
    return exports
