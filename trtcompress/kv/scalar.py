"""Element-wise codecs: FP16 (the reference cache), INT8 and FP8 E4M3, one fp16 scale per token and head."""

from __future__ import annotations

import torch

from trtcompress.kv.codec import Fields, FieldSpec, Kind, KVCodec, register_codec
from trtcompress.kv.quant import FP8_MAX, absmax_scale


class FP16Codec(KVCodec):
    name = "fp16"
    elementwise = True

    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        return {"data": FieldSpec((tokens, dim), torch.float16)}

    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        return {"data": x.to(torch.float16)}

    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        return fields["data"].float()

    def decompress_into(self, fields: Fields, kind: Kind, tokens: int, dim: int, out: torch.Tensor) -> None:
        out.copy_(fields["data"].view(out.shape))  # one converting copy, no float32 temporary


class _ScaledCodec(KVCodec):
    """Symmetric per-(token, head) scale: `x ≈ code * scale`, codes stored in `code_dtype`."""

    code_dtype: torch.dtype
    qmax: float
    elementwise = True

    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        return {
            "codes": FieldSpec((tokens, dim), self.code_dtype),
            "scale": FieldSpec((tokens,), torch.float16),
        }

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        scale = absmax_scale(x.abs().amax(-1), self.qmax)
        return {"codes": self._encode(x.float() / scale.float()[..., None]), "scale": scale}

    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        return fields["codes"].float() * fields["scale"].float()[..., None]


class Int8Codec(_ScaledCodec):
    name = "int8"
    code_dtype = torch.int8
    qmax = 127.0

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        return torch.floor(y + 0.5).clamp_(-127, 127).to(torch.int8)


class FP8Codec(_ScaledCodec):
    name = "fp8"
    code_dtype = torch.float8_e4m3fn
    qmax = FP8_MAX

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


register_codec("fp16")(FP16Codec)
register_codec("int8")(Int8Codec)
register_codec("fp8")(FP8Codec)
