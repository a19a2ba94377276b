"""Pass = frozen config + the function that applies it; a registry of passes by method name.

A pass's config is a pydantic model with `extra="forbid"` and a `method` literal, so a recipe's
`passes:` list validates against the registered configs (a discriminated union on `method`).

Lifecycle (as llm-compressor's modifiers, reduced to what we need):
- `needs` names the calibration statistics a pass wants ("hessian", "sq_norms", "abs_max"... in
  passes/engine.py); an empty set means data-free. The sequential calibration engine collects them one
  decoder layer at a time.
- `apply(model, context)` compresses the model in place, replacing linear layers by CompressedLinear.
Data-free passes that treat each weight on its own derive from `LinearPass` and write only
`compress_linear`, a pure function of the layer's state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.progress import Progress
from torch import nn

from trtcompress.compressed.linear import CompressedLinear, linear_state, set_module
from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import CompressionError
from trtcompress.passes.targets import check_patterns, select_linears


class PassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf lr, damp: NaN weights

    method: str
    targets: list[str] = Field(default_factory=lambda: ["*"], description="module-name patterns to compress")
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"], description="patterns left uncompressed")

    @field_validator("targets", "exclude")
    @classmethod
    def _valid_patterns(cls, v: list[str]) -> list[str]:
        check_patterns(v)
        return v


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration batches and a progress sink."""

    calibration: torch.Tensor | None = None  # (samples, seq_len) token ids
    progress: Progress | None = None
    log: Callable[[str], None] = field(default=lambda message: None)
    teacher: nn.Module | None = None  # the uncompressed model, kept only for passes needing "teacher" (KD)


class Pass(ABC):
    method: ClassVar[str]
    config_type: ClassVar[type[PassConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()
    # What the pass leaves on the linears it selects, for builders.compress.check_order (which refuses, before
    # any calibration, the orders the passes themselves refuse on reaching a layer):
    prunes: ClassVar[bool] = False  # a sparsity mask (refused on a layer already quantized or corrected)
    quantizer: ClassVar[bool] = False  # quantized codes (refused on a layer with low-rank factors)
    keeps_mask: ClassVar[bool] = True  # a quantizer that keeps a pruned layer's mask (gsq, gptq)

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    @property
    def quantizes(self) -> bool:
        """Whether this pass, as configured, writes quantized codes."""
        return self.quantizer

    @abstractmethod
    def apply(self, model: nn.Module, context: PassContext) -> None: ...


def check_replacement(name: str, old: CompressedLinearState | None, new: CompressedLinearState) -> None:
    """Refuse a pass whose new state for `name` would silently lose what an earlier pass put there:
    a pruned layer's sparsity mask, or its low-rank factors."""
    if old is None:
        return
    if old.mask is not None and new.mask is None:
        # its zeros would be densified or no longer recorded (no N:M guarantee for exporters)
        raise CompressionError(
            f"{name} is pruned ({old.mask.pattern}) and this pass would drop its sparsity mask; prune after "
            "it, or prune and quantize in one pass (sparsegpt with `bits`; gptq and gsq keep masks)"
        )

    if old.lowrank_a is not None and new.lowrank_a is None:
        # EoRA / KD factors compensate the quantization they were fitted to: a later quantization of
        # weight + A·B silently loses that compensation and stores none of it
        raise CompressionError(
            f"{name} carries rank-{old.rank} low-rank factors (eora / kd) and this pass would quantize them "
            "into its weight, losing the compensation; put eora / kd after the last quantization pass"
        )


class LinearPass(Pass):
    """A data-free pass applied to every selected linear layer independently."""

    @abstractmethod
    def compress_linear(self, name: str, state: CompressedLinearState) -> CompressedLinearState: ...

    def apply(self, model: nn.Module, context: PassContext) -> None:
        selected = list(select_linears(model, self.config.targets, self.config.exclude))
        if not selected:
            raise CompressionError(
                f"pass {self.method!r}: no linear layer matches targets={self.config.targets} "
                f"minus exclude={self.config.exclude}"
            )
        task = context.progress.add_task(f"{self.method}", total=len(selected)) if context.progress else None
        for name, module in selected:
            state = linear_state(module)
            weight = state.weight()
            if not torch.isfinite(weight).all():
                raise CompressionError(
                    f"layer {name} has non-finite weights (NaN or inf); refusing to compress it"
                )
            new = self.compress_linear(name, state)
            check_replacement(name, state, new)
            set_module(model, name, CompressedLinear(new))
            if task is not None:
                context.progress.advance(task)  # type: ignore[union-attr]


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    method = cls.config_type.model_fields["method"].default
    if method in PASS_REGISTRY:
        raise ValueError(f"pass {method!r} registered twice")
    cls.method = method
    PASS_REGISTRY[method] = cls
    return cls


def build_pass(config: PassConfig) -> Pass:
    return PASS_REGISTRY[config.method](config)
