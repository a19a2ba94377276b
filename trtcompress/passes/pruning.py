"""What the unstructured / N:M pruning passes share: config fields, and the state a pruned layer becomes.

A pruned-only linear is a dense weight with zeros at the pruned positions plus a `SparsityMask`; its
artifact stores only the kept values (in `dtype`) and a 1-bit-per-weight bitmap (compressed/sparsity.py),
so 2:4 at fp16 costs 9 bits/weight. Pruned and quantized (SparseGPT with `bits`) = quantized codes
(zeros at pruned positions) + the mask.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from trtcompress.compressed.sparsity import SparsityMask, parse_nm
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassConfig

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class PruneConfig(PassConfig):
    """Fields of every unstructured / semi-structured pruning pass."""

    pattern: str = Field(
        "2:4", description="'N:M' (keep N of every M inputs, e.g. 2:4, 4:8) or 'unstructured'"
    )
    sparsity: float | None = Field(
        None, ge=0, lt=1, description="fraction pruned (unstructured: default 0.5; N:M prunes 1 - N/M)"
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of the kept values of a pruned (not quantized) layer"
    )

    @field_validator("sparsity", mode="before")
    @classmethod
    def _not_a_pattern(cls, v: object) -> object:
        if isinstance(v, str) and ":" in v:
            raise ValueError(f"sparsity is the fraction pruned (e.g. 0.5); for {v} use pattern: '{v}'")
        return v

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        parse_nm(v)  # raises ValueError with the accepted forms
        return v

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> PruneConfig:
        nm = parse_nm(self.pattern)
        # None (not given) rather than a 0.5 default: a dumped recipe (overrides, a manifest) validates
        # again whatever its N:M pattern
        if nm is not None and self.sparsity is not None:
            n, m = nm
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} prunes {1 - n / m:g}; drop `sparsity` or make it match"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity


def check_divisible(name: str, in_features: int, config: PruneConfig) -> None:
    nm = config.nm
    if nm is not None and in_features % nm[1]:
        # a CompressionError: the CLI prints it on one line (a ValueError would be a traceback)
        raise CompressionError(
            f"{name}: {config.pattern} sparsity needs in_features divisible by {nm[1]}, got {in_features}; "
            f"exclude it or use pattern: unstructured"
        )


def check_prunable(name: str, state: CompressedLinearState | None) -> None:
    """Refuse to prune a layer an earlier pass quantized or corrected: the pruned result is a plain
    dense weight, so its codes, low-rank factors or activation quantizer would be silently lost."""
    if state is None or (
        state.quantized is None
        and state.lowrank_a is None
        and state.act_quant is None
        and state.pre_quant_scale is None
    ):
        return
    raise CompressionError(
        f"{name} is already compressed ({state.format_name}); pruning it would drop that: put the pruning "
        "pass first (gptq / gsq after it keep its mask), or use sparsegpt with `bits`"
    )


def pruned_state(
    weight: torch.Tensor, keep: torch.Tensor, config: PruneConfig, bias: torch.Tensor | None
) -> CompressedLinearState:
    """A dense-weight state with zeros at the pruned positions and the mask that says so."""
    dense = weight.float().masked_fill(~keep, 0).to(DTYPES[config.dtype])
    return CompressedLinearState(
        int(weight.shape[0]),
        int(weight.shape[1]),
        dense_weight=dense,
        bias=None if bias is None else bias.detach().clone(),
        mask=SparsityMask.from_bool(keep, config.pattern),
    )
