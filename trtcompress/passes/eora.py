"""EoRA (Liu et al., 2024): training-free low-rank compensation of a compressed layer's error, with the
SVD taken in the eigenspace of the input activations.

For a layer compressed in the same sweep (pruned, quantized or both), ΔW = W - Ŵ. Minimising the output
error ||X ΔWᵀ - X (AB)ᵀ|| rather than ||ΔW - AB|| means weighting input directions by the activation
covariance H = XᵀX/N = QΛQᵀ: project ΔW' = ΔW·Q·√Λ, keep its top-r SVD U_r Σ_r V_rᵀ, project back:
A = U_r·√Σ_r (out, r), B = √Σ_r·V_rᵀ·Λ^(-1/2)·Qᵀ (r, in); a component fp16 cannot hold that way
(a tiny or zero covariance) has its norm split evenly between A and B. At full rank AB = ΔW exactly
(the damping added to Λ cancels), so the correction reproduces the uncompressed layer. Factors are
stored in the state (fp16 by default, counted in its bytes) and run as x·Bᵀ·Aᵀ next to the compressed
GEMM.

Alternation (`refine: k`, beyond the EoRA paper, in the spirit of LQER / CALDERA): the quantizer chose
Ŵ without knowing a low-rank term would follow. With refine > 0, the pass that compressed the layer in
this sweep (GPTQ: `GroupHandle.recompress`) re-quantizes W - A·B, EoRA refits A·B on the new error, k
times; the pair with the smallest output error tr(D·H·Dᵀ), D = W - Ŵ - A·B, is kept (the first one
included, so refining never loses). On SmolLM2 INT3 g128 at rank 32 three rounds take the output error
left by EoRA from 85% of GPTQ's to 80% on MLP layers (67% -> 62% on an attention projection).

EoRA must follow, in the same sweep, the pass whose error it compensates (place it right after it in
the recipe): the engine then gives it the weights as they were before the sweep (`originals`) and the
Hessian of the inputs the compressed model actually produces.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field, field_validator

from trtcompress.compressed.state import CompressedLinearState
from trtcompress.errors import CompressionError
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import HESSIAN, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.pruning import DTYPES
from trtcompress.passes.targets import check_patterns, matches_any

FP16_TINY = 2.0**-14  # fp16's smallest normal: a factor whose entries all lie below it loses precision
FP16_LARGE = 2.0**15  # half of fp16's largest value: headroom for the product's sums


def eora_factors(
    delta: torch.Tensor, hessian: torch.Tensor, rank: int, damp: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out, r), B (r, in) with A·B ≈ delta in the metric of `hessian` (fp32)."""
    out_f, in_f = delta.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {in_f} inputs")
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(
            f"rank {rank} is outside [1, min(out, in) = {min(out_f, in_f)}] for a {out_f}x{in_f} weight"
        )
    if not torch.isfinite(hessian).all():  # overflowing activations: eigh/svd failed with a LinAlgError
        raise CompressionError("eora: the Hessian has non-finite entries (NaN or inf); check the calibration")
    h = hessian.double()
    eigvals, eigvecs = torch.linalg.eigh(h)
    eigvals = eigvals.clamp_min(0) + damp * max(float(eigvals.mean()), 1e-30)
    root = eigvals.sqrt()
    projected = (delta.double() @ eigvecs) * root[None, :]
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    r = rank
    half = s[:r].sqrt()
    a = u[:, :r] * half[None, :]
    b = ((half[:, None] * vh[:r]) / root[None, :]) @ eigvecs.T
    # Λ^(-1/2) lands in B alone: a tiny (or all-zero: dead inputs) covariance gave a tiny A and a huge
    # B, which fp16 storage flushed to 0 and inf (0·inf = NaN in the layer). Such a component's scale
    # is split evenly between the factors (A·B unchanged). Only those: the others are left as computed,
    # since the GPTQ alternation (`refine`) is sensitive to their rounding and balancing every
    # component moved SmolLM2's w3a16-gptq-eora32 (ppl 26.15 -> 25.71, GSM8K KL 0.293 -> 0.312).
    norm_a, norm_b = a.norm(dim=0), b.norm(dim=1)
    out_of_fp16 = (a.abs().amax(0) < FP16_TINY) | (b.abs().amax(1) > FP16_LARGE)
    fix = out_of_fp16 & (norm_a > 0) & (norm_b > 0)
    balance = torch.where(fix, (norm_b / norm_a.where(fix, 1.0)).sqrt(), 1.0)
    return (a * balance[None, :]).float(), (b / balance[:, None]).float()


def with_lowrank(state: CompressedLinearState, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """`state` plus the factors (appended to any it already has: ranks add up)."""
    a, b = a.to(dtype), b.to(dtype)
    if state.lowrank_a is not None:
        a = torch.cat([state.lowrank_a.to(dtype), a], dim=1)
        b = torch.cat([state.lowrank_b.to(dtype), b], dim=0)  # type: ignore[union-attr]
    return dataclasses.replace(state, lowrank_a=a.contiguous(), lowrank_b=b.contiguous())


class EoRAConfig(PassConfig):
    method: Literal["eora"] = "eora"
    rank: int = Field(32, ge=1, description="rank of the correction of every targeted linear")
    ranks: dict[str, int] = Field(
        default_factory=dict, description="per-layer ranks: module pattern -> rank (first match wins)"
    )
    damp: float = Field(1e-6, gt=0, description="added to the covariance eigenvalues (x their mean)")
    factor_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="storage dtype of the factors"
    )
    refine: int = Field(
        0, ge=0, le=16, description="alternations: re-quantize W - A·B, refit A·B (needs GPTQ in the sweep)"
    )

    @field_validator("ranks")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 0}
        if bad:
            raise ValueError(f"ranks must be >= 0 (0 = no correction), got {bad}")
        check_patterns(v)
        return v

    def rank_for(self, name: str) -> int:
        for pattern, rank in self.ranks.items():
            if matches_any(name, [pattern]):
                return rank
        return self.rank


@register_pass
class EoRAPass(CalibratedPass):
    config_type = EoRAConfig
    config: EoRAConfig
    needs = frozenset({HESSIAN})

    def check_selection(self, selected: list[str]) -> None:
        # as for `targets`: a mistyped pattern must not silently leave its layers at the default rank
        for pattern in self.config.ranks:
            if not any(matches_any(name, [pattern]) for name in selected):
                raise CompressionError(
                    f"eora: `ranks` pattern {pattern!r} matches none of the layers it targets "
                    f"(e.g. {selected[0]}); fix the pattern or remove it"
                )

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        assert stats.hessian is not None
        for name in names:
            state = group.states.get(name)
            if state is None:
                if group.previous[name] is not None:
                    raise CompressionError(
                        f"eora: {name} was compressed by an earlier sweep, so its uncompressed weight is "
                        "gone; place eora right after the pass it compensates (same sweep)"
                    )
                continue  # not compressed: nothing to compensate
            rank = self.config.rank_for(name)
            if rank <= 0:
                continue
            if rank > min(state.out_features, state.in_features):
                raise CompressionError(
                    f"eora: rank {rank} for {name} exceeds min(out, in) = "
                    f"{min(state.out_features, state.in_features)} of its {state.out_features}x"
                    f"{state.in_features} weight; lower `rank` or set a smaller one in `ranks`"
                )
            original = group.originals[name]
            if group.input_scale is not None:  # AWQ-style fold in this sweep: W·diag(s) is the target
                original = original * group.input_scale[None, :].float()
            state, a, b = self._fit(group, name, state, original, stats.hessian, rank)
            group.set_state(name, with_lowrank(state, a, b, DTYPES[self.config.factor_dtype]))

    def _fit(
        self,
        group: GroupHandle,
        name: str,
        state: CompressedLinearState,
        original: torch.Tensor,
        hessian: torch.Tensor,
        rank: int,
    ) -> tuple[CompressedLinearState, torch.Tensor, torch.Tensor]:
        """EoRA factors of `state`'s error, alternated `refine` times with re-quantization; the best."""
        cfg = self.config
        dtype = DTYPES[cfg.factor_dtype]
        a, b = eora_factors(original - state.weight(), hessian, rank, cfg.damp)
        if cfg.refine == 0:
            return state, a, b
        recompress = group.recompress.get(name)
        if recompress is None:
            raise CompressionError(
                f"eora: refine needs the pass that compressed {name} in this sweep to re-quantize it "
                "(GPTQ does); set refine: 0 or place eora right after gptq"
            )

        def output_error(s: CompressedLinearState, a: torch.Tensor, b: torch.Tensor) -> float:
            d = original - s.weight() - a.to(dtype).float() @ b.to(dtype).float()
            return float(torch.einsum("oi,ij,oj->", d, hessian, d))

        best = (output_error(state, a, b), state, a, b)
        for _ in range(cfg.refine):
            lowrank = a.to(dtype).float() @ b.to(dtype).float()  # what the runtime will add
            state = recompress(original - lowrank)
            a, b = eora_factors(original - state.weight(), hessian, rank, cfg.damp)
            error = output_error(state, a, b)
            if error < best[0]:
                best = (error, state, a, b)
        return best[1], best[2], best[3]
