"""Every compression pass against an independent float64 reference written from the papers' math.

The references below deliberately avoid the project's machinery: GPTQ / SparseGPT run the unblocked OBS
recursion on an explicit inverse Hessian (row/column elimination, no Cholesky factor, no lazy blocks);
EoRA is checked against the Eckart-Young optimum in the Cholesky metric of H (no eigendecomposition);
AWQ scores candidates on the calibration tokens themselves (no Gram matrix); FP rounding uses LLM-FP4's
log2 formula; the structured refit solves the augmented least-squares problem with `lstsq`. So an
off-by-one, a wrong damping, a wrong permutation or a mask on the wrong axis shows up as a mismatch.

Tolerances: the project computes in float32, the references in float64, so a value exactly at a rounding
tie may round the other way; codes and masks must agree on at least 99% of entries (they agree exactly
on every case here today) and continuous outputs to 1e-4 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from trtcompress.compressed import fpgrid, intgrid
from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.sparsity import make_mask
from trtcompress.passes.awq import search_clip, search_scale
from trtcompress.passes.eora import eora_factors
from trtcompress.passes.gptq import gptq_quantize
from trtcompress.passes.llmfp4 import candidate_biases, search_weight
from trtcompress.passes.sparsegpt import sparsegpt_prune
from trtcompress.passes.structured import refit_columns
from trtcompress.passes.wanda import wanda_scores

F64 = torch.float64
AGREE = 0.99  # fraction of codes / mask entries that must match the reference


def _inputs(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Correlated channels of very different scales, like LLM activations; `scale` moves H far from
    identity, so that a damping not taken relative to mean(diag H) changes the result."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) / d**0.5 + 0.5 * torch.eye(d)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (torch.randn(n, d, generator=g) @ mixing) * scales * scale


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


# ------------------------------------------------------------------------------ integer grid reference


def ref_scale_zero(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (rounded to fp16, as stored) and zero point of a group, from the format definition."""
    w = w.double()
    if symmetric:
        s = (w.abs().amax(1) / (2 ** (bits - 1) - 1)).to(torch.float16).double()
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.full_like(s, 2 ** (bits - 1))
    hi, lo = w.amax(1).clamp(min=0), w.amin(1).clamp(max=0)
    s = ((hi - lo) / (2**bits - 1)).to(torch.float16).double()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)


def ref_quantize(
    col: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.clamp(torch.round(col.double() / s) + z, 0, 2**bits - 1)
    return codes, (codes - z) * s


def ref_rtn(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) round to nearest, group by group."""
    n = w.shape[1]
    g = fmt.group_size or n
    codes, deq = torch.zeros(w.shape, dtype=F64), torch.zeros(w.shape, dtype=F64)
    for start in range(0, n, g):
        cols = slice(start, start + g)
        s, z = ref_scale_zero(w[:, cols], fmt.bits, fmt.symmetric)
        codes[:, cols], deq[:, cols] = ref_quantize(w[:, cols], s[:, None], z[:, None], fmt.bits)
    return codes, deq


def ref_search_scale(
    w: torch.Tensor, importance: torch.Tensor, fmt: IntFormat, shrink: float, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's range search of one group: shrink min/max by up to `shrink`, keep the lowest importance-
    weighted rounding error per row (the first on ties)."""
    best_s, best_z = ref_scale_zero(w, fmt.bits, fmt.symmetric)
    if shrink <= 0:
        return best_s, best_z

    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _, deq = ref_quantize(w, s[:, None], z[:, None], fmt.bits)
        return ((deq - w.double()) ** 2 * importance.double()).sum(1)

    best = err(best_s, best_z)
    for step in range(1, steps + 1):
        # the candidate range is that of the shrunk weights (computed in float32, as the stored weights)
        s, z = ref_scale_zero((w.float() * (1 - shrink * step / steps)).double(), fmt.bits, fmt.symmetric)
        e = err(s, z)
        better = e < best
        best, best_s, best_z = (
            torch.where(better, e, best),
            torch.where(better, s, best_s),
            torch.where(better, z, best_z),
        )
    return best_s, best_z


# ------------------------------------------------------------------------------------- GPTQ reference


def ref_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: IntFormat,
    act_order: bool,
    damp: float,
    shrink: float = 0.0,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ as the OBS recursion (Frantar et al. 2022, eq. 2-3), unblocked, on an explicit inverse.

    Columns in order (act-order: descending diag H); each column is rounded, its error divided by
    [H_F⁻¹]_qq is spread over the remaining columns through row q of H_F⁻¹, then q is eliminated from
    H_F⁻¹ (H_F⁻¹ ← H_F⁻¹ - H_F⁻¹[:, q] H_F⁻¹[q, :] / [H_F⁻¹]_qq). Groups: static (act-order, scales from
    the original weights) or fixed when the sweep reaches the group's first column (current weights).
    Returns (codes, scales) in the original column order.
    """
    w = w.double().clone()
    h = h.double()
    out_f, n = w.shape
    g = fmt.group_size or n
    hdiag = h.diagonal().clone()
    order = torch.argsort(hdiag, descending=True).tolist() if act_order else list(range(n))
    hinv = torch.linalg.inv(h + damp * hdiag.mean() * torch.eye(n, dtype=F64))
    n_groups = math.ceil(n / g)
    scales, zeros = torch.zeros(out_f, n_groups, dtype=F64), torch.zeros(out_f, n_groups, dtype=F64)
    kept = w if keep is None else w.masked_fill(~keep, 0)
    if act_order:
        for k in range(n_groups):
            cols = slice(k * g, (k + 1) * g)
            scales[:, k], zeros[:, k] = ref_search_scale(kept[:, cols], hdiag[cols], fmt, shrink)
    codes = torch.zeros(out_f, n, dtype=F64)
    for t, j in enumerate(order):
        k = j // g
        if not act_order and j % g == 0:
            ahead = w[:, j : j + g] if keep is None else w[:, j : j + g].masked_fill(~keep[:, j : j + g], 0)
            scales[:, k], zeros[:, k] = ref_search_scale(ahead, hdiag[j : j + g], fmt, shrink)
        codes[:, j], deq = ref_quantize(w[:, j], scales[:, k], zeros[:, k], fmt.bits)
        if keep is not None:
            deq = deq.masked_fill(~keep[:, j], 0)
        d = hinv[j, j]
        rest = order[t + 1 :]
        w[:, rest] -= ((w[:, j] - deq) / d)[:, None] * hinv[j, rest][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / d
    return codes, scales


def _objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): GPTQ's layer-output objective."""
    d = (w - w_hat).double()
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


GPTQ_CASES = [
    (IntFormat(4, 16, True), False),
    (IntFormat(4, 16, True), True),
    (IntFormat(3, 32, False), False),
    (IntFormat(3, 32, False), True),
    (IntFormat(4, 0, True), True),
    (IntFormat(2, 16, False), True),
]


@pytest.mark.parametrize(("fmt", "act_order"), GPTQ_CASES)
@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_gptq_matches_the_obs_recursion(fmt: IntFormat, act_order: bool, shrink: float) -> None:
    # Fewer tokens than inputs (H singular: only the damping makes it invertible) and a large activation
    # scale: a damping not relative to mean(diag H), or a wrong one, changes the codes. Width 72 with
    # groups of 16/32 ends on a partial group; block 16 makes groups straddle blocks (g32).
    x = _inputs(60, 72, seed=1, scale=30.0)
    h, w = _hessian(x), _weight(20, 72, seed=2)
    result = gptq_quantize(w, h, fmt, act_order=act_order, block_size=16, damp=0.01, clip_shrink=shrink)
    codes, scales = ref_gptq(w, h, fmt, act_order, damp=0.01, shrink=shrink)
    assert _agreement(result.codes.double(), codes) >= AGREE
    torch.testing.assert_close(result.scales.double(), scales, rtol=1e-3, atol=0)  # one fp16 ulp
    w_hat = intgrid.dequantize_groups(result.codes, result.scales, result.zeros, fmt.bits, fmt.group_size)
    _, w_rtn = ref_rtn(w, fmt)
    # GPTQ's invariant: not worse than round to nearest on its own objective (same Hessian)
    assert _objective(w, w_hat, h) <= _objective(w, w_rtn, h)


@pytest.mark.parametrize("act_order", [False, True])
def test_masked_gptq_matches_the_obs_recursion_with_pruned_weights_held_at_zero(act_order: bool) -> None:
    x = _inputs(200, 64, seed=3)
    h, w = _hessian(x), _weight(16, 64, seed=4)
    keep = make_mask(w.abs(), "2:4", 0.5)
    fmt = IntFormat(4, 16, True)
    result = gptq_quantize(w, h, fmt, act_order=act_order, block_size=16, clip_shrink=0.0, keep=keep)
    codes, _ = ref_gptq(w, h, fmt, act_order, damp=0.01, keep=keep)
    assert _agreement(result.codes[keep].double(), codes[keep]) >= AGREE


# -------------------------------------------------------------------------------- SparseGPT reference


def ref_sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    pattern: str,
    sparsity: float,
    block: int,
    damp: float,
    fmt: IntFormat | None = None,
    row_splits: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, alg. 1) unblocked on an explicit inverse: the saliency of w_j
    is w_j² / [H_{F_j}⁻¹]_jj with F_j = columns j..n-1 (computed by inverting H[j:, j:] directly);
    unstructured masks are chosen per block of `block` columns from the weights at the block's start,
    N:M masks per group of M when the sweep reaches it (with `fmt`: per quantization group, at its first
    column, with that group's scale). Returns (weights, keep mask)."""
    w = w.double().clone()
    h = h.double()
    out_f, n = w.shape
    hd = h + damp * h.diagonal().mean() * torch.eye(n, dtype=F64)
    # [H_{F_j}⁻¹]_jj: the diagonal the OBS saliency divides by once columns < j are gone
    dd = torch.stack([torch.linalg.inv(hd[j:, j:])[0, 0] for j in range(n)])
    hinv = torch.linalg.inv(hd)
    keep = torch.ones(out_f, n, dtype=torch.bool)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    splits = row_splits or [out_f]
    g = (fmt.group_size or n) if fmt else 0
    s = z = None

    def choose_nm(cols: slice) -> None:
        n_keep, m = nm  # type: ignore[misc]
        for c in range(cols.start, cols.stop, m):
            sal = w[:, c : c + m] ** 2 / dd[c : c + m]
            low = sal.argsort(dim=1)[:, : m - n_keep]
            keep[:, c : c + m].scatter_(1, low, False)

    for j in range(n):
        if nm is None and j % block == 0:
            cols = slice(j, min(j + block, n))
            sal = w[:, cols] ** 2 / dd[cols]
            row = 0
            for rows in splits:
                part = sal[row : row + rows]
                count = round(part.numel() * sparsity)
                idx = part.flatten().argsort()[:count]
                flat = torch.ones(part.numel(), dtype=torch.bool)
                flat[idx] = False
                keep[row : row + rows, cols] = flat.reshape(part.shape)
                row += rows
        if fmt and j % g == 0:
            if nm is not None:
                choose_nm(slice(j, min(j + g, n)))
            kept = w[:, j : j + g].masked_fill(~keep[:, j : j + g], 0)
            s, z = ref_scale_zero(kept, fmt.bits, fmt.symmetric)
        elif nm is not None and not fmt and j % nm[1] == 0:
            choose_nm(slice(j, j + nm[1]))
        q = w[:, j].masked_fill(~keep[:, j], 0)
        if fmt:
            q = ref_quantize(q, s, z, fmt.bits)[1].masked_fill(~keep[:, j], 0)  # type: ignore[arg-type]
        d = hinv[j, j]
        w[:, j + 1 :] -= ((w[:, j] - q) / d)[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / d
        w[:, j] = q
    return w, keep


@pytest.mark.parametrize(
    ("pattern", "sparsity", "fmt"),
    [
        ("2:4", 0.5, None),
        ("4:8", 0.5, None),
        ("1:4", 0.75, None),
        ("unstructured", 0.6, None),
        ("2:4", 0.5, IntFormat(4, 16, True)),
        ("unstructured", 0.5, IntFormat(3, 16, False)),
    ],
)
def test_sparsegpt_matches_the_obs_recursion(pattern: str, sparsity: float, fmt: IntFormat | None) -> None:
    x = _inputs(300, 64, seed=5, scale=10.0)
    h, w = _hessian(x), _weight(24, 64, seed=6)
    splits = [16, 8]  # two stacked layers: unstructured sparsity is met by each
    result = sparsegpt_prune(w, h, pattern, sparsity, fmt=fmt, block_size=32, damp=0.01, row_splits=splits)
    ref_w, ref_keep = ref_sparsegpt(w, h, pattern, sparsity, 32, 0.01, fmt, splits)
    assert _agreement(result.keep, ref_keep) >= AGREE
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-4, atol=1e-4)
    # the pattern is on the input axis: every row, every aligned group of M inputs keeps exactly N
    if pattern != "unstructured":
        n_keep, m = (int(v) for v in pattern.split(":"))
        assert bool((result.keep.reshape(24, -1, m).sum(-1) == n_keep).all())
    else:  # exactly round(sparsity * block) pruned per stacked layer and block of columns
        for rows in (slice(0, 16), slice(16, 24)):
            pruned = (~result.keep[rows]).reshape(-1, 2, 32).sum((0, 2))
            n_rows = rows.stop - rows.start
            assert pruned.tolist() == [round(n_rows * 32 * sparsity)] * 2
    assert bool((result.weight[~result.keep] == 0).all())


# ------------------------------------------------------------------------------------ Wanda reference


@pytest.mark.parametrize(
    ("pattern", "sparsity"), [("2:4", 0.5), ("unstructured", 0.5), ("unstructured", 0.3)]
)
def test_wanda_mask_is_the_papers_per_output_rule(pattern: str, sparsity: float) -> None:
    # Out != in, and input norms spread over two decades: |W_ij|·||X_j|| on the wrong axis (or the
    # comparison group taken over outputs instead of inputs) selects a different mask.
    x = _inputs(256, 48, seed=7)
    w = _weight(40, 48, seed=8)
    keep = make_mask(wanda_scores(w, x.pow(2).sum(0)), pattern, sparsity)
    score = w.double().abs() * x.double().norm(dim=0)[None, :]
    ref = torch.ones_like(keep)
    if pattern == "unstructured":
        pruned = int(48 * sparsity)  # per output row (Wanda's comparison group)
        ref.scatter_(1, score.argsort(dim=1)[:, :pruned], False)
    else:
        grouped = score.reshape(40, 12, 4)
        ref = ref.reshape(40, 12, 4).scatter(2, grouped.argsort(dim=2)[..., :2], False).reshape(40, 48)
    assert torch.equal(keep, ref)


# ------------------------------------------------------------------------------------- EoRA reference


def ref_eckart_young(delta: torch.Tensor, h: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Best rank-r AB in the metric tr(D H Dᵀ), via the Cholesky factor H = L Lᵀ (so the metric is
    ||D L||_F²): AB = [ΔW L]_r L⁻¹; the optimal error is the tail Σ_{i>r} σ_i(ΔW L)²."""
    lower = torch.linalg.cholesky(h.double())
    u, s, vh = torch.linalg.svd(delta.double() @ lower, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    ab = torch.linalg.solve_triangular(lower, best, upper=False, left=False)
    return ab, float(s[rank:].pow(2).sum())


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_eora_reaches_the_eckart_young_optimum_in_the_activation_metric(rank: int) -> None:
    x = _inputs(400, 48, seed=9, scale=5.0)
    h = _hessian(x)
    w = _weight(32, 48, seed=10)
    _, w_rtn = ref_rtn(w, IntFormat(3, 16, True))
    delta = (w.double() - w_rtn).float()
    a, b = eora_factors(delta, h, rank, damp=1e-9)
    ab = a.double() @ b.double()
    ref_ab, optimum = ref_eckart_young(delta, h, rank)
    error = _objective(delta, ab.float(), h)
    assert error == pytest.approx(optimum, rel=1e-4)
    assert error < _objective(delta, torch.zeros_like(delta), h)
    torch.testing.assert_close(ab, ref_ab, rtol=1e-4, atol=1e-5 * float(ref_ab.abs().max()))


# -------------------------------------------------------------------------------------- AWQ reference


def test_awq_scale_search_matches_a_token_level_reference() -> None:
    x = _inputs(512, 64, seed=11)
    x[:, :4] *= 20  # a few salient channels: AWQ's case
    weights = [_weight(24, 64, seed=12), _weight(16, 64, seed=13)]
    fmt, grid = IntFormat(3, 16, True), 10
    s, alpha, error = search_scale(_hessian(x), weights, x.abs().mean(0), fmt, grid)
    w = torch.cat(weights).double()
    xd = x.double()
    y_norm = float((xd @ w.T).pow(2).sum())
    errors = []
    for step in range(grid):  # α on [0, 1): s = mean|x|^α, normalised by sqrt(max·min)
        a = step / grid
        cand = x.abs().mean(0).double().clamp(min=1e-4).pow(a)
        cand = cand / (cand.max() * cand.min()).sqrt()
        _, w_q = ref_rtn((w * cand).float(), fmt)
        errors.append(float((xd @ (w_q / cand - w).T).pow(2).sum()) / y_norm)
    best = min(range(grid), key=errors.__getitem__)
    assert alpha == pytest.approx(best / grid) and alpha > 0
    assert error == pytest.approx(errors[best], rel=1e-3)
    ref_s = x.abs().mean(0).double().pow(alpha)
    torch.testing.assert_close(s.double(), ref_s / (ref_s.max() * ref_s.min()).sqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_clip_search_matches_a_token_level_reference(symmetric: bool) -> None:
    x = _inputs(256, 40, seed=14)  # 40 = 16 + 16 + 8: a partial last group
    w = _weight(12, 40, seed=15)
    w[0, 3] = 8.0  # an outlier worth clipping
    fmt, grid, max_shrink = IntFormat(3, 16, symmetric), 20, 0.5
    clipped = search_clip(_hessian(x), w, fmt, grid, max_shrink)
    ref = w.clone()
    for start in range(0, 40, 16):
        cols = slice(start, start + 16)
        wg, xg = w[:, cols], x[:, cols].double()
        for r in range(12):
            best, best_err = wg[r], math.inf
            hi, lo = float(wg[r].max()), float(wg[r].min())
            amax = max(abs(hi), abs(lo))
            for step in range(int(grid * max_shrink) + 1):
                ratio = 1 - step / grid
                cand = (
                    wg[r].clamp(-amax * ratio, amax * ratio)
                    if symmetric
                    else wg[r].clamp(lo * ratio, hi * ratio)
                )
                _, q = ref_rtn(cand[None], IntFormat(3, 0, symmetric))
                err = float((xg @ (wg[r].double() - q[0])).pow(2).sum())
                if err < best_err * (1 - 1e-9):
                    best, best_err = cand, err
            ref[r, cols] = best
    # (the clip bounds differ in their last float32 bit: amax·ratio is rounded differently here)
    close = torch.isclose(clipped, ref, rtol=1e-6, atol=0)
    assert float(close.double().mean()) >= AGREE
    assert not torch.equal(clipped, w)


# --------------------------------------------------------------------------------- FP grid references


def ref_fp_round(x: torch.Tensor, e: int, m: int, bias: float) -> torch.Tensor:
    """LLM-FP4's quantizer, literally: clip to ±Qmax, p = max(1, floor(log2|x| + b)), v = 2^(p-m-b),
    xq = v·round(x / v); Qmax = (2 - 2^-m)·2^(2^e - 1 - b)."""
    x = x.double()
    qmax = (2 - 2.0**-m) * 2.0 ** (2**e - 1 - bias)
    x = x.clamp(-qmax, qmax)
    p = torch.floor(torch.log2(x.abs().clamp(min=1e-300)) + bias).clamp(min=1)
    v = torch.exp2(p - m - bias)
    return v * torch.round(x / v)


@pytest.mark.parametrize(("e", "m"), [(3, 0), (2, 1), (1, 2), (4, 3), (5, 2)])
def test_fp_rounding_is_llm_fp4s_formula(e: int, m: int) -> None:
    g = torch.Generator().manual_seed(16)
    b0 = 2 ** (e - 1) - 1
    grid = fpgrid.positive_grid(e, m).double()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: both round half to even on the float32 mantissa
    x = torch.cat([
        torch.randn(4000, generator=g) * fpgrid.max_value(e, m) / 2,
        torch.exp2(torch.rand(2000, generator=g) * 2 * (b0 + 3) - (b0 + 3)) * torch.sign(torch.randn(2000)),
        mids.float(), -mids.float(), grid.float(), torch.tensor([0.0, 1e9, -1e9, 1e-30]),
    ]).float()  # fmt: skip
    assert torch.equal(fpgrid.round_to_grid(x, e, m).double(), ref_fp_round(x, e, m, b0))
    # the grid itself is the formula's set of values, and codes round-trip
    assert torch.equal(grid, ref_fp_round(grid, e, m, b0).unique())
    assert fpgrid.max_value(e, m) == float(grid.max())
    values = fpgrid.round_to_grid(x, e, m)
    assert torch.equal(fpgrid.decode(fpgrid.encode(values, e, m), e, m), values)


@pytest.mark.parametrize(("e", "m"), [(3, 0), (2, 1), (1, 2)])
def test_fp_bias_and_scale_are_the_papers(e: int, m: int) -> None:
    qmax = torch.tensor([0.01, 0.7, 3.0, 250.0])
    bias = fpgrid.bias_for_max(e, m, qmax)
    expected = 2**e - torch.log2(qmax.double()) + math.log2(2 - 2.0**-m) - 1
    torch.testing.assert_close(bias.double(), expected, rtol=0, atol=1e-6)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(17)) * qmax
    for k in range(4):  # quantizing with bias b = the literal formula; its grid tops out at Qmax
        ours = fpgrid.quantize_with_bias(x[:, k], bias[k], e, m).double()
        torch.testing.assert_close(ours, ref_fp_round(x[:, k], e, m, float(bias[k])), rtol=1e-5, atol=0)
        assert float(fpgrid.quantize_with_bias(torch.tensor([1e9]), bias[k], e, m)) == pytest.approx(
            float(qmax[k]), rel=1e-5
        )


def test_block_fp4_scales_follow_the_specs() -> None:
    w = torch.randn(6, 80, generator=torch.Generator().manual_seed(18)) * torch.logspace(-3, 1, 80)
    wb, valid = fpgrid.blocks(w, 32)  # 80 = 32 + 32 + 16: partial last block
    # MX v1.0: X = 2^(floor(log2 amax) - emax_elem), emax_elem = 2 for E2M1
    amax = torch.where(valid, wb.abs(), torch.zeros(())).amax(-1).double()
    expected = torch.floor(torch.log2(amax)) - 2
    assert torch.equal(torch.log2(fpgrid.e8m0_decode(fpgrid.e8m0_scales(wb, valid))).double(), expected)
    # NVFP4 (ModelOpt): global = amax / (6·448); block = e4m3(amax_block / 6 / global)
    wb, valid = fpgrid.blocks(w, 16)
    block, glob = fpgrid.nvfp4_scales(wb, valid)
    amax16 = wb.abs().amax(-1).double()
    ref_glob = float(w.abs().max()) / (6 * 448)
    assert float(glob) == pytest.approx(ref_glob, rel=1e-6)
    ref_block = (amax16 / 6 / ref_glob).clamp(min=2.0**-9).float().to(torch.float8_e4m3fn)
    assert _agreement(block.float(), ref_block.float()) >= AGREE


@pytest.mark.parametrize(("e", "m"), [(2, 1), (3, 0), (1, 2)])
def test_pre_shifted_activation_bias_is_per_channel_bias_rho_plus_shift(e: int, m: int) -> None:
    """LLM-FP4's pre-shifted exponent bias: channel j quantized with bias ρ + c_j, c_j = clamp(round(b_j) -
    round(ρ), 0, 2^e - 1), ρ = min_j b_j; and the GEMM on the ρ grid with W·2^-c equals it exactly."""
    from trtcompress.passes.llmfp4 import make_act

    x = _inputs(64, 24, seed=25) * torch.logspace(-2, 1, 24)
    b = fpgrid.bias_for_max(e, m, x.abs().amax(0))
    rho = float(b.min()) + 0.3
    act = make_act(("e3m0", "e2m1", "e1m2")[[(3, 0), (2, 1), (1, 2)].index((e, m))], rho, b)
    c = (torch.round(b.double()) - round(rho)).clamp(0, 2**e - 1)
    assert torch.equal(act.shift.double(), c)
    ref = torch.stack([ref_fp_round(x[:, j], e, m, rho + float(c[j])) for j in range(24)], 1)
    torch.testing.assert_close(act.fake_quantize(x).double(), ref, rtol=1e-6, atol=0)
    w = _weight(8, 24, seed=26)
    gemm = act.gemm_operand(x).double() @ (w.double() / torch.exp2(c)).T
    expected = ref @ w.double().T  # (float32 operands: cancellation leaves ~1e-7 absolute)
    torch.testing.assert_close(gemm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_llmfp4_weight_search_is_the_exhaustive_argmin_of_the_direct_output_error() -> None:
    x = _inputs(128, 32, seed=19)
    w = _weight(10, 32, seed=20) * 0.1
    w[:, 0] *= 20
    y = x @ w.T
    grid, e, m = 24, 2, 1
    choice = search_weight(w, x.T @ x, x.T @ y, "e2m1", grid, "max", stride=1)
    xd, yd = x.double(), y.double()
    row_max = w.abs().amax(1).double()
    gmax = fpgrid.max_value(e, m)
    # candidates: Qmax = rowmax·2^-δ, δ evenly in [-0.25, 3]; the stored fp16 scale s = Qmax / grid max
    best_err = torch.full((10,), math.inf, dtype=F64)
    best_scale = torch.zeros(10, dtype=F64)
    for delta in torch.linspace(-0.25, 3.0, grid).double():
        scale = (row_max * 2.0**-delta / gmax).to(torch.float16).double()
        b = (2 ** (e - 1) - 1) - torch.log2(scale)  # the bias that scale stands for
        wq = torch.stack([ref_fp_round(w[k], e, m, float(b[k])) for k in range(10)])
        err = (yd - xd @ wq.T).pow(2).sum(0)
        better = err < best_err * (1 - 1e-9)
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    assert _agreement(choice.scales.double(), best_scale) >= 0.9  # near-ties between candidates aside
    # the reported per-row error is the direct one minus the constant ||y_k||²
    s = choice.scales.double()
    wq = torch.stack([ref_fp_round(w[k], e, m, float(1 - torch.log2(s[k]))) for k in range(10)])
    direct = (yd - xd @ wq.T).pow(2).sum(0)
    torch.testing.assert_close(choice.error.double() + yd.pow(2).sum(0), direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(direct, best_err, rtol=1e-3, atol=1e-6)
    assert candidate_biases(torch.zeros(()), 3, "max").tolist() == pytest.approx([-0.25, 1.375, 3.0])


# ---------------------------------------------------------------------------------- structured refit


def test_structured_refit_is_the_damped_least_squares_solution() -> None:
    x = _inputs(300, 40, seed=21)
    w = _weight(12, 40, seed=22)
    keep = torch.tensor(sorted(torch.randperm(40, generator=torch.Generator().manual_seed(23))[:25].tolist()))
    damp = 0.05
    h = _hessian(x)
    new = refit_columns(w, h, keep, damp)
    # argmin_W' (2/n)||X Wᵀ - X_K W'ᵀ||² + λ||W' - W_K||², λ = damp·mean(diag H_KK): stacked lstsq
    xd, wd = x.double(), w.double()
    lam = damp * float(h.double()[keep][:, keep].diagonal().mean())
    c = math.sqrt(2 / x.shape[0])
    a = torch.cat([c * xd[:, keep], math.sqrt(lam) * torch.eye(len(keep), dtype=F64)])
    rhs = torch.cat([c * xd @ wd.T, math.sqrt(lam) * wd[:, keep].T])
    ref = torch.linalg.lstsq(a, rhs).solution.T
    torch.testing.assert_close(new.double(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- integer grid (RTN)


@pytest.mark.parametrize(
    ("bits", "group", "sym"), [(4, 16, True), (3, 16, False), (8, 0, True), (2, 32, False)]
)
def test_round_to_nearest_matches_the_format_definition(bits: int, group: int, sym: bool) -> None:
    w = _weight(10, 72, seed=24) * torch.logspace(-2, 1, 72)  # 72 = partial last group for 16/32
    codes, scales, zeros = intgrid.quantize_groups(w, bits, group, sym)
    ref_codes, ref_deq = ref_rtn(w, IntFormat(bits, group, sym))
    assert _agreement(codes.double(), ref_codes) >= AGREE
    deq = intgrid.dequantize_groups(codes, scales, zeros, bits, group).double()
    assert float((deq - ref_deq).abs().max()) <= float(scales.float().max()) * 1.001


# --------------------------------------------------------------- through the engine, on the tiny model


def _layer0_attention_input(model: torch.nn.Module, calib: torch.Tensor) -> torch.Tensor:
    """The tokens q/k/v of layer 0 read on `calib` (the same before and after compression: first layer)."""
    seen: list[torch.Tensor] = []
    q_proj = model.model.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=calib)
    finally:
        hook.remove()
    x = torch.cat(seen)
    return x.reshape(-1, x.shape[-1]).float()


def _run_on_layer0(tiny_model_dir, make_pass) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    from trtcompress.compressed import compressed_linears
    from trtcompress.models import load_model
    from trtcompress.passes.base import PassContext
    from trtcompress.passes.engine import run_sequential

    model = load_model(str(tiny_model_dir), log=lambda m: None).model
    calib = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    x = _layer0_attention_input(model, calib)
    prefix = "model.layers.0.self_attn."
    dense = {
        n: model.get_submodule(prefix + n).weight.detach().clone() for n in ("q_proj", "k_proj", "v_proj")
    }
    run_sequential(model, [make_pass()], PassContext(calibration=calib))
    states = {
        name.removeprefix(prefix): m.state for name, m in compressed_linears(model) if name.startswith(prefix)
    }
    return dense, states, x


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_wanda_pass_masks_layer0_as_the_reference(tiny_model_dir, pattern: str) -> None:
    from trtcompress.passes.wanda import WandaConfig, WandaPass

    dense, states, x = _run_on_layer0(tiny_model_dir, lambda: WandaPass(WandaConfig(pattern=pattern)))
    for name in ("q_proj", "k_proj", "v_proj"):
        w = dense[name]
        score = w.double().abs() * x.double().norm(dim=0)[None, :]
        ref = make_mask(score, pattern, 0.5)  # the selection rule is tested on its own above
        assert torch.equal(states[name].mask.dense(), ref), name


def test_gptq_pass_quantizes_layer0_as_the_reference(tiny_model_dir) -> None:
    from trtcompress.passes.gptq import GPTQConfig, GPTQPass

    cfg = GPTQConfig(bits=3, group_size=32, symmetric=False, act_order=True)  # default clip_shrink 0.5
    dense, states, x = _run_on_layer0(tiny_model_dir, lambda: GPTQPass(cfg))
    h = _hessian(x.double())
    for name in ("q_proj", "k_proj", "v_proj"):
        codes, _ = ref_gptq(dense[name], h, cfg.format, True, cfg.damp, cfg.clip_shrink)
        assert _agreement(states[name].quantized.codes().double(), codes) >= AGREE, name


def test_sparsegpt_pass_prunes_layer0_as_the_reference(tiny_model_dir) -> None:
    from trtcompress.passes.sparsegpt import SparseGPTConfig, SparseGPTPass

    dense, states, x = _run_on_layer0(
        tiny_model_dir, lambda: SparseGPTPass(SparseGPTConfig(pattern="2:4", dtype="float32"))
    )
    h = _hessian(x.double())
    w = torch.cat([dense[n] for n in ("q_proj", "k_proj", "v_proj")])
    ref_w, ref_keep = ref_sparsegpt(w, h, "2:4", 0.5, 128, 0.01)
    row = 0
    for name in ("q_proj", "k_proj", "v_proj"):
        rows = slice(row, row + dense[name].shape[0])
        row = rows.stop
        assert _agreement(states[name].mask.dense(), ref_keep[rows]) >= AGREE, name
        torch.testing.assert_close(states[name].weight().double(), ref_w[rows], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- one real SmolLM2 layer


@pytest.mark.slow
@pytest.mark.model
def test_gptq_sparsegpt_eora_on_a_real_smollm2_layer(smollm2_dir) -> None:
    """Layer 0's q_proj of SmolLM2-135M on its real inputs (RMS-normed token embeddings; 576 inputs =
    4 x 128 + 64, a partial last group): GPTQ and SparseGPT 2:4 agree with the references and GPTQ beats
    RTN on the layer-output objective; EoRA reaches the Eckart-Young optimum."""
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        ids = torch.randint(0, 49152, (1024,), generator=torch.Generator().manual_seed(0))
        emb = f.get_slice("model.embed_tokens.weight")
        x = torch.stack([emb[int(i) : int(i) + 1][0] for i in ids]).float()
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").float()
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()[:48]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm
    h = _hessian(x)
    fmt = IntFormat(3, 128, True)
    for act_order in (False, True):
        result = gptq_quantize(w, h, fmt, act_order=act_order, clip_shrink=0.0)
        codes, _ = ref_gptq(w, h, fmt, act_order, 0.01)
        assert _agreement(result.codes.double(), codes) >= AGREE
        w_hat = intgrid.dequantize_groups(result.codes, result.scales, None, 3, 128)
        _, w_rtn = ref_rtn(w, fmt)
        assert _objective(w, w_hat, h) < 0.8 * _objective(w, w_rtn, h)
    result = sparsegpt_prune(w, h, "2:4")
    ref_w, ref_keep = ref_sparsegpt(w, h, "2:4", 0.5, 128, 0.01)
    assert _agreement(result.keep, ref_keep) >= AGREE
    torch.testing.assert_close(result.weight.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert bool((result.keep.reshape(48, -1, 4).sum(-1) == 2).all())
    delta = (w.double() - w_rtn).float()
    a, b = eora_factors(delta, h, 16, damp=1e-9)
    _, optimum = ref_eckart_young(delta, h.double() + 1e-9 * h.diagonal().mean() * torch.eye(576), 16)
    assert _objective(delta, (a @ b), h) == pytest.approx(optimum, rel=1e-3)
