"""KIVI: asymmetric min/max uniform quantization, keys per channel over groups of tokens, values per
token over groups of channels (group 64). The backbone of GEAR."""

from __future__ import annotations

from typing import Any

import torch

from trtcompress.kv.codec import Fields, FieldSpec, Kind, KVCodec, register_codec
from trtcompress.kv.quant import dequantize_rows, minmax_params, pack_bits, quantize_rows, unpack_bits


def value_group(dim: int, group: int) -> int:
    """Channels per value group: `group`, or the whole head when the head dim is not a multiple of it."""
    return group if dim % group == 0 else dim


def to_rows(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """(..., T, D) -> the quantization rows: keys (..., D, T) (per channel), values (..., T, D)."""
    return x.transpose(-1, -2) if kind == "k" else x


def from_rows(rows: torch.Tensor, kind: Kind) -> torch.Tensor:
    return rows.transpose(-1, -2) if kind == "k" else rows


class KiviCodec(KVCodec):
    def __init__(self, bits: int = 2, group: int = 64) -> None:
        self.bits = bits
        self.group = group
        self.token_group = group
        self.name = f"kivi-{bits}bit"

    # Geometry: rows of `n` elements split into groups of `gs`.
    def _geometry(self, kind: Kind, tokens: int, dim: int) -> tuple[int, int, int]:
        """(rows, elements per row, group size)."""
        if kind == "k":
            self.check_block(tokens, dim)
            return dim, tokens, self.group
        return tokens, dim, value_group(dim, self.group)

    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        rows, n, gs = self._geometry(kind, tokens, dim)
        return {
            "codes": FieldSpec((rows, n * self.bits // 8), torch.uint8),
            "scale": FieldSpec((rows, n // gs), torch.float16),
            "zero": FieldSpec((rows, n // gs), torch.float16),  # the group minimum
        }

    def _grouped(self, x: torch.Tensor, kind: Kind) -> torch.Tensor:
        """(..., T, D) -> (..., rows, groups, gs)."""
        rows = to_rows(x.float(), kind)
        _, n, gs = self._geometry(kind, x.shape[-2], x.shape[-1])
        return rows.reshape(*rows.shape[:-1], n // gs, gs)

    def _quantize(
        self, grouped: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> tuple[Fields, torch.Tensor]:
        scale, zero = minmax_params(grouped, self.bits, exclude)
        codes = quantize_rows(grouped, scale, zero, self.bits)
        deq = dequantize_rows(codes, scale, zero)
        flat = codes.reshape(*codes.shape[:-2], -1)
        return {"codes": pack_bits(flat, self.bits), "scale": scale, "zero": zero}, deq

    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        fields, _ = self._quantize(self._grouped(x, kind))
        return fields

    def _dequantize(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        """The quantized backbone in grouped layout (..., rows, groups, gs)."""
        _, n, gs = self._geometry(kind, tokens, dim)
        codes = unpack_bits(fields["codes"], self.bits, n)
        codes = codes.reshape(*codes.shape[:-1], n // gs, gs)
        return dequantize_rows(codes, fields["scale"], fields["zero"])

    def _ungroup(self, grouped: torch.Tensor, kind: Kind) -> torch.Tensor:
        return from_rows(grouped.reshape(*grouped.shape[:-2], -1), kind)

    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        return self._ungroup(self._dequantize(fields, kind, tokens, dim), kind)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group": self.group}


for _bits in (2, 3, 4):
    register_codec(f"kivi-{_bits}bit")(lambda bits=_bits, **kw: KiviCodec(bits=bits, **kw))
