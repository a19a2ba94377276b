"""Import a model quantized by NVIDIA ModelOpt (`mtq.quantize`) into CompressedLinearStates.

This is how trtcompress takes over ModelOpt's quantization decisions (its AWQ pre-quant scales, block
scales, FP8 scales) without re-deriving them, and how the conformance tests give our checkpoint writer
exactly the quantization ModelOpt's own exporter writes. The codes are what ModelOpt's exporter computes
(its own `to_quantized_weight`), with the scales its export would use for the fused q|k|v GEMM:
- INT4_AWQ: q/k/v are re-smoothed to one pre-quant scale first (ModelOpt's `preprocess_linear_fusion`,
  which its exporter also runs), then block scales amax/7 and codes round(w/s) in [-8, 7];
- FP8: one weight scale and one activation scale per fused q|k|v and per gate|up (the max, as ModelOpt).
Scales are stored in fp16 (the state's convention), so dequantized values match ModelOpt's within fp16
rounding. Needs `pip install nvidia-modelopt` (the `compare` extra); runs on CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from trtcompress.checkpoints.trtllm_layout import ExportError, unpack_int4_rows
from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import FpFormat, IntFormat
from trtcompress.compressed.linear import CompressedLinear, set_module
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.errors import MissingDependencyError

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # one input: fused into one GEMM
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")  # likewise
LINEARS = (*QKV, "self_attn.o_proj", *GATE_UP, "mlp.down_proj")


def _modelopt():
    try:
        from modelopt.torch.export import quant_utils
    except ImportError:
        raise MissingDependencyError(
            "importing a ModelOpt-quantized model needs `pip install nvidia-modelopt==0.47.0 requests` "
            "(the `compare` extra)"
        ) from None
    return quant_utils


def _int4_awq(module: nn.Module, qu) -> CompressedLinearState:
    block = qu.get_weight_block_size(module)
    scale = qu.get_weight_scaling_factor(module).float()
    packed = qu.to_quantized_weight(module.weight.detach(), scale, qu.QUANTIZATION_INT4_AWQ, None, block)
    codes = (unpack_int4_rows(packed.view(torch.int8)).to(torch.int16) + 8).to(torch.uint8)
    weight = QuantizedWeight.from_codes(codes, scale.half(), None, IntFormat(4, block, True))
    pqs = qu.get_prequant_scaling_factor(module)
    out_f, in_f = module.weight.shape
    return CompressedLinearState(
        out_f, in_f, quantized=weight, pre_quant_scale=None if pqs is None else pqs.detach().half()
    )


def _fp8(module: nn.Module, qu, weight_scale: torch.Tensor, act_scale: torch.Tensor) -> CompressedLinearState:
    fp8 = qu.to_quantized_weight(module.weight.detach(), weight_scale, qu.QUANTIZATION_FP8)
    out_f, in_f = module.weight.shape
    scales = torch.full((out_f, 1), float(weight_scale), dtype=torch.float16)
    weight = QuantizedWeight.from_codes(fp8.view(torch.uint8), scales, None, FpFormat(4, 3, 0))
    # FP8 activations run as float8_e4m3fn: saturate at its 448, not the no-NaN grid's 480 (NaN there)
    act = ActQuantizer(4, 3, act_scale.float().reshape(1).clone(), saturate=fpgrid.E4M3_MAX)
    return CompressedLinearState(out_f, in_f, quantized=weight, act_quant=act)


def import_modelopt_model(model: nn.Module, target: str = "trtllm") -> nn.Module:
    """Replace every ModelOpt-quantized decoder linear of `model` by a CompressedLinear, in place.

    Supported ModelOpt formats: int4_awq (W4A16_AWQ) and fp8 (W8A8 FP8). Unquantized layers stay as they are.
    `target` says whose exporter's fusion preprocessing to reproduce: "trtllm" (q/k/v share one pre-quant
    scale, or one FP8 weight and activation scale: TensorRT-LLM fuses them into one GEMM; FP8 gate/up too)
    or "hf" (AWQ q/k/v and gate/up each share one pre-quant scale, which ModelOpt's HF exporter folds into
    the norm before them; FP8 layers keep their own scales).
    """
    if target not in ("trtllm", "hf"):
        raise ValueError(f"target must be 'trtllm' or 'hf', got {target!r}")
    qu = _modelopt()
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    supported = (None, qu.QUANTIZATION_NONE, qu.QUANTIZATION_INT4_AWQ, qu.QUANTIZATION_FP8)
    # Checked before anything changes: the fusion preprocessing below rewrites ModelOpt's scales (and AWQ
    # weights) in place, so refusing at layer i left a half-imported, re-smoothed model behind.
    none = (None, qu.QUANTIZATION_NONE)
    for i, layer in enumerate(model.model.layers):
        formats = {}
        for name in LINEARS:
            fmt = formats[name] = qu.get_quantization_format(layer.get_submodule(name))
            if fmt not in supported:
                raise ExportError(
                    f"layer {i} {name}: ModelOpt format {fmt!r} is not imported yet (supported: "
                    f"{qu.QUANTIZATION_INT4_AWQ}, {qu.QUANTIZATION_FP8})"
                )
        # Layers both exporters fuse into one GEMM need one format: ModelOpt's fusion preprocessing
        # asserts it (a bare AssertionError, after the earlier layers were already replaced), and the
        # checkpoint loaders take one precision per fused q/k/v (and, in the HF layout, gate/up).
        fp8_mlp = qu.QUANTIZATION_FP8 in (formats[GATE_UP[0]], formats[GATE_UP[1]])
        for group in (QKV, GATE_UP) if target == "hf" or fp8_mlp else (QKV,):
            seen = {"none" if formats[n] in none else formats[n] for n in group}
            if len(seen) > 1:
                got = ", ".join(f"{n} {'none' if formats[n] in none else formats[n]}" for n in group)
                raise ExportError(
                    f"layer {i}: {got}; these layers share one input and are exported as one fused "
                    "GEMM, which needs one quantization format: quantize all of them alike with ModelOpt"
                )
    for i, layer in enumerate(model.model.layers):
        modules = {name: layer.get_submodule(name) for name in LINEARS}
        formats = {name: qu.get_quantization_format(m) for name, m in modules.items()}
        qkv = [modules[n] for n in QKV]
        groups = [QKV] if target == "trtllm" else [QKV, GATE_UP]
        if target == "trtllm" and formats[GATE_UP[0]] == qu.QUANTIZATION_FP8:
            # ModelOpt's TensorRT-LLM exporter fuses FP8 gate/up too (one weight scale, the max of the two)
            groups.append(GATE_UP)
        for group in groups:
            fmt = formats[group[0]]
            if fmt in (None, qu.QUANTIZATION_NONE) or (target == "hf" and fmt == qu.QUANTIZATION_FP8):
                continue
            preprocess_linear_fusion([modules[n] for n in group])  # what ModelOpt's exporter does first
        shared = None
        if formats[QKV[0]] == qu.QUANTIZATION_FP8 and target == "trtllm":
            shared = (
                torch.stack([qu.get_weight_scaling_factor(m).float().reshape(()) for m in qkv]).max(),
                torch.stack([qu.get_activation_scaling_factor(m).float().reshape(()) for m in qkv]).max(),
            )
        for name, module in modules.items():
            fmt = formats[name]
            if fmt in (None, qu.QUANTIZATION_NONE):
                continue
            if fmt == qu.QUANTIZATION_INT4_AWQ:
                state = _int4_awq(module, qu)
            elif fmt == qu.QUANTIZATION_FP8:
                if shared is not None and name in QKV:
                    w_scale, a_scale = shared
                else:
                    w_scale = qu.get_weight_scaling_factor(module).float().reshape(())
                    a_scale = qu.get_activation_scaling_factor(module).float().reshape(())
                state = _fp8(module, qu, w_scale, a_scale)
            else:
                raise ExportError(f"layer {i} {name}: ModelOpt format {fmt!r} is not imported yet")
            set_module(layer, name, CompressedLinear(state))
    return model
