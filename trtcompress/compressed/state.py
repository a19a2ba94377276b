"""CompressedLinearState: the one canonical in-memory form of a compressed linear layer.

Passes produce it, the runtime computes from it, every exporter reads it; nobody re-derives the
quantization. A state serialises to a flat dict of tensors (named by suffix, e.g. `qweight`, `scales`)
plus a JSON-able metadata dict for the manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trtcompress.compressed import fpgrid, intgrid
from trtcompress.compressed.formats import FpFormat, WeightFormat, format_from_dict
from trtcompress.compressed.packing import pack_bits, packed_length, unpack_bits
from trtcompress.compressed.sparsity import SparsityMask, compact_tensors, expand_tensors


@dataclass
class QuantizedWeight:
    """Codes (packed), scales and zero points of an (out, in) weight, integer or floating-point.

    Integer formats: fp16 scales, uint8 zero points when asymmetric. FP formats (see fpgrid.py): ExMy
    codes, scales stored as the format's `scale_encoding` says (fp16, float8 E4M3 or uint8 E8M0), and
    for E4M3 block scales one fp32 `global_scale` (NVFP4's second-level tensor scale).
    """

    format: WeightFormat
    out_features: int
    in_features: int
    qweight: torch.Tensor  # uint8 (out, ceil(in * bits / 8)), see packing.py for the layout
    scales: torch.Tensor  # (out, groups): fp16, or float8_e4m3fn / uint8 (E8M0) for FP block formats
    zeros: torch.Tensor | None  # uint8 (out, groups); None for symmetric formats
    global_scale: torch.Tensor | None = None  # fp32 (1,), only with E4M3 block scales

    def __post_init__(self) -> None:
        groups = intgrid.num_groups(self.in_features, self.format.group_size)
        expected = {
            "qweight": (self.out_features, packed_length(self.in_features, self.format.bits)),
            "scales": (self.out_features, groups),
        }
        if self.zeros is not None:
            expected["zeros"] = (self.out_features, groups)
        elif not self.format.symmetric:
            raise ValueError(f"asymmetric format {self.format.name} needs zero points")
        if isinstance(self.format, FpFormat):
            self._check_fp()
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"{name} has shape {actual}, expected {shape} for format {self.format.name}")

    def _check_fp(self) -> None:
        fmt = self.format
        assert isinstance(fmt, FpFormat)
        dtype = fpgrid.SCALE_DTYPES[fmt.scale_encoding]
        if self.scales.dtype != dtype:
            raise ValueError(f"{fmt.name} stores {dtype} scales, got {self.scales.dtype}")
        if self.zeros is not None:
            raise ValueError(f"FP format {fmt.name} has no zero points")
        needs_global = fmt.scale_encoding == "e4m3"
        if needs_global != (self.global_scale is not None):
            raise ValueError(f"{fmt.name}: a global scale goes with E4M3 block scales, and only with them")
        if self.global_scale is not None and tuple(self.global_scale.shape) != (1,):
            raise ValueError(f"global_scale has shape {tuple(self.global_scale.shape)}, expected (1,)")

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        fmt: WeightFormat,
        global_scale: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        out_f, in_f = codes.shape
        if isinstance(fmt, FpFormat):
            scales = scales.to(fpgrid.SCALE_DTYPES[fmt.scale_encoding])
        else:
            scales = scales.to(intgrid.SCALE_DTYPE)
        return cls(
            format=fmt,
            out_features=out_f,
            in_features=in_f,
            qweight=pack_bits(codes, fmt.bits),
            scales=scales.contiguous(),
            zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
            global_scale=None if global_scale is None else global_scale.float().reshape(1).contiguous(),
        )

    @classmethod
    def round_to_nearest(
        cls, weight: torch.Tensor, fmt: WeightFormat, tensor_amax: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """`tensor_amax`: NVFP4's tensor scale range shared with the layers fused with this one."""
        if isinstance(fmt, FpFormat):
            scales, global_scale = fpgrid.minmax_scales(weight, fmt, tensor_amax)
            return cls.with_fp_scales(weight, fmt, scales, global_scale)
        if tensor_amax is not None:
            raise ValueError(f"{fmt.name}: integer formats have no tensor scale to share")
        codes, scales, zeros = intgrid.quantize_groups(weight, fmt.bits, fmt.group_size, fmt.symmetric)
        return cls.from_codes(codes, scales, zeros, fmt)

    @classmethod
    def with_fp_scales(
        cls,
        weight: torch.Tensor,
        fmt: FpFormat,
        scales: torch.Tensor,
        global_scale: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """Round `weight` to nearest on the FP grid that given (already encoded) scales define."""
        codes = fpgrid.quantize_weight(weight, fmt, scales, global_scale)
        return cls.from_codes(codes, scales, None, fmt, global_scale)

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.format.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(self.format, FpFormat):
            return fpgrid.dequantize_weight(self.codes(), self.scales, self.global_scale, self.format, dtype)
        return intgrid.dequantize_groups(
            self.codes(), self.scales, self.zeros, self.format.bits, self.format.group_size, dtype
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale
        return out


@dataclass
class ActQuantizer:
    """Run-time FP quantization of a layer's input (W4A4), LLM-FP4's pre-shifted exponent bias.

    Channel j is quantized with the exponent bias b_j = ρ + shift_j: one real tensor-wise bias ρ
    (stored as its scale s = 2**(b0 - ρ)) plus an integer per-input-channel shift in [0, 2**e - 1].
    Since quantizing with bias ρ + c equals 2**-c times quantizing 2**c·x with bias ρ, the codes of
    2**shift_j·x_j on the ρ grid times weights whose column j was multiplied by 2**-shift_j ahead of time
    give exactly the per-channel result: inference is one plain FP×FP GEMM with one tensor-wise scale.
    So a layer that carries a shift stores its weight pre-shifted (W' = W·diag(2**-shift)).
    """

    exp_bits: int
    man_bits: int
    scale: torch.Tensor  # fp32 (1,): s = 2**(b0 - ρ)
    shift: torch.Tensor | None = None  # uint8 (in,), None = no per-channel part (one tensor-wise bias)
    # The largest grid value used (None: the grid's own max). 448 for activations that run as
    # float8_e4m3fn (FP8 imported from ModelOpt), whose top code is NaN: the no-NaN E4M3 grid goes to 480.
    saturate: float | None = None

    def __post_init__(self) -> None:
        FpFormat(self.exp_bits, self.man_bits, 0)  # validates the element format
        if tuple(self.scale.shape) != (1,) or self.scale.dtype != torch.float32:
            raise ValueError(
                f"act scale must be fp32 of shape (1,), got {self.scale.dtype} {tuple(self.scale.shape)}"
            )
        grid_max = fpgrid.max_value(self.exp_bits, self.man_bits)
        if self.saturate is not None and not 0 < self.saturate <= grid_max:
            raise ValueError(
                f"act saturation must lie in (0, {grid_max}] for E{self.exp_bits}M{self.man_bits}"
            )
        if self.shift is not None:
            if self.shift.dim() != 1 or self.shift.dtype != torch.uint8:
                raise ValueError("act shift must be a 1-D uint8 tensor (one integer per input channel)")
            if int(self.shift.max()) > 2**self.exp_bits - 1:
                raise ValueError(f"act shifts must lie in [0, {2**self.exp_bits - 1}] for E{self.exp_bits}")

    @property
    def name(self) -> str:
        return f"fp{1 + self.exp_bits + self.man_bits}_e{self.exp_bits}m{self.man_bits}" + (
            "_shift" if self.shift is not None else "_tensor"
        )

    @property
    def bias(self) -> float:
        """The real-valued tensor-wise exponent bias ρ."""
        return fpgrid.standard_bias(self.exp_bits) - float(torch.log2(self.scale))

    def _pow2_shift(self, like: torch.Tensor) -> torch.Tensor | None:
        return None if self.shift is None else torch.exp2(self.shift.to(like.device).float())

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of x on the ρ grid after the per-channel pre-shift (what a kernel computes)."""
        return fpgrid.encode(self._grid_values(x), self.exp_bits, self.man_bits)

    def _grid_values(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x.float() / self.scale.to(x.device)
        factor = self._pow2_shift(scaled)
        if factor is not None:
            scaled = scaled * factor  # exact: a power of two
        if self.saturate is not None:  # (a grid value itself: rounding keeps it)
            scaled = scaled.clamp(-self.saturate, self.saturate)
        return fpgrid.round_to_grid(scaled, self.exp_bits, self.man_bits)

    def gemm_operand(self, x: torch.Tensor) -> torch.Tensor:
        """The activation operand of the plain FP GEMM: codes decoded with the single bias ρ."""
        return (self._grid_values(x) * self.scale.to(x.device)).to(x.dtype)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel semantics: x_j quantized with bias ρ + shift_j (equals gemm_operand · 2**-shift)."""
        values = self._grid_values(x) * self.scale.to(x.device)
        factor = self._pow2_shift(values)
        return (values if factor is None else values / factor).to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"act_scale": self.scale}
        if self.shift is not None:
            out["act_shift"] = self.shift
        return out

    def meta(self) -> dict[str, Any]:
        meta = {"kind": "fp", "exp_bits": self.exp_bits, "man_bits": self.man_bits, "bias": self.bias}
        return meta if self.saturate is None else meta | {"saturate": self.saturate}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ActQuantizer:
        if meta.get("kind") != "fp":
            raise ValueError(f"unknown activation quantizer kind {meta.get('kind')!r}")
        return cls(
            int(meta["exp_bits"]),
            int(meta["man_bits"]),
            tensors["act_scale"],
            tensors.get("act_shift"),
            meta.get("saturate"),
        )


@dataclass
class CompressedLinearState:
    """A linear layer y = x Wᵀ + b whose W is stored compressed.

    Exactly one of `quantized` / `dense_weight` holds the weight. Later passes extend this state (sparsity
    mask, low-rank factors, activation quantizer) rather than inventing new containers.

    With an activation quantizer (W4A4), the input is quantized at run time; if that quantizer carries
    per-channel pre-shifts, the stored weight is the pre-shifted W' and `weight()` undoes the shift.
    """

    out_features: int
    in_features: int
    quantized: QuantizedWeight | None = None
    dense_weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    act_quant: ActQuantizer | None = None
    # Pruning (issue 4): kept weights; a quantized weight's pruned codes are ignored (masked to 0).
    mask: SparsityMask | None = None
    # Low-rank correction (EoRA, KD adapters): y += x·Bᵀ·Aᵀ, A (out, r), B (r, in), usually fp16.
    lowrank_a: torch.Tensor | None = None
    lowrank_b: torch.Tensor | None = None
    # AWQ kept unfolded (e.g. imported from ModelOpt): y = (x * pre_quant_scale) @ stored_weight().T,
    # one fp16 multiplier per input channel, exported as TensorRT-LLM's `prequant_scaling_factor`.
    pre_quant_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.quantized is None) == (self.dense_weight is None):
            raise ValueError("a CompressedLinearState holds exactly one of quantized / dense_weight")
        if self.quantized is not None and (self.quantized.out_features, self.quantized.in_features) != (
            self.out_features,
            self.in_features,
        ):
            raise ValueError("quantized weight shape does not match the layer shape")
        if self.dense_weight is not None and tuple(self.dense_weight.shape) != (
            self.out_features,
            self.in_features,
        ):
            raise ValueError(
                f"dense weight has shape {tuple(self.dense_weight.shape)}, expected "
                f"({self.out_features}, {self.in_features})"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}, expected ({self.out_features},)")
        shift = None if self.act_quant is None else self.act_quant.shift
        if shift is not None and tuple(shift.shape) != (self.in_features,):
            raise ValueError(f"act shift has shape {tuple(shift.shape)}, expected ({self.in_features},)")
        self._check_sparse_lowrank()
        if self.pre_quant_scale is not None and tuple(self.pre_quant_scale.shape) != (self.in_features,):
            raise ValueError(
                f"pre_quant_scale has shape {tuple(self.pre_quant_scale.shape)}, "
                f"expected ({self.in_features},)"
            )

    def _check_sparse_lowrank(self) -> None:
        if self.mask is not None and self.mask.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"mask has shape {self.mask.shape}, expected ({self.out_features}, {self.in_features})"
            )
        if (self.lowrank_a is None) != (self.lowrank_b is None):
            raise ValueError("low-rank factors come in pairs: lowrank_a (out, r) and lowrank_b (r, in)")
        if self.lowrank_a is not None:
            rank = self.lowrank_a.shape[-1]
            if tuple(self.lowrank_a.shape) != (self.out_features, rank) or tuple(
                self.lowrank_b.shape  # type: ignore[union-attr]
            ) != (rank, self.in_features):
                raise ValueError(
                    f"low-rank factors have shapes {tuple(self.lowrank_a.shape)} and "
                    f"{tuple(self.lowrank_b.shape)}, expected ({self.out_features}, r) and "  # type: ignore[union-attr]
                    f"(r, {self.in_features})"
                )

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[1])

    def lowrank_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A·B, the low-rank correction as an (out, in) matrix (zero without factors)."""
        if self.lowrank_a is None:
            held = self.quantized.qweight if self.quantized is not None else self.dense_weight
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=held.device)  # type: ignore[union-attr]
        return (self.lowrank_a.float() @ self.lowrank_b.float()).to(dtype)  # type: ignore[union-attr]

    @property
    def format_name(self) -> str:
        if self.quantized is not None:
            name = self.quantized.format.name
        else:
            name = str(self.dense_weight.dtype).removeprefix("torch.")  # type: ignore[union-attr]
        if self.mask is not None:
            name += f"+sparse_{self.mask.pattern.replace(':', 'of')}"
        if self.lowrank_a is not None:
            name += f"+lowrank{self.rank}"
        if self.pre_quant_scale is not None:
            name += "+prequant"
        return name if self.act_quant is None else f"{name}+a_{self.act_quant.name}"

    def stored_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as stored (pre-shifted W' when the act quantizer has shifts): the GEMM operand."""
        if self.quantized is not None:
            weight = self.quantized.dequantize(dtype)
        else:
            weight = self.dense_weight.to(dtype)  # type: ignore[union-attr]
        if self.mask is not None and self.quantized is not None:
            # Pruned positions are exactly zero whatever their stored code (a dense weight stores zeros).
            weight = weight.masked_fill(~self.mask.dense(), 0)
        return weight

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective (dequantized) weight, for the reference path and for error measurement.

        With pre-shifted activations this is W'·diag(2**shift): y = fake_quantize(x) @ weight().T.
        Low-rank factors are included (W + A·B); with an activation quantizer their branch sees the
        unquantized input, so then this is the weight of the reference path only approximately."""
        if self.lowrank_a is not None:
            base = dataclasses.replace(self, lowrank_a=None, lowrank_b=None)
            return (base.weight() + self.lowrank_delta()).to(dtype)
        if self.pre_quant_scale is not None:  # W·diag(pre_quant_scale)
            base = dataclasses.replace(self, pre_quant_scale=None)
            return (base.weight() * self.pre_quant_scale.float()).to(dtype)
        shift = None if self.act_quant is None else self.act_quant.shift
        if shift is None:
            return self.stored_weight(dtype)
        return (self.stored_weight() * torch.exp2(shift.float())).to(dtype)  # exact: powers of two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation: quantize the input at run time (if W4A4), then one GEMM
        (plus the low-rank branch x·Bᵀ·Aᵀ on the unquantized input, when the state has factors)."""
        lowrank = None
        if self.lowrank_a is not None:
            down = torch.nn.functional.linear(x, self.lowrank_b.to(x.dtype))  # type: ignore[union-attr]
            lowrank = torch.nn.functional.linear(down, self.lowrank_a.to(x.dtype))
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.act_quant is not None:
            x = self.act_quant.gemm_operand(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = torch.nn.functional.linear(x, self.stored_weight(x.dtype), bias)
        return out if lowrank is None else out + lowrank

    def scale_rows(self, factor: torch.Tensor) -> CompressedLinearState:
        """The same layer with output row j multiplied by factor[j] (exact up to fp16 scale rounding)."""
        factor = factor.float()
        bias = None if self.bias is None else (self.bias.float() * factor).to(self.bias.dtype)
        if self.quantized is None:
            dense = (self.dense_weight.float() * factor[:, None]).to(self.dense_weight.dtype)  # type: ignore[union-attr]
            return dataclasses.replace(
                CompressedLinearState(
                    self.out_features, self.in_features, None, dense, bias, dict(self.extra), self.act_quant
                ),
                **self._sparse_lowrank_scaled(factor),
            )
        q = self.quantized
        if getattr(q.format, "scale_encoding", "fp16") != "fp16":
            # E4M3 / E8M0 block scales cannot absorb an arbitrary factor exactly.
            raise ValueError(f"rows of a {q.format.name} weight cannot be rescaled exactly")
        scales = (q.scales.float() * factor[:, None]).to(q.scales.dtype)
        rescaled = QuantizedWeight(q.format, q.out_features, q.in_features, q.qweight, scales, q.zeros)
        return dataclasses.replace(
            CompressedLinearState(
                self.out_features, self.in_features, rescaled, None, bias, dict(self.extra), self.act_quant
            ),
            **self._sparse_lowrank_scaled(factor),
        )

    def _sparse_lowrank_scaled(self, factor: torch.Tensor) -> dict[str, Any]:
        """The mask and the low-rank factors of `scale_rows(factor)` (A's rows scale with the output)."""
        a = self.lowrank_a
        if a is not None:
            a = (a.float() * factor[:, None]).to(a.dtype)
        return {
            "mask": self.mask, "lowrank_a": a, "lowrank_b": self.lowrank_b,
            "pre_quant_scale": self.pre_quant_scale,
        }  # fmt: skip

    def tensors(self) -> dict[str, torch.Tensor]:
        out = self.quantized.tensors() if self.quantized is not None else {"weight": self.dense_weight}
        if self.bias is not None:
            out["bias"] = self.bias
        if self.act_quant is not None:
            out.update(self.act_quant.tensors())
        if self.mask is not None:  # only the kept values/codes are stored, plus the bitmap
            bits = None if self.quantized is None else self.quantized.format.bits
            out = compact_tensors(out, self.mask, bits)  # type: ignore[arg-type]
        if self.lowrank_a is not None:
            out["lowrank_a"] = self.lowrank_a
            out["lowrank_b"] = self.lowrank_b  # type: ignore[assignment]
        if self.pre_quant_scale is not None:
            out["pre_quant_scale"] = self.pre_quant_scale
        return out  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weight alone (codes, scales, zeros; a sparsity mask and low-rank factors count as
        weight), without the bias, the activation quantizer's parameters and the AWQ pre-quant scale (one
        multiplier per input channel applied to x): those are in `nbytes`."""
        return sum(
            t.numel() * t.element_size()
            for k, t in self.tensors().items()
            if k not in ("bias", "pre_quant_scale") and not k.startswith("act_")
        )

    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format_name,
            "shape": [self.out_features, self.in_features],
            "bytes": self.nbytes,
            "weight_bytes": self.weight_nbytes,
            "tensors": sorted(self.tensors()),
        }
        if self.quantized is not None:
            data["quant"] = self.quantized.format.to_dict()
        if self.act_quant is not None:
            data["act"] = self.act_quant.meta()
        if self.mask is not None:
            data["sparsity"] = self.mask.meta()
        if self.lowrank_a is not None:
            data["lowrank"] = {"rank": self.rank}
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CompressedLinearState:
        out_f, in_f = (int(v) for v in meta["shape"])
        quantized = None
        dense = None
        mask = None
        if "sparsity" in meta:
            mask = SparsityMask(tensors["mask"], in_f, meta["sparsity"]["pattern"])
            bits = format_from_dict(meta["quant"]).bits if "quant" in meta else None
            tensors = expand_tensors(tensors, mask, bits)
        if "quant" in meta:
            fmt = format_from_dict(meta["quant"])
            quantized = QuantizedWeight(
                format=fmt,
                out_features=out_f,
                in_features=in_f,
                qweight=tensors["qweight"],
                scales=tensors["scales"],
                zeros=tensors.get("zeros"),
                global_scale=tensors.get("global_scale"),
            )
        else:
            dense = tensors["weight"]
        act = ActQuantizer.from_tensors(meta["act"], tensors) if "act" in meta else None
        return cls(
            out_f, in_f, quantized, dense, tensors.get("bias"), dict(meta.get("extra", {})), act,
            mask=mask, lowrank_a=tensors.get("lowrank_a"), lowrank_b=tensors.get("lowrank_b"),
            pre_quant_scale=tensors.get("pre_quant_scale"),
        )  # fmt: skip
