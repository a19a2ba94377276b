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
from torch import nn

from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import MXFP4, NVFP4, FpFormat
from trtcompress.compressed.linear import linear_state
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.models.layout import LLAMA_GROUPS, layer_prefix
from trtcompress.passes.base import LinearPass, PassConfig, PassContext, register_pass
from trtcompress.passes.engine import ABS_MAX, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.targets import select_linears

# 4-bit element formats LLM-FP4 chooses between: name -> (exponent bits, mantissa bits)
ELEMENTS: dict[str, tuple[int, int]] = {"e3m0": (3, 0), "e2m1": (2, 1), "e1m2": (1, 2)}
Element = Literal["e3m0", "e2m1", "e1m2"]


class NVFP4Config(PassConfig):
    method: Literal["nvfp4"] = "nvfp4"


class MXFP4Config(PassConfig):
    method: Literal["mxfp4"] = "mxfp4"


class _BlockFP4Pass(LinearPass):
    format: FpFormat
    quantizer, keeps_mask = True, False

    def shared_tensor_amax(self, name: str) -> torch.Tensor | None:
        return None  # MXFP4 has no tensor scale

    def compress_linear(self, name: str, state: CompressedLinearState) -> CompressedLinearState:
        amax = self.shared_tensor_amax(name)
        quantized = QuantizedWeight.round_to_nearest(state.weight(), self.format, tensor_amax=amax)
        return CompressedLinearState(
            state.out_features, state.in_features, quantized=quantized, bias=state.bias
        )


@register_pass
class NVFP4Pass(_BlockFP4Pass):
    """Layers that read one input (q/k/v, gate/up) share one tensor scale, as ModelOpt's export makes
    them: serving stacks run them as one GEMM with one `weight_scale_2` (TensorRT-LLM asserts the
    layers' are equal; vLLM takes their max without rescaling the block scales, a silently wrong k_proj)."""

    config_type = NVFP4Config
    format = NVFP4

    def apply(self, model: nn.Module, context: PassContext) -> None:
        selected = dict(select_linears(model, self.config.targets, self.config.exclude))
        self._tensor_amax = fused_tensor_amax(model, selected)
        super().apply(model, context)

    def shared_tensor_amax(self, name: str) -> torch.Tensor | None:
        return self._tensor_amax.get(name)


@register_pass
class MXFP4Pass(_BlockFP4Pass):
    config_type = MXFP4Config
    format = MXFP4


def fused_tensor_amax(model: nn.Module, selected: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """name -> max |W| over the selected layers of its input-sharing group (q/k/v, gate/up), for every
    layer of such a group with more than one selected member."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    shared: dict[str, torch.Tensor] = {}
    for index in range(len(layers) if isinstance(layers, nn.ModuleList) else 0):
        for group in LLAMA_GROUPS:
            names = [name for rel in group.linears if (name := layer_prefix(index) + rel) in selected]
            if len(names) > 1:
                amax = torch.stack(
                    [linear_state(selected[n]).weight().float().abs().max() for n in names]
                ).max()
                shared |= dict.fromkeys(names, amax)
    return shared


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
    quantizer, keeps_mask = True, False

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
