"""LLM-FP4 (Liu et al., EMNLP 2023): W4A4 floating-point quantization with searched formats and biases.

Per group of linears that read the same input (q/k/v, o, gate/up, down), on calibration tokens X and
the float outputs Y_i = X·W_iᵀ, minimising the layer-output error Σ_i ||Y_i - Q(X)·Ŵ_iᵀ||²:

- weights: one real-valued exponent bias per output channel (stored as the fp16 scale 2**(b0 - b)),
  element format chosen among E3M0 / E2M1 / E1M2 per linear (the paper), or per group with
  `shared_weight_format` (a fused GEMM such as TensorRT-LLM's qkv decodes one grid);
- activations: one FP quantizer per group (every member reads the same quantized input, as a fused
  QKV GEMM would), format chosen among the same three, with the *pre-shifted exponent bias*: channel j
  uses bias ρ + c_j, ρ real and tensor-wise, c_j = clamp(round(b_j) - round(ρ), 0, 2**e - 1) an integer
  from channel j's calibration max; 2**-c_j is folded into column j of the weights before they are
  quantized, so inference is a plain FP4 x FP4 GEMM with one tensor-wise activation scale;
- search, as upstream (nbasyl/LLM-FP4, FPPTQSLBatchingQuantLinear_fpq): start from min-max biases, then
  `rounds` x [weight bias per format, weight format, activation bias ρ per format, activation format],
  each candidate scored by the layer-output L2 error. After the last round the weights are searched
  once more under the final activation quantizer, so the stored W' matches the stored shifts exactly.

Candidate biases: `grid_mode: upstream` is upstream's b_init x linspace(0.01, 1.2, grid); `max` (default)
searches the max value directly, Qmax = max x 2**-δ with δ evenly spaced in [-0.25, 3] (1.19x down to
1/8 of the max). Upstream's multiplicative grid depends on the sign and size of b_init: for a tensor
whose max sits near the format's default range (b_init ≈ 0, e.g. activations with max ≈ 12 under E2M1)
every candidate collapses onto b_init and nothing is searched. `stride` > 1 scans every stride-th
candidate, then narrows around the best (a budget knob for 2-core CPUs; stride 1 = exhaustive).

`act_bias: auto` (an extension, not in the paper) runs the search twice per group, with and without
the pre-shift, and keeps whichever gives the lower output error (twice the cost): the pre-shift pays
off where channels differ in range but are narrow inside (norm outputs feeding q/k/v and gate/up);
inputs with heavy tails inside each channel (the SiLU product feeding down_proj) can do better without
it, since the shifts make the small columns of W' coarser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from trtcompress.compressed import fpgrid
from trtcompress.compressed.formats import FpFormat
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.passes.base import PassConfig, PassContext, register_pass
from trtcompress.passes.engine import ABS_MAX, SAMPLE, CalibratedPass, GroupHandle, GroupStats
from trtcompress.passes.fp4 import ELEMENTS, Element

GridMode = Literal["max", "upstream"]
ActBias = Literal["per_channel", "tensor", "auto"]
BIASES: tuple[ActBias, ...] = ("per_channel", "tensor")
UPSTREAM_RANGE = (0.01, 1.2)  # eq_alpha, eq_beta
MAX_RANGE = (-0.25, 3.0)  # δ: Qmax = max * 2**-δ
CHUNK = 8  # weight candidates evaluated at once (bounds memory to CHUNK x out x in floats)


def candidate_biases(b_init: torch.Tensor, grid: int, mode: GridMode) -> torch.Tensor:
    """(grid, *b_init.shape) candidate exponent biases, monotonic along the first dim."""
    shape = (grid,) + (1,) * b_init.dim()
    if mode == "upstream":
        return b_init[None] * torch.linspace(*UPSTREAM_RANGE, grid).reshape(shape)
    return b_init[None] + torch.linspace(*MAX_RANGE, grid).reshape(shape)


def coarse_to_fine(
    evaluate: Callable[[torch.Tensor], torch.Tensor], grid: int, width: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmin over `grid` candidates of `width` independent 1-D searches.

    `evaluate(idx)` takes candidate indices (k, width) and returns errors (k, width). Scans every
    `stride`-th candidate (and the last), then narrows around each search's best with steps of about a
    third of the previous one down to 1: about 2·log3(stride) + grid/stride evaluations instead of
    `grid`; stride 1 is the exhaustive scan.
    """
    coarse = sorted(set(range(0, grid, stride)) | {grid - 1})
    idx = torch.tensor(coarse)[:, None].expand(-1, width)
    best_err, pos = evaluate(idx).min(0)
    best = idx.gather(0, pos[None])[0]
    step = stride
    while step > 1:
        finer = max(1, step // 3)
        offsets = [
            k * finer for k in range(-(step // finer), step // finer + 1) if k != 0 and abs(k * finer) < step
        ]
        cand = (best[None] + torch.tensor(offsets)[:, None]).clamp(0, grid - 1)
        err, pos = evaluate(cand).min(0)
        better = err < best_err
        best = torch.where(better, cand.gather(0, pos[None])[0], best)
        best_err = torch.where(better, err, best_err)
        step = finer
    return best, best_err


@dataclass
class WeightChoice:
    element: str
    scales: torch.Tensor  # fp16 (out,): per-output-channel 2**(b0 - b)
    error: torch.Tensor  # (out,) layer-output error per row (without the constant ||Y_k||²)


def search_weight(
    w_prime: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    element: str,
    grid: int,
    mode: GridMode,
    stride: int,
) -> WeightChoice:
    """Per-output-channel bias of the pre-shifted weight W' for one element format.

    The error of row k, ||y_k - X_q·ŵ_kᵀ||², is evaluated through the Gram matrix C = X_qᵀX_q and
    P = X_qᵀY (cross): ŵCŵᵀ - 2ŵ·p_k (+ ||y_k||², constant), so its cost does not grow with tokens.
    """
    e, m = ELEMENTS[element]
    row_max = w_prime.abs().amax(1).clamp(min=1e-12)
    cands = candidate_biases(fpgrid.bias_for_max(e, m, row_max), grid, mode)
    # Round the candidate scales to fp16 first: the search scores exactly what will be stored.
    scales = fpgrid.fp16_scales(fpgrid.scale_for_bias(e, cands))  # (grid, out)
    cross_t = cross.T

    def evaluate(idx: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in idx.split(CHUNK):
            s = scales.float().gather(0, chunk)[..., None]  # (k, out, 1)
            wq = fpgrid.quantize_scaled(w_prime[None], s, e, m)  # (k, out, in)
            out.append(((wq @ gram).sub_(cross_t, alpha=2).mul_(wq)).sum(-1))  # ŵCŵᵀ - 2ŵ·p
        return torch.cat(out)

    best, err = coarse_to_fine(evaluate, grid, w_prime.shape[0], stride)
    return WeightChoice(element, scales.gather(0, best[None])[0], err)


def make_act(element: str, rho: float, channel_bias: torch.Tensor | None) -> ActQuantizer:
    """Activation quantizer with tensor-wise bias ρ and, given per-channel biases, the integer shifts."""
    e, m = ELEMENTS[element]
    scale = torch.tensor([2.0 ** (fpgrid.standard_bias(e) - rho)], dtype=torch.float32)
    shift = None
    if channel_bias is not None:
        # Upstream: b̃_j = clamp(round(b_j), round(ρ), round(ρ) + 2**e - 1) - round(ρ) + ρ.
        c = torch.round(channel_bias.nan_to_num(posinf=1e4)) - round(rho)
        shift = c.clamp(0, 2**e - 1).to(torch.uint8)
    return ActQuantizer(e, m, scale, shift)


def pre_shift(w: torch.Tensor, act: ActQuantizer | None) -> torch.Tensor:
    """W' = W·diag(2**-shift): the weight the plain GEMM multiplies the ρ-grid activations with."""
    return w if act is None or act.shift is None else w / torch.exp2(act.shift.float())


def quantized_weight(w: torch.Tensor, act: ActQuantizer | None, choice: WeightChoice) -> QuantizedWeight:
    """The stored weight: W' rounded with the chosen per-output-channel fp16 scales."""
    e, m = ELEMENTS[choice.element]
    return QuantizedWeight.with_fp_scales(pre_shift(w, act), FpFormat(e, m, 0), choice.scales[:, None])


def effective(w: torch.Tensor, act: ActQuantizer | None, choice: WeightChoice) -> torch.Tensor:
    """W_eff = 2**shift · Ŵ' (exact): fake_quantize(x) @ W_effᵀ is the deployed computation."""
    deq = quantized_weight(w, act, choice).dequantize()
    return deq if act is None or act.shift is None else deq * torch.exp2(act.shift.float())


class OutputError:
    """||Y - X_q·W_effᵀ||² for many X_q against one fixed Y and W_eff.

    When W_eff has more rows than columns the weight Gram form is cheaper:
    ||Y||² - 2·Σ X_q ⊙ (Y·W_eff) + Σ (X_q·W_effᵀW_eff) ⊙ X_q, with both products computed once.
    """

    def __init__(self, y: torch.Tensor, w_eff: torch.Tensor) -> None:
        self.gram_form = w_eff.shape[0] > w_eff.shape[1]
        self.y, self.w_eff = y, w_eff
        if self.gram_form:
            self.y_sq = float(y.pow(2).sum())
            self.z = y @ w_eff
            self.g = w_eff.T @ w_eff

    def __call__(self, x_q: torch.Tensor) -> float:
        if not self.gram_form:
            return float((self.y - x_q @ self.w_eff.T).pow(2).sum())
        return self.y_sq - 2 * float((x_q * self.z).sum()) + float(((x_q @ self.g) * x_q).sum())


class LLMFP4Config(PassConfig):
    method: Literal["llmfp4"] = "llmfp4"
    formats: list[Element] = Field(
        default_factory=lambda: ["e3m0", "e2m1", "e1m2"], description="element formats searched (w and a)"
    )
    quantize_activations: bool = Field(True, description="W4A4 (true) or weight-only W4A16 (false)")
    shared_weight_format: bool = Field(
        False,
        description="one weight element format per input group (q/k/v, gate/up: the GEMMs TensorRT-LLM "
        "fuses, which decode one grid; needed for the trtllm export); false: per linear, as the paper",
    )
    act_bias: ActBias = Field(
        "per_channel",
        description="activation exponent bias: per_channel (pre-shifted, the paper), tensor (FPQ baseline), "
        "or auto (per group, whichever gives the lower output error)",
    )
    rounds: int = Field(3, ge=1, le=10, description="alternating search rounds (paper: 3)")
    grid: int = Field(100, ge=2, le=1000, description="candidate biases per format (paper: 100)")
    grid_mode: GridMode = Field(
        "max", description="'max': Qmax = max x 2^-δ; 'upstream': b_init x [0.01, 1.2]"
    )
    stride: int = Field(  # le: grid's own bound (a wider step scans the ends only); 1e29 overflowed torch
        10, ge=1, le=1000, description="coarse scan step over the candidates (1 = exhaustive)"
    )
    sample_tokens: int = Field(2048, ge=16, description="calibration tokens that score the candidates")

    @field_validator("formats")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError("formats must list distinct element formats, at least one")
        return v


@dataclass
class GroupResult:
    act: ActQuantizer | None
    weights: list[WeightChoice]
    error: float  # final ||Y - Q(X)Ŵᵀ||² over the group
    reference: float  # ||Y||²


def search_group(
    x: torch.Tensor, weights: list[torch.Tensor], abs_max: torch.Tensor, cfg: LLMFP4Config
) -> GroupResult:
    """The LLM-FP4 joint search for one group of linears reading the same input x (T, in)."""
    if cfg.act_bias == "auto" and cfg.quantize_activations:
        # Whole searches, not a switch inside the alternation: weights searched under pre-shifted
        # activations are tailored to the shifts, so comparing modes with those weights held fixed
        # would always keep the shifts.
        results = [search_group(x, weights, abs_max, cfg.model_copy(update={"act_bias": b})) for b in BIASES]
        return min(results, key=lambda r: r.error)
    x = x.float()
    ys = [x @ w.T for w in weights]
    y_all = torch.cat(ys, 1)
    reference = float(y_all.pow(2).sum())
    quantize_acts = cfg.quantize_activations
    channel_bias = {f: fpgrid.bias_for_max(*ELEMENTS[f], abs_max.clamp(min=1e-12)) for f in cfg.formats}
    rho_init = {f: float(channel_bias[f].min()) for f in cfg.formats}  # min-max init, as upstream
    # An activation option is (element format, pre-shifted or not).
    shifted = cfg.act_bias == "per_channel"
    options = [(f, shifted) for f in cfg.formats]
    rho = {option: rho_init[option[0]] for option in options}
    act_option = ("e2m1" if "e2m1" in cfg.formats else cfg.formats[0], shifted)

    def act_for(option: tuple[str, bool], r: float) -> ActQuantizer | None:
        if not quantize_acts:
            return None
        element, shifted = option
        return make_act(element, r, channel_bias[element] if shifted else None)

    def weights_under(act: ActQuantizer | None, elements: list[list[str]]) -> list[WeightChoice]:
        x_q = x if act is None else act.gemm_operand(x)
        gram = x_q.T @ x_q
        options = []  # per linear: its best choice for each candidate format
        for w, y, candidates in zip(weights, ys, elements, strict=True):
            cross = x_q.T @ y
            wp = pre_shift(w, act)
            search = {
                f: search_weight(wp, gram, cross, f, cfg.grid, cfg.grid_mode, cfg.stride) for f in candidates
            }
            options.append(search)
        if cfg.shared_weight_format:  # the format with the lowest summed error over the group
            common = [f for f in elements[0] if all(f in o for o in options)]
            best = min(common, key=lambda f: sum(float(o[f].error.sum()) for o in options))
            return [o[best] for o in options]
        return [min(o.values(), key=lambda c: float(c.error.sum())) for o in options]

    all_formats = [list(cfg.formats) for _ in weights]
    act = act_for(act_option, rho[act_option])
    choices = weights_under(act, all_formats)  # weight bias per format, then weight format
    for round_index in range(cfg.rounds if quantize_acts else 0):
        if round_index > 0:
            choices = weights_under(act, all_formats)
        w_eff = torch.cat([effective(w, act, c) for w, c in zip(weights, choices, strict=True)])
        errors = {}
        for option in options:  # activation ρ per format (weights held), then activation format
            rho[option], errors[option] = _search_rho(
                x, y_all, w_eff, rho_init[option[0]], lambda r, o=option: act_for(o, r), cfg
            )
        act_option = min(errors, key=errors.__getitem__)
        act = act_for(act_option, rho[act_option])
    if quantize_acts:
        # The shifts may have moved since the weights were searched: search them once more under the
        # final activation quantizer (chosen formats only), so the stored W' is what was scored.
        choices = weights_under(act, [[c.element] for c in choices])
    w_eff = torch.cat([effective(w, act, c) for w, c in zip(weights, choices, strict=True)])
    x_q = x if act is None else act.fake_quantize(x)
    return GroupResult(act, choices, OutputError(y_all, w_eff)(x_q), reference)


def _search_rho(
    x: torch.Tensor,
    y: torch.Tensor,
    w_eff: torch.Tensor,
    init: float,
    act_at: Callable[[float], ActQuantizer | None],
    cfg: LLMFP4Config,
) -> tuple[float, float]:
    """Best tensor-wise bias ρ for one activation format, weights held fixed (as upstream).

    The candidates come from the min-max init of that format, the same set every round (as upstream)."""
    cands = candidate_biases(torch.tensor(init), cfg.grid, cfg.grid_mode)
    error = OutputError(y, w_eff)

    def evaluate(idx: torch.Tensor) -> torch.Tensor:
        errs = []
        for i in idx[:, 0].tolist():
            act = act_at(float(cands[i]))
            assert act is not None
            errs.append(error(act.fake_quantize(x)))
        return torch.tensor(errs)[:, None]

    best, err = coarse_to_fine(evaluate, cfg.grid, 1, cfg.stride)
    return float(cands[int(best[0])]), float(err[0])


@register_pass
class LLMFP4Pass(CalibratedPass):
    config_type = LLMFP4Config
    config: LLMFP4Config
    needs = frozenset({ABS_MAX, SAMPLE})
    quantizer, keeps_mask = True, False

    def __init__(self, config: LLMFP4Config) -> None:
        super().__init__(config)
        self.sample_tokens = config.sample_tokens  # type: ignore[misc]

    def compress_group(
        self, group: GroupHandle, names: list[str], stats: GroupStats, context: PassContext
    ) -> None:
        assert stats.sample is not None and stats.abs_max is not None
        weights = [group.weight(n) for n in names]
        result = search_group(stats.sample, weights, stats.abs_max, self.config)
        for name, w, choice in zip(names, weights, result.weights, strict=True):
            bias = group.members[name].bias
            act = None
            if result.act is not None:  # each layer owns its copy (no tied tensors in the artifact)
                a = result.act
                shift = None if a.shift is None else a.shift.clone()
                act = ActQuantizer(a.exp_bits, a.man_bits, a.scale.clone(), shift)
            state = CompressedLinearState(
                w.shape[0],
                w.shape[1],
                quantized=quantized_weight(w, act, choice),
                bias=None if bias is None else bias.detach().clone(),
                act_quant=act,
            )
            group.set_state(name, state)  # the rest of the calibration forward sees quantized inputs
        formats = ",".join(c.element for c in result.weights)
        act_name = "none" if result.act is None else result.act.name
        context.log(
            f"llmfp4: {group.prefix}{group.group.name} w {formats} a {act_name} "
            f"rel. error {result.error / max(result.reference, 1e-30):.3e}"
        )
