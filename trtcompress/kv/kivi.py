"""KIVI: asymmetric min/max uniform quantization, keys per channel over groups of tokens, values per
token over groups of channels (group 64). The backbone of GEAR."""

from __future__ import annotations

from typing import Any

import torch

from trtcompress.kv.codec import Fields, FieldSpec, Kind, KVCodec, register_codec
from trtcompress.kv.quant import (
    FP8_MAX,
    FP16_MAX,
    absmax_scale,
    dequantize_rows,
    minmax_params,
    pack_bits,
    quantize_rows,
    unpack_bits,
)

SCALE_DTYPES = ("fp16", "fp8")


def value_group(dim: int, group: int) -> int:
    """Channels per value group: `group`, or the whole head when the head dim is not a multiple of it."""
    return group if dim % group == 0 else dim


def to_rows(x: torch.Tensor, kind: Kind) -> torch.Tensor:
    """(..., T, D) -> the quantization rows: keys (..., D, T) (per channel), values (..., T, D)."""
    return x.transpose(-1, -2) if kind == "k" else x


def from_rows(rows: torch.Tensor, kind: Kind) -> torch.Tensor:
    return rows.transpose(-1, -2) if kind == "k" else rows


def _fp8_with_max(x: torch.Tensor, positive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x` `(..., rows, groups)` as float8 E4M3 times one fp16 maximum per leading index (block and
    head): (codes, maximum `(..., 1)`, the values they stand for: fp16(code x maximum), the same fp16
    numbers every reader forms). `positive` (scales): at least the smallest subnormal, never 0 (a zero
    scale would divide by zero)."""
    top = absmax_scale(x.abs().amax((-2, -1)), FP8_MAX)[..., None]  # (..., 1) fp16
    # a maximum rounded up past 65504 / 448 (a value within ~12 of the fp16 maximum, such as a zero of
    # -65504) would make the largest code read as fp16(448 x maximum) = inf: round it down instead
    top = torch.where(top.float() * FP8_MAX > FP16_MAX, torch.nextafter(top, torch.zeros_like(top)), top)
    unit = top.float()[..., None]
    codes = (x.float() / unit).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if positive:
        codes = codes.float().clamp_min(2.0**-9).to(torch.float8_e4m3fn)
    return codes, top, (codes.float() * unit).to(torch.float16)


def group_scale_zero(fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 (scale, zero) of stored fields: as stored, or fp16(fp8 code x its block-head
    maximum) (`scale_dtype: fp8`; the decode kernel forms the same numbers)."""
    if "scale_max" not in fields:
        return fields["scale"], fields["zero"]
    return (
        (fields["scale"].float() * fields["scale_max"].float()[..., None]).to(torch.float16),
        (fields["zero"].float() * fields["zero_max"].float()[..., None]).to(torch.float16),
    )


class KiviCodec(KVCodec):
    def __init__(self, bits: int = 2, group: int = 64, scale_dtype: str = "fp16") -> None:
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
        if bits not in (2, 3, 4) or isinstance(bits, bool):
            raise ValueError(f"KIVI/GEAR codes are 2, 3 or 4 bits, got {bits!r}")
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            raise ValueError(f"group must be a positive number of elements, got {group!r}")
        self.bits = bits
        self.group = group
        self.token_group = group
        self.scale_dtype = scale_dtype  # fp8: scale and zero as E4M3 with one fp16 maximum per block-head
        self.name = f"kivi-{bits}bit"

    def check_block(self, tokens: int, dim: int | None = None) -> None:
        super().check_block(tokens, dim)
        # codes are packed into whole bytes per row: a key row holds the block's tokens, a value row
        # the head's channels (a group option can make either a size the packing cannot fill)
        for what, n in (("cache block", tokens), ("head dim", dim)):
            if n is not None and n * self.bits % 8:
                raise ValueError(
                    f"codec {self.name}: a {what} of {n} holds {n * self.bits} bits of {self.bits}-bit "
                    "codes, not whole bytes; use a multiple of 8"
                )

    # Geometry: rows of `n` elements split into groups of `gs`.
    def _geometry(self, kind: Kind, tokens: int, dim: int) -> tuple[int, int, int]:
        """(rows, elements per row, group size)."""
        if kind == "k":
            self.check_block(tokens, dim)
            return dim, tokens, self.group
        return tokens, dim, value_group(dim, self.group)

    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        rows, n, gs = self._geometry(kind, tokens, dim)
        if self.scale_dtype == "fp8":
            return {
                "codes": FieldSpec((rows, n * self.bits // 8), torch.uint8),
                "scale": FieldSpec((rows, n // gs), torch.float8_e4m3fn),
                "zero": FieldSpec((rows, n // gs), torch.float8_e4m3fn),
                "scale_max": FieldSpec((1,), torch.float16),
                "zero_max": FieldSpec((1,), torch.float16),
            }
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
        return self._quantize_with(grouped, *minmax_params(grouped, self.bits, exclude))

    def _quantize_with(
        self, grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
    ) -> tuple[Fields, torch.Tensor]:
        """Codes for the chosen fp16 (scale, zero) of every group, after rounding them to the stored
        format (fp8: the codes are computed with the values decompression will use)."""
        meta: Fields = {"scale": scale, "zero": zero}
        if self.scale_dtype == "fp8":
            s8, s_max, scale = _fp8_with_max(scale, positive=True)
            z8, z_max, zero = _fp8_with_max(zero, positive=False)
            meta = {"scale": s8, "zero": z8, "scale_max": s_max, "zero_max": z_max}
        codes = quantize_rows(grouped, scale, zero, self.bits)
        deq = dequantize_rows(codes, scale, zero)
        flat = codes.reshape(*codes.shape[:-2], -1)
        return {"codes": pack_bits(flat, self.bits)} | meta, deq

    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        fields, _ = self._quantize(self._grouped(x, kind))
        return fields

    def _dequantize(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        """The quantized backbone in grouped layout (..., rows, groups, gs)."""
        _, n, gs = self._geometry(kind, tokens, dim)
        codes = unpack_bits(fields["codes"], self.bits, n)
        codes = codes.reshape(*codes.shape[:-1], n // gs, gs)
        return dequantize_rows(codes, *group_scale_zero(fields))

    def _ungroup(self, grouped: torch.Tensor, kind: Kind) -> torch.Tensor:
        return from_rows(grouped.reshape(*grouped.shape[:-2], -1), kind)

    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        return self._ungroup(self._dequantize(fields, kind, tokens, dim), kind)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group": self.group, "scale_dtype": self.scale_dtype}


def named_bits_factory(cls: type, bits: int, **defaults: Any):
    """A factory for the codec named after its bit width: options override `defaults`, but not the
    bits the name states (`kivi-2bit` with bits: 4 is a contradiction, not a 4-bit codec)."""

    def factory(**options: Any):
        if "bits" in options:
            raise ValueError(
                f"the codec's name sets its bits ({bits}); choose the codec of the other width "
                f"instead of bits: {options['bits']!r}"
            )
        return cls(bits=bits, **(defaults | options))

    factory.codec_class = cls  # what `codec_options` reads the accepted option names from
    return factory


for _bits in (2, 3, 4):
    register_codec(f"kivi-{_bits}bit")(named_bits_factory(KiviCodec, _bits))
