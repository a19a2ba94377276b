"""Group-scaling quantization (GSQ), round to nearest: the data-free baseline every other pass beats.

INT2..INT8, symmetric or asymmetric, one scale per group of `group_size` input channels (0 = per output
channel). Produces packed integer codes, fp16 scales and uint8 zero points (CompressedLinearState).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.passes.base import LinearPass, PassConfig, register_pass

SUPPORTED_GROUP_SIZES = (0, 16, 32, 64, 128, 256)


class GSQConfig(PassConfig):
    method: Literal["gsq"] = "gsq"
    bits: int = Field(4, ge=2, le=8, description="bits per weight code (2..8)")
    group_size: int = Field(128, description="input channels per scale; 0 = per output channel")
    symmetric: bool = Field(
        True, description="symmetric grid (no zero point) or asymmetric (uint8 zero point)"
    )

    @field_validator("group_size")
    @classmethod
    def _known_group_size(cls, v: int) -> int:
        if v not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)} (0 = per channel), got {v}"
            )
        return v

    @property
    def format(self) -> IntFormat:
        return IntFormat(self.bits, self.group_size, self.symmetric)


@register_pass
class GSQPass(LinearPass):
    config_type = GSQConfig
    config: GSQConfig
    quantizer = True

    def compress_linear(self, name: str, state: CompressedLinearState) -> CompressedLinearState:
        quantized = QuantizedWeight.round_to_nearest(state.weight(), self.config.format)
        # A pruned layer stays pruned (its zeros round to zero; the mask keeps them exact and stored).
        return CompressedLinearState(
            state.out_features, state.in_features, quantized=quantized, bias=state.bias, mask=state.mask
        )
