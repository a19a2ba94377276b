"""FP4 round-to-nearest passes: NVFP4 and MXFP4 weights (data-free), and the min-max W4A4 baseline.

- `nvfp4`: E2M1 codes, one float8 E4M3 scale per 16 input channels plus one fp32 tensor scale
  (NVIDIA ModelOpt's recipe: the largest block scale lands on E4M3's max, 448). 4.5 bits/weight.
- `mxfp4`: E2M1 codes, one E8M0 (power-of-two) scale per 32 input channels, OCP MX v1.0 (the shared
  exponent is floor(log2 amax) - 2; elements above 6 after scaling saturate). 4.25 bits/weight.
  Both block sizes are fixed by the formats (the recipe's "group 128" does not apply to them).
- `minmax-fp4`: the naive W4A4 baseline of the LLM-FP4 paper: per-output-channel weight scale from the
  row's max, one tensor-wise activation scale from the calibration max, no search.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import MXFP4, NVFP4, FpFormat
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.passes.base import LinearPass, PassConfig, PassContext, register_pass
from trtcompress.passes.engine import ABS_MAX, CalibratedPass, GroupHandle, GroupStats

# 4-bit element formats LLM-FP4 chooses between: name -> (exponent bits, mantissa bits)
ELEMENTS: dict[str, tuple[int, int]] = {"e3m0": (3, 0), "e2m1": (2, 1), "e1m2": (1, 2)}
Element = Literal["e3m0", "e2m1", "e1m2"]


class NVFP4Config(PassConfig):
    method: Literal["nvfp4"] = "nvfp4"


class MXFP4Config(PassConfig):
    method: Literal["mxfp4"] = "mxfp4"


class _BlockFP4Pass(LinearPass):
    format: FpFormat

    def compress_linear(self, name: str, state: CompressedLinearState) -> CompressedLinearState:
        quantized = QuantizedWeight.round_to_nearest(state.weight(), self.format)
        return CompressedLinearState(
            state.out_features, state.in_features, quantized=quantized, bias=state.bias
        )


@register_pass
class NVFP4Pass(_BlockFP4Pass):
    config_type = NVFP4Config
    format = NVFP4


@register_pass
class MXFP4Pass(_BlockFP4Pass):
    config_type = MXFP4Config
    format = MXFP4


class MinMaxFP4Config(PassConfig):
    method: Literal["minmax-fp4"] = "minmax-fp4"
    weight_format: Element = Field("e2m1", description="weight element format (per-output-channel max scale)")
    act_format: Element = Field("e2m1", description="activation element format (one tensor-wise max scale)")


def minmax_act_quantizer(abs_max: torch.Tensor, exp_bits: int, man_bits: int) -> ActQuantizer:
    """Tensor-wise activation quantizer whose grid tops out at the largest calibration activation."""
    amax = float(abs_max.max())
    scale = amax / fpgrid.max_value(exp_bits, man_bits) if amax > 0 else 1.0
    return ActQuantizer(exp_bits, man_bits, torch.tensor([scale], dtype=torch.float32))


@register_pass
class MinMaxFP4Pass(CalibratedPass):
    config_type = MinMaxFP4Config
    config: MinMaxFP4Config
    needs = frozenset({ABS_MAX})

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        assert stats.abs_max is not None
        w_exp, w_man = ELEMENTS[self.config.weight_format]
        a_exp, a_man = ELEMENTS[self.config.act_format]
        fmt = FpFormat(w_exp, w_man, 0)
        act = minmax_act_quantizer(stats.abs_max, a_exp, a_man)
        for name in names:
            weight, bias = group.weight(name), group.members[name].bias
            state = CompressedLinearState(
                weight.shape[0],
                weight.shape[1],
                quantized=QuantizedWeight.round_to_nearest(weight, fmt),
                bias=None if bias is None else bias.detach().clone(),
                act_quant=ActQuantizer(a_exp, a_man, act.scale.clone()),  # own copy: no tied tensors
            )
            group.set_state(name, state)  # the rest of the forward sees its quantized input, as at run time
