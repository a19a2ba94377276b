"""CompressedLinearState: the one canonical in-memory form of a compressed linear layer.

Passes produce it, the runtime computes from it, every exporter reads it; nobody re-derives the
quantization. A state serialises to a flat dict of tensors (named by suffix, e.g. `qweight`, `scales`)
plus a JSON-able metadata dict for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trtcompress.compressed import intgrid
from trtcompress.compressed.formats import IntFormat, format_from_dict
from trtcompress.compressed.packing import pack_bits, packed_length, unpack_bits


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

    @property
    def format_name(self) -> str:
        if self.quantized is not None:
            return self.quantized.format.name
        return str(self.dense_weight.dtype).removeprefix("torch.")  # type: ignore[union-attr]

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective (dequantized) weight, for the reference path and for error measurement."""
        if self.quantized is not None:
            return self.quantized.dequantize(dtype)
        return self.dense_weight.to(dtype)  # type: ignore[union-attr]

    def scale_rows(self, factor: torch.Tensor) -> CompressedLinearState:
        """The same layer with output row j multiplied by factor[j] (exact up to fp16 scale rounding)."""
        factor = factor.float()
        bias = None if self.bias is None else (self.bias.float() * factor).to(self.bias.dtype)
        if self.quantized is None:
            dense = (self.dense_weight.float() * factor[:, None]).to(self.dense_weight.dtype)  # type: ignore[union-attr]
            return CompressedLinearState(
                self.out_features, self.in_features, None, dense, bias, dict(self.extra)
            )
        q = self.quantized
        scales = (q.scales.float() * factor[:, None]).to(q.scales.dtype)
        rescaled = QuantizedWeight(q.format, q.out_features, q.in_features, q.qweight, scales, q.zeros)
        return CompressedLinearState(
            self.out_features, self.in_features, rescaled, None, bias, dict(self.extra)
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = self.quantized.tensors() if self.quantized is not None else {"weight": self.dense_weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the weight alone (codes, scales, zeros), without the bias."""
        return sum(t.numel() * t.element_size() for k, t in self.tensors().items() if k != "bias")

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
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CompressedLinearState:
        out_f, in_f = (int(v) for v in meta["shape"])
        quantized = None
        dense = None
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
        return cls(out_f, in_f, quantized, dense, tensors.get("bias"), dict(meta.get("extra", {})))
