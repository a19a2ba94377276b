"""Tensor layouts of a TensorRT-LLM checkpoint, computed from CompressedLinearStates (no TensorRT-LLM needed).

A linear layer is first turned into `LinearParts`: its codes unpacked to one integer per weight, its
scales, zero points, pre-quant scale and activation scale, exactly as the state stores them. Parts are
sliced per tensor-parallel rank (rows for column-parallel layers, input channels for row-parallel ones),
padded to the shapes TensorRT-LLM's layers are built with, and packed into the checkpoint's tensors.

Layouts written per `kind` (= the checkpoint's `quant_algo` for that layer; shapes per rank):

- NO_QUANT: `weight` (out, in) in the checkpoint dtype.
- W8A16, W4A16: `weight` (out, in) dtype = the dequantized codes; TensorRT-LLM re-quantizes them per
  channel at load and gets the same codes (checked here).
- W4A16_AWQ: `weight` int8 (out/2, in): signed codes c - 8, output rows 2k / 2k+1 in the low / high
  nibble (ModelOpt); `weights_scaling_factor` fp32 (out, in/group); `prequant_scaling_factor` (in,)
  dtype when the config says `pre_quant_scale`.
- W4A16_AWQ with `has_zero_point` (asymmetric codes): plus `zero` (in/group, out) dtype = (8 - zero
  point) * scale, so w = (c - 8) * s + zero. Not W4A16_GPTQ: TensorRT-LLM's loader
  (`preprocess_perlayer_weights`) interleaves and transposes only W4A16_AWQ / W4A8_AWQ tensors, while a
  W4A16_GPTQ checkpoint must hold weights already run through its C++ `preprocess_weights_for_mixed_gemm`.
  `zero` is not transposed at load, so it is written as the layer declares it.
- FP8: `weight` float8_e4m3fn (out, in); `weights_scaling_factor`, `activation_scaling_factor` fp32 (1,).
- NVFP4: `weight` uint8 (out, in/2) E2M1 pairs, element 2k in the low nibble; `weights_scaling_factor`
  float8_e4m3fn (out, in/16); `weights_scaling_factor_2`, `activation_scaling_factor` fp32 (1,).
- W4A16_MXFP4: `weight` uint8 (out, in/2); `weights_scaling_factor` uint8 E8M0 (out, in/32).
- TRTCOMPRESS_W4A4_FP4: the state's own tensors for `trtcompress::w4a4_fp4_gemm`: `qweight`, `scales`,
  `act_scale`, `act_shift`.

Group-wise int4 (W4A16_AWQ) is padded like TensorRT-LLM's WeightOnlyGroupwiseQuantLinear:
in and out features to a multiple of max(64, group) * tp_size (SmolLM2's 576 inputs with group 128
become 640); padded weights are zero, padded scales 1, padded pre-quant scales 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import FpFormat, IntFormat
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import ArtifactError

GROUPWISE = ("W4A16_AWQ",)
PLUGIN_W4A4 = "TRTCOMPRESS_W4A4_FP4"  # not a TensorRT-LLM name: needs trtcompress::w4a4_fp4_gemm


class ExportError(ArtifactError):
    """A model cannot be written in the requested checkpoint layout (the message says why and what to do)."""


@dataclass
class LinearParts:
    """One linear layer, unpacked: what every checkpoint layout is packed from."""

    kind: str
    weight: torch.Tensor | None = None  # dense (out, in) float32, NO_QUANT only
    codes: torch.Tensor | None = None  # uint8 (out, in), one code per weight
    scales: torch.Tensor | None = None  # (out, groups) as stored (fp16 / float8_e4m3fn / uint8 E8M0)
    zeros: torch.Tensor | None = None  # uint8 (out, groups), asymmetric int only
    group_size: int = 0  # input channels per scale (0 = whole row)
    global_scale: torch.Tensor | None = None  # fp32 (1,): NVFP4 tensor scale
    pre_quant_scale: torch.Tensor | None = None  # (in,)
    act_scale: torch.Tensor | None = None  # fp32 (1,)
    act_shift: torch.Tensor | None = None  # uint8 (in,)
    bias: torch.Tensor | None = None  # (out,)
    bits: int = 16
    fp_element: tuple[int, int] | None = None  # (exponent, mantissa) bits of FP weight codes
    act_element: tuple[int, int] | None = None  # (exponent, mantissa) bits of quantized activations

    @property
    def shape(self) -> tuple[int, int]:
        src = self.weight if self.weight is not None else self.codes
        assert src is not None
        return tuple(src.shape)  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> LinearParts:
        """Output channels [start, stop) (a column-parallel shard)."""
        cut = {}
        for name in ("weight", "codes", "scales", "zeros", "bias"):
            value = getattr(self, name)
            cut[name] = None if value is None else value[start:stop]
        return dataclasses.replace(self, **cut)

    def cols(self, start: int, stop: int) -> LinearParts:
        """Input channels [start, stop) (a row-parallel shard); the cut must fall on group boundaries."""
        in_f = self.shape[1]
        g = self.group_size or in_f
        check_group_split(in_f, self.group_size, start, stop)
        cut: dict = {}
        for name in ("weight", "codes"):
            value = getattr(self, name)
            cut[name] = None if value is None else value[:, start:stop]
        if self.scales is not None and self.group_size:
            gs = slice(start // g, math.ceil(stop / g))
            cut["scales"] = self.scales[:, gs]
            cut["zeros"] = None if self.zeros is None else self.zeros[:, gs]
        for name in ("pre_quant_scale", "act_shift"):
            value = getattr(self, name)
            cut[name] = None if value is None else value[start:stop]
        # A row-parallel layer's bias is added once, after the all-reduce (TensorRT-LLM keeps it per rank).
        return dataclasses.replace(self, **cut)


def int_weight_kind(fmt: IntFormat) -> str:
    """The checkpoint kind of weight-only integer weights of `fmt` (the build also asks it of a recipe's
    passes, before compressing)."""
    if fmt.group_size == 0:
        if not fmt.symmetric:
            raise ExportError(f"{fmt.name}: TensorRT-LLM's per-channel weight-only modes are symmetric")
        if fmt.bits in (4, 8):
            return f"W{fmt.bits}A16"
    elif fmt.bits == 4:
        return "W4A16_AWQ"  # asymmetric too, with has_zero_point (see the module docstring)
    raise ExportError(
        f"{fmt.name}: TensorRT-LLM has int8/int4 per-channel (W8A16/W4A16) and int4 group-wise "
        "(W4A16_AWQ) weight-only modes; use one of those or --export native"
    )


def check_group_split(in_features: int, group_size: int, start: int, stop: int) -> None:
    """A row-parallel shard of input channels [start, stop) must hold whole quantization groups (the last
    shard may end on the partial last group); `group_size` 0 is per channel, any split is fine."""
    g = group_size
    if g and (start % g or (stop % g and stop != in_features)):
        raise ExportError(
            f"cannot split {in_features} input channels at [{start}, {stop}): the shard boundary falls "
            f"inside a quantization group of {g} (use a tp_size that keeps whole groups per rank, or a "
            "smaller group size)"
        )


def classify(state: CompressedLinearState, target: str = "trtllm") -> str:
    """The checkpoint kind of one layer (see the module docstring); `target` "hf" also allows ModelOpt's
    HF-only W4A16_NVFP4 (weight-only NVFP4, which TensorRT-LLM checkpoints cannot express)."""
    if state.lowrank_a is not None:
        raise ExportError(
            "low-rank correction factors have no TensorRT-LLM checkpoint form (its LoRA path takes adapters "
            "at run time): merge them (dense) or export --export native"
        )
    q = state.quantized
    if q is None:
        return "NO_QUANT"
    fmt = q.format
    act = state.act_quant
    if isinstance(fmt, IntFormat):
        if act is not None:
            raise ExportError(
                f"integer weights with a run-time activation quantizer ({fmt.name}) are not supported"
            )
        return int_weight_kind(fmt)
    assert isinstance(fmt, FpFormat)
    fp8_act = act is not None and (act.exp_bits, act.man_bits) == (4, 3) and act.shift is None
    if fmt.element == "e4m3" and fmt.scale_encoding == "fp16" and fmt.group_size == 0 and fp8_act:
        if bool((q.scales != q.scales[0, 0]).any()):
            raise ExportError(
                "FP8 per-channel weight scales: TensorRT-LLM's FP8 mode takes one scale per tensor "
                "(FP8_PER_CHANNEL_PER_TOKEN quantizes activations per token, which this state does not)"
            )
        return "FP8"
    if fmt.name == "nvfp4" and act is None and target == "hf":
        return "W4A16_NVFP4"
    if fmt.name == "nvfp4" and act is None:
        raise ExportError(
            "TensorRT-LLM's NVFP4 quantizes activations to FP4 too and needs a calibrated activation scale; "
            "these NVFP4 weights are weight-only (W4A16). Export --export hf, or use the mxfp4 recipe "
            "(TensorRT-LLM W4A16_MXFP4)"
        )
    if (
        fmt.name == "nvfp4"
        and act is not None
        and (act.exp_bits, act.man_bits) == (2, 1)
        and act.shift is None
    ):
        return "NVFP4"
    if fmt.name == "mxfp4" and act is None:
        return "W4A16_MXFP4"
    if fmt.bits == 4 and act is not None and act.exp_bits + act.man_bits == 3:
        return PLUGIN_W4A4
    raise ExportError(f"{state.format_name}: no TensorRT-LLM checkpoint layout for this format")


def parts_of(state: CompressedLinearState, kind: str) -> LinearParts:
    """Unpack a state into LinearParts (pruned positions get the code of zero)."""
    bias = None if state.bias is None else state.bias.detach().float()
    if kind == "NO_QUANT":
        return LinearParts(kind, weight=state.weight().detach().float(), bias=bias)
    q = state.quantized
    assert q is not None
    codes = q.codes()
    if state.mask is not None:
        keep = state.mask.dense()
        if isinstance(q.format, IntFormat):
            idx = torch.arange(q.in_features) // (q.format.group_size or q.in_features)
            zero = torch.full_like(codes, 2 ** (q.format.bits - 1)) if q.zeros is None else q.zeros[:, idx]
        else:
            zero = torch.zeros_like(codes)
        codes = torch.where(keep, codes, zero)
    act = state.act_quant
    return LinearParts(
        kind,
        codes=codes,
        scales=q.scales,
        zeros=q.zeros,
        group_size=q.format.group_size,
        global_scale=q.global_scale,
        pre_quant_scale=state.pre_quant_scale,
        act_scale=None if act is None else act.scale,
        act_shift=None if act is None else act.shift,
        bias=bias,
        bits=q.format.bits,
        fp_element=(q.format.exp_bits, q.format.man_bits) if isinstance(q.format, FpFormat) else None,
        act_element=None if act is None else (act.exp_bits, act.man_bits),
    )


def concat_rows(parts: list[LinearParts], what: str) -> LinearParts:
    """Fuse layers that share an input (q|k|v) along the output dim; shared per-tensor values must agree."""
    first = parts[0]
    for other in parts[1:]:
        a, b = (_format_of(p) for p in (first, other))
        if a != b:
            raise ExportError(f"{what}: fused layers must share one format, got {a} and {b}")
        # (W4A4: one input, so one activation quantizer; the llmfp4 pass searches it per input group)
        for name in ("global_scale", "pre_quant_scale", "act_scale", "act_shift"):
            a, b = getattr(first, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise ExportError(
                    f"{what}: TensorRT-LLM fuses these layers into one GEMM, which needs one {name}; "
                    "the layers were quantized with different ones"
                )
    if first.kind == "FP8" and len({float(p.scales.float().max()) for p in parts}) > 1:  # type: ignore[union-attr]
        raise ExportError(
            f"{what}: TensorRT-LLM's FP8 fused qkv GEMM has one weight scale; the layers have different ones"
        )
    cat = {}
    for name in ("weight", "codes", "scales", "zeros", "bias"):
        values = [getattr(p, name) for p in parts]
        cat[name] = None if values[0] is None else torch.cat(values)
    return dataclasses.replace(first, **cat)


def element_name(element: tuple[int, int]) -> str:
    return f"e{element[0]}m{element[1]}"


def _format_of(parts: LinearParts) -> str:
    """What a fused GEMM needs to be one format: kind, group size, bits and the FP elements."""
    text = f"{parts.kind} (bits {parts.bits}, group {parts.group_size}"
    if parts.fp_element is not None:
        text += f", weights {element_name(parts.fp_element)}"
    if parts.act_element is not None:
        text += f", activations {element_name(parts.act_element)}"
    return text + ")"


def padded_features(n: int, group_size: int, tp_size: int) -> int:
    """TensorRT-LLM's WeightOnlyGroupwiseQuantLinear pads in and out features to max(64, group) * tp."""
    multiple = max(64, group_size) * tp_size
    return math.ceil(n / multiple) * multiple


def _pad(t: torch.Tensor, shape: tuple[int, ...], value: float = 0) -> torch.Tensor:
    pads: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    return torch.nn.functional.pad(t, pads, value=value) if any(pads) else t


def pack_int4_rows(signed: torch.Tensor) -> torch.Tensor:
    """(out, in) signed int4 -> int8 (out/2, in): rows 2k / 2k+1 in the low / high nibble (ModelOpt)."""
    out_f = signed.shape[0]
    if out_f % 2:
        raise ExportError(f"int4 checkpoint packing needs an even number of output channels, got {out_f}")
    nib = (signed.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[0::2] | (nib[1::2] << 4)).view(torch.int8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_rows`: int8 (out, in) values in [-8, 7]."""
    u = packed.view(torch.uint8)
    low, high = (u & 0xF).to(torch.int16), (u >> 4).to(torch.int16)
    both = torch.stack((low, high), 1).reshape(-1, u.shape[1])
    return torch.where(both > 7, both - 16, both).to(torch.int8)


def _fp_pairs(codes: torch.Tensor) -> torch.Tensor:
    """4-bit FP codes (out, in) -> uint8 (out, in/2), element 2k in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def requantized_codes(weight16: torch.Tensor, bits: int) -> torch.Tensor:
    """What TensorRT-LLM's symmetric per-channel load-time quantizer makes of an fp16 weight (W8A16/W4A16)."""
    qmax = 2 ** (bits - 1) - 1
    w = weight16.float()
    scale = w.abs().amax(1, keepdim=True) / qmax
    return torch.round(w / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-qmax - 1, qmax)


def emit(
    parts: LinearParts, dtype: torch.dtype, pad_to: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (suffix -> tensor) of one rank's shard; `pad_to` (out, in): group-wise int4."""
    kind = parts.kind
    out: dict[str, torch.Tensor] = {}
    if parts.bias is not None:
        bias = parts.bias if pad_to is None else _pad(parts.bias, (pad_to[0],))
        out["bias"] = bias.to(dtype)
    if kind == "NO_QUANT":
        out["weight"] = parts.weight.to(dtype)  # type: ignore[union-attr]
        return out
    codes = parts.codes
    assert codes is not None and parts.scales is not None
    if kind in ("W8A16", "W4A16"):
        signed = codes.float() - 2 ** (parts.bits - 1)
        weight = (signed * parts.scales.float()).to(dtype)
        if not torch.equal(requantized_codes(weight, parts.bits), signed):
            raise ExportError(
                f"{kind}: TensorRT-LLM re-quantizes these weights per channel at load, each tensor-"
                f"parallel shard on its own (scale = max|w| / {2 ** (parts.bits - 1) - 1}), and would not "
                "get the same codes: a row (or a shard's part of it, with tp_size > 1) does not reach the "
                "largest code, e.g. after GPTQ; use tp_size 1, or a group-wise int4 recipe (W4A16_AWQ layout)"
            )
        out["weight"] = weight
        return out
    if kind in GROUPWISE:
        g = parts.group_size
        signed = codes.to(torch.int16) - 8
        scales = parts.scales.float()
        zero = None if parts.zeros is None else (8 - parts.zeros.float()) * scales
        if pad_to is not None:
            groups = pad_to[1] // g
            signed = _pad(signed, pad_to)
            scales = _pad(scales, (pad_to[0], groups), value=1.0)
            zero = None if zero is None else _pad(zero, (pad_to[0], groups))
        out["weight"] = pack_int4_rows(signed)
        out["weights_scaling_factor"] = scales
        if zero is not None:  # the layer's (in/group, out) in the model dtype: the loader leaves it as is
            out["zero"] = zero.T.contiguous().to(dtype)
        if parts.pre_quant_scale is not None:
            pqs = parts.pre_quant_scale.float()
            out["prequant_scaling_factor"] = (pqs if pad_to is None else _pad(pqs, (pad_to[1],))).to(dtype)
        return out
    if kind == "FP8":
        if bool(((codes & 0x7F) == 0x7F).any()):
            raise ExportError("FP8: a code encodes 480, which float8_e4m3fn cannot hold (its max is 448)")
        out["weight"] = codes.view(torch.float8_e4m3fn)
        out["weights_scaling_factor"] = parts.scales.float().amax().reshape(1)
        out["activation_scaling_factor"] = parts.act_scale.float().reshape(1)  # type: ignore[union-attr]
        return out
    if kind == "NVFP4":
        out["weight"] = _fp_pairs(codes)
        out["weights_scaling_factor"] = parts.scales.view(torch.float8_e4m3fn)
        out["weights_scaling_factor_2"] = parts.global_scale.float().reshape(1)  # type: ignore[union-attr]
        # NVFP4 activations: global scale = amax / (6 * 448); a tensor-wise E2M1 scale is amax / 6.
        out["activation_scaling_factor"] = (parts.act_scale.float() / fpgrid.E4M3_MAX).reshape(1)  # type: ignore[union-attr]
        return out
    if kind == "W4A16_MXFP4":
        out["weight"] = _fp_pairs(codes)
        out["weights_scaling_factor"] = parts.scales.to(torch.uint8)
        return out
    if kind == PLUGIN_W4A4:
        from trtcompress.compressed.packing import pack_bits

        out["qweight"] = pack_bits(codes, parts.bits)
        out["scales"] = parts.scales
        out["act_scale"] = parts.act_scale.float().reshape(1)  # type: ignore[union-attr]
        if parts.act_shift is not None:
            out["act_shift"] = parts.act_shift
        return out
    raise ExportError(f"unknown checkpoint kind {kind}")


def check_divisible(kind: str, in_features: int, what: str) -> None:
    """Block formats need whole blocks per shard (TensorRT-LLM pads only the group-wise int4 layers)."""
    block = {"NVFP4": 16, "W4A16_MXFP4": 32}.get(kind)
    if block and in_features % block:
        raise ExportError(
            f"{what}: {kind} needs input channels in whole blocks of {block}, got {in_features}"
        )
    if kind == "NVFP4" and in_features % 2:
        raise ExportError(f"{what}: FP4 packing needs an even number of input channels")
