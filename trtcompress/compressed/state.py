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

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat, format_from_dict
from trtcompress.compressed.packing import pack_bits, packed_length, unpack_bits
from trtcompress.compressed.sparsity import SparsityMask, compact_tensors, expand_tensors


@dataclass
class QuantizedWeight:
    """Integer codes (packed), scales and zero points of an (out, in) weight."""

    format: IntFormat
    out_features: int
    in_features: int
    qweight: torch.Tensor  # uint8 (out, ceil(in * bits / 8)), see packing.py for the layout
    scales: torch.Tensor  # fp16 (out, groups)
    zeros: torch.Tensor | None  # uint8 (out, groups); None for symmetric formats

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
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"{name} has shape {actual}, expected {shape} for format {self.format.name}")

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: IntFormat
    ) -> QuantizedWeight:
        out_f, in_f = codes.shape
        return cls(
            format=fmt,
            out_features=out_f,
            in_features=in_f,
            qweight=pack_bits(codes, fmt.bits),
            scales=scales.to(intgrid.SCALE_DTYPE).contiguous(),
            zeros=None if zeros is None else zeros.to(torch.uint8).contiguous(),
        )

    @classmethod
    def round_to_nearest(cls, weight: torch.Tensor, fmt: IntFormat) -> QuantizedWeight:
        codes, scales, zeros = intgrid.quantize_groups(weight, fmt.bits, fmt.group_size, fmt.symmetric)
        return cls.from_codes(codes, scales, zeros, fmt)

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, self.format.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return intgrid.dequantize_groups(
            self.codes(), self.scales, self.zeros, self.format.bits, self.format.group_size, dtype
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out


@dataclass
class CompressedLinearState:
    """A linear layer y = x Wᵀ + b whose W is stored compressed.

    Exactly one of `quantized` / `dense_weight` holds the weight. Later passes extend this state (sparsity
    mask, low-rank factors, activation quantizer) rather than inventing new containers.
    """

    out_features: int
    in_features: int
    quantized: QuantizedWeight | None = None
    dense_weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
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
            return torch.zeros(self.out_features, self.in_features, dtype=dtype)
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
        return name

    def stored_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as stored: the GEMM operand."""
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
        Low-rank factors are included (W + A·B)."""
        if self.lowrank_a is not None:
            base = dataclasses.replace(self, lowrank_a=None, lowrank_b=None)
            return (base.weight() + self.lowrank_delta()).to(dtype)
        if self.pre_quant_scale is not None:  # W·diag(pre_quant_scale)
            base = dataclasses.replace(self, pre_quant_scale=None)
            return (base.weight() * self.pre_quant_scale.float()).to(dtype)
        return self.stored_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation: one GEMM (plus the low-rank branch x·Bᵀ·Aᵀ with factors)."""
        lowrank = None
        if self.lowrank_a is not None:
            down = torch.nn.functional.linear(x, self.lowrank_b.to(x.dtype))  # type: ignore[union-attr]
            lowrank = torch.nn.functional.linear(down, self.lowrank_a.to(x.dtype))
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
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
                    self.out_features, self.in_features, None, dense, bias, dict(self.extra)
                ),
                **self._sparse_lowrank_scaled(factor),
            )
        q = self.quantized
        scales = (q.scales.float() * factor[:, None]).to(q.scales.dtype)
        rescaled = QuantizedWeight(q.format, q.out_features, q.in_features, q.qweight, scales, q.zeros)
        return dataclasses.replace(
            CompressedLinearState(
                self.out_features, self.in_features, rescaled, None, bias, dict(self.extra)
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
        weight), without the bias and the pre-quant scale."""
        return sum(
            t.numel() * t.element_size()
            for k, t in self.tensors().items()
            if k not in ("bias", "pre_quant_scale")
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
            bits = int(meta["quant"]["bits"]) if "quant" in meta else None
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
            )
        else:
            dense = tensors["weight"]
        return cls(
            out_f, in_f, quantized, dense, tensors.get("bias"), dict(meta.get("extra", {})),
            mask=mask, lowrank_a=tensors.get("lowrank_a"), lowrank_b=tensors.get("lowrank_b"),
            pre_quant_scale=tensors.get("pre_quant_scale"),
        )  # fmt: skip
