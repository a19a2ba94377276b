"""GEAR: X ≈ Q(X - S) + S + A·Bᵀ (KIVI backbone + exact outliers + low-rank residual).

- S, outliers, removed before quantization so they do not widen their group's range, stored as the
  exact fp16 correction `x - deq(q)` plus a compact index:
  - `outlier_scope="group"` (the paper): the `k` largest and `k` smallest of every quantization group
    (64 tokens of a key channel, or 64 channels of a value token), uint8 index *within the group*
    (the reference code stores int32 indices into the whole tensor: 4x the index bytes);
  - `outlier_scope="block"` (default): a budget of `outlier_ratio` of the block's elements, chosen by
    distance from their group's mean in group standard deviations, int16 index within the block.
    Heavy-tailed groups give up several outliers and Gaussian ones none: on SmolLM2 this buys far
    more fidelity per byte than a fixed count per group.
- Q: asymmetric `bits`-bit min/max quantization of the rest (2**bits - 1 steps).
- A·Bᵀ: rank-r approximation, per block and KV head, of the residual `X - deq(Q) - S` by power
  (subspace) iteration, factors stored as int8 with one fp16 scale per column (or fp16).
- `range_search` (default on): the quantization range of each group is the min/max of its non-outlier
  elements shrunk about its midpoint by the factor (of `range_search` steps from 1 down to `range_min`)
  that minimizes the group's squared error — at 2 bits min/max wastes most of the 4 levels on the tails.
  The range is still stored as an fp16 scale and minimum: decoding (and the attention kernel) is unchanged.
Compact metadata is what lets GEAR beat KIVI at equal bytes: every field is counted in `layout`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Literal

import torch

from trtcompress.kv.codec import Fields, FieldSpec, Kind, register_codec
from trtcompress.kv.kivi import KiviCodec, named_bits_factory, value_group
from trtcompress.kv.quant import FP8_MAX, FP16_MAX, absmax_scale, search_params


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Unset:
    """The default of `key_rank` / `value_rank`: not given, so `rank` (or 2) sets them."""

    def __repr__(self) -> str:
        return "rank"


_UNSET: Any = _Unset()
DEFAULT_RANK = 2
MAX_POWER_ITERS = 100  # subspace iteration converges in a few steps (default 3)
MAX_RANGE_SEARCH = 256  # candidate ranges per group (default 11)


def outliers_per_side(ratio: float, group: int) -> int:
    """Top and bottom `ratio / 2` of a group each, at least one when `ratio > 0`."""
    return math.ceil(ratio / 2 * group - 1e-9) if ratio > 0 else 0


@lru_cache(maxsize=16)
def _start_basis(dim: int, rank: int) -> torch.Tensor:
    # A fixed random start makes compression deterministic (same block -> same bytes).
    gen = torch.Generator().manual_seed(0x6EA2)
    return torch.randn(dim, rank, generator=gen)


def power_iteration(residual: torch.Tensor, rank: int, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of `residual` (..., T, D): A (..., T, r) orthonormal, B (..., D, r), R ≈ A Bᵀ."""
    basis = _start_basis(residual.shape[-1], rank).to(residual.device)
    b = basis.expand(*residual.shape[:-2], *basis.shape)
    for _ in range(iters):
        a = torch.linalg.qr(residual @ b).Q  # orthonormalize every loop: subspace iteration, stable
        b = residual.transpose(-1, -2) @ a
    return a, b


def _kernel_order(idx: torch.Tensor, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
    """The order block-scope outliers are stored in: keys (flat index channel * tokens + token) by
    token, values (token * dim + channel) by channel, i.e. by the axis the decode-attention kernel
    scatters them to (it sums each run of equal tokens / channels with prefix sums). The order changes
    no decompressed value: every index occurs once."""
    if kind == "k":
        return (idx % tokens) * dim + idx // tokens
    return (idx % dim) * tokens + idx // dim


# How block-scope outlier corrections are stored: fp16 (exact to fp16), or one byte each with one fp16
# scale per block and head (int8: symmetric, scale = max |c| / 127; fp8: E4M3, scale = max |c| / 448,
# about 3% relative error on every correction whatever its size). The fused decode-attention kernel
# reads all three; the torch op and the TensorRT plugin read fp16 only.
OUTLIER_DTYPES = {
    "fp16": (torch.float16, 0.0),
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, FP8_MAX),
}


def _fp16_saturated(correction: torch.Tensor) -> torch.Tensor:
    """fp16 corrections clamped to the fp16 range: an outlier and its group's other end can lie more
    than 65504 apart even in an fp16 cache (x - deq would round to inf, and inf spread as NaN)."""
    fp16_max = torch.finfo(torch.float16).max
    return correction.clamp(-fp16_max, fp16_max).to(torch.float16)


def _store_corrections(correction: torch.Tensor, outlier_dtype: str) -> tuple[Fields, torch.Tensor]:
    """(fields, the corrections as decompression will reproduce them) of float corrections `(..., n)`."""
    dtype, qmax = OUTLIER_DTYPES[outlier_dtype]
    if not qmax:
        stored = _fp16_saturated(correction)
        return {"out_val": stored}, stored.float()
    # a block with no correction at all (a zero head) gets a nonzero scale; a subnormal scale must not
    # push |y| past the code range
    scale = absmax_scale(correction.abs().amax(-1, keepdim=True), qmax)
    y = (correction / scale.float()).clamp_(-qmax, qmax)
    codes = torch.floor(y + 0.5).to(dtype) if dtype == torch.int8 else y.to(dtype)
    return {"out_val": codes, "out_scale": scale}, codes.float() * scale.float()


def outlier_values(fields: Fields) -> torch.Tensor:
    """The stored outlier corrections as float32 values."""
    values = fields["out_val"].float()
    return values * fields["out_scale"].float() if "out_scale" in fields else values


def _int_columns(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer codes in [-qmax, qmax] with one fp16 absmax scale per column (last dim)."""
    scale = absmax_scale(x.abs().amax(-2), qmax)  # unused rank slots are zero columns
    return torch.floor(x / scale.float()[..., None, :] + 0.5).clamp_(-qmax, qmax), scale


def _pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7] `(..., 2n, r)` -> uint8 `(..., n, r)`: rows 2i (low nibble) and 2i + 1 (high),
    each stored as code + 8."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """`_pack_int4_rows` inverted: float codes `(..., 2n, r)`."""
    lo, hi = (packed & 0xF).float() - 8, (packed >> 4).float() - 8
    return torch.stack([lo, hi], -2).flatten(-3, -2)


def low_rank_factors(fields: Fields) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Dequantized low-rank factors (A, B) of stored fields (fp16, int8 or packed int4 codes with
    column scales), or None without a low-rank term."""
    if "lr_a" not in fields:
        return None
    a, b = fields["lr_a"], fields["lr_b"]
    if a.dtype == torch.uint8:  # int4 codes, two per byte
        a, b = unpack_int4_rows(a), unpack_int4_rows(b)
    a, b = a.float(), b.float()
    if "lr_a_scale" in fields:
        a = a * fields["lr_a_scale"].float()[..., None, :]
        b = b * fields["lr_b_scale"].float()[..., None, :]
    return a, b


class GearCodec(KiviCodec):
    def __init__(
        self,
        bits: int = 2,
        group: int = 64,
        outlier_ratio: float = 0.02,
        rank: int | None = None,
        prefill_rank: int | None = None,
        key_outlier_ratio: float | None = None,
        value_outlier_ratio: float | None = None,
        key_rank: int = _UNSET,
        value_rank: int = _UNSET,
        power_iters: int = 3,
        factor_dtype: Literal["int8", "int4", "fp16"] = "int8",
        outlier_scope: Literal["group", "block"] = "group",
        key_outlier_std_power: float = 1.0,
        value_outlier_std_power: float = 1.0,
        range_search: int = 0,
        range_min: float = 0.4,
        outlier_dtype: Literal["fp16", "int8", "fp8"] = "fp16",
        scale_dtype: Literal["fp16", "fp8"] = "fp16",
        name: str | None = None,
    ) -> None:
        super().__init__(bits, group, scale_dtype)
        if outlier_scope not in ("block", "group"):
            raise ValueError(f"outlier_scope must be 'block' or 'group', got {outlier_scope!r}")
        if outlier_dtype not in OUTLIER_DTYPES:
            raise ValueError(f"outlier_dtype must be one of {sorted(OUTLIER_DTYPES)}, got {outlier_dtype!r}")
        if outlier_dtype != "fp16" and outlier_scope != "block":
            raise ValueError(
                "outlier_dtype int8 / fp8 (one scale per block and head) needs outlier_scope: block"
            )
        self.outlier_dtype = outlier_dtype
        if group > 256:
            raise ValueError("GEAR stores outlier indices as uint8: the group size must be <= 256")
        self.outlier_ratio = {
            "k": outlier_ratio if key_outlier_ratio is None else key_outlier_ratio,
            "v": outlier_ratio if value_outlier_ratio is None else value_outlier_ratio,
        }
        for kind, ratio in self.outlier_ratio.items():
            # group scope keeps the top and bottom k of a group: 2k < group leaves a backbone to quantize
            # a number first: a quoted "0.02" in a recipe failed with "'<=' not supported between ..."
            if (
                not _real(ratio)
                or not 0 <= ratio < 1
                or (outlier_scope == "group" and 2 * outliers_per_side(ratio, group) >= group)
            ):
                raise ValueError(
                    f"{'key' if kind == 'k' else 'value'} outlier ratio must be in [0, 1) and leave "
                    f"part of each group quantized, got {ratio!r}"
                )
        # `rank` sets both; keys get more by default in gear-4bit (their error costs more on SmolLM2). A
        # `key_rank` / `value_rank` given with it overrides it for its kind, as `key_outlier_ratio` does
        # `outlier_ratio` (it used to be ignored: rank 2 with value_rank 0 stored a value rank of 2).
        both = DEFAULT_RANK if rank is None else rank
        self.rank = {
            "k": both if key_rank is _UNSET else key_rank,
            "v": both if value_rank is _UNSET else value_rank,
        }
        for what, value in (
            ("key rank", self.rank["k"]),
            ("value rank", self.rank["v"]),
            ("prefill_rank", prefill_rank),
        ):
            if (value is not None or what != "prefill_rank") and (not _whole(value) or value < 0):
                raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
        if prefill_rank is not None and not any(self.rank.values()):
            raise ValueError(
                "prefill_rank sizes a low-rank residual: set rank (or key_rank / value_rank) > 0"
            )
        # bounded: each step is a QR of every block and head (a huge count hung the first compressed block)
        if any(self.rank.values()) and (not _whole(power_iters) or not 1 <= power_iters <= MAX_POWER_ITERS):
            raise ValueError(
                f"power_iters must be a whole number in [1, {MAX_POWER_ITERS}] with a low-rank residual, "
                f"got {power_iters!r}"
            )
        # A prefill block may use more rank; its slot (and every block's) is sized for the larger.
        self.prefill_rank = prefill_rank
        self.power_iters = power_iters
        if factor_dtype not in ("int8", "int4", "fp16"):
            raise ValueError(f"factor_dtype must be int8, int4 or fp16, got {factor_dtype!r}")
        self.factor_dtype = factor_dtype
        self.outlier_scope = outlier_scope
        self.std_power = {"k": key_outlier_std_power, "v": value_outlier_std_power}
        for what, power in self.std_power.items():  # else a crash (or NaN ranks) at the first block
            if not _real(power):
                kind = "key" if what == "k" else "value"
                raise ValueError(f"{kind}_outlier_std_power must be a finite number, got {power!r}")
        # a whole number of steps (a fraction, or a bool, would fail in torch.linspace at the first block)
        # and bounded: the search holds every candidate of every group at once (10**6 steps asked for
        # 49 GB at the first compressed block, a traceback mid-evaluation)
        if not _whole(range_search) or not 0 <= range_search <= MAX_RANGE_SEARCH:
            raise ValueError(
                f"range_search must be a whole number of steps in [0, {MAX_RANGE_SEARCH}], "
                f"got {range_search!r}"
            )
        if not _real(range_min) or not 0 < range_min <= 1:
            raise ValueError(f"range_min must be a number in (0, 1], got {range_min!r}")
        self.range_search, self.range_min = range_search, range_min
        self.name = name or f"gear-{bits}bit"

    def _slot_rank(self, kind: Kind) -> int:
        if self.prefill_rank is None or not self.rank[kind]:
            return self.rank[kind]
        return max(self.rank[kind], self.prefill_rank)

    def check_block(self, tokens: int, dim: int | None = None) -> None:
        super().check_block(tokens, dim)
        # what would otherwise fail (or go wrong silently) at the first compressed block, mid-evaluation
        # or mid-serving: in-group outlier indices past a uint8, a rank beyond the block's residual's
        if dim is not None and self.outlier_scope == "group" and self._k("v", tokens, dim):
            gs = value_group(dim, self.group)  # the whole head where the group does not divide it
            if gs > 256:
                raise ValueError(
                    f"codec {self.name}: value groups of {gs} channels (head dim {dim}, not a multiple of "
                    f"group {self.group}) do not fit outlier_scope: group's uint8 in-group indices"
                )
        rank = max(self._slot_rank(kind) for kind in ("k", "v"))
        limit = tokens if dim is None else min(tokens, dim)
        if rank > limit:
            shape = f"{tokens} tokens" + ("" if dim is None else f" x {dim} channels")
            raise ValueError(
                f"codec {self.name}: a low-rank residual of rank {rank} exceeds what a block of {shape} holds"
            )

    def _k(self, kind: Kind, tokens: int, dim: int) -> int:
        _, _, gs = self._geometry(kind, tokens, dim)
        return outliers_per_side(self.outlier_ratio[kind], gs)

    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        fields = super().layout(kind, tokens, dim)
        rows, n, gs = self._geometry(kind, tokens, dim)
        k = self._k(kind, tokens, dim)
        if k and self.outlier_scope == "block":
            budget = self._block_budget(kind, tokens, dim)
            fields["out_val"] = FieldSpec((budget,), OUTLIER_DTYPES[self.outlier_dtype][0])
            fields["out_idx"] = FieldSpec((budget,), torch.int16 if rows * n <= 2**15 else torch.int32)
            if self.outlier_dtype != "fp16":
                fields["out_scale"] = FieldSpec((1,), torch.float16)
        elif k:
            fields["out_val"] = FieldSpec((rows, n // gs * 2 * k), torch.float16)
            fields["out_idx"] = FieldSpec((rows, n // gs * 2 * k), torch.uint8)
        r = self._slot_rank(kind)
        if r:
            if self.factor_dtype == "int8":
                fields |= {
                    "lr_a": FieldSpec((tokens, r), torch.int8),
                    "lr_a_scale": FieldSpec((r,), torch.float16),
                    "lr_b": FieldSpec((dim, r), torch.int8),
                    "lr_b_scale": FieldSpec((r,), torch.float16),
                }
            elif self.factor_dtype == "int4":  # two codes per byte, along tokens / channels
                if tokens % 2 or dim % 2:
                    raise ValueError(
                        f"int4 low-rank factors need an even block ({tokens}) and head dim ({dim})"
                    )
                fields |= {
                    "lr_a": FieldSpec((tokens // 2, r), torch.uint8),
                    "lr_a_scale": FieldSpec((r,), torch.float16),
                    "lr_b": FieldSpec((dim // 2, r), torch.uint8),
                    "lr_b_scale": FieldSpec((r,), torch.float16),
                }
            else:
                fields |= {
                    "lr_a": FieldSpec((tokens, r), torch.float16),
                    "lr_b": FieldSpec((dim, r), torch.float16),
                }
        return fields

    def _block_budget(self, kind: Kind, tokens: int, dim: int) -> int:
        return max(1, round(self.outlier_ratio[kind] * tokens * dim))

    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        tokens, dim = x.shape[-2:]
        grouped = self._grouped(x, kind)  # (..., rows, groups, gs)
        k = self._k(kind, tokens, dim)
        mask = None
        if k and self.outlier_scope == "block":
            return self._compress_block_scope(x, grouped, kind, phase)
        if k:
            # one sort for both ends: two topk calls can pick the same element of a tied group twice
            # (its correction then added twice); 2k < group elements are distinct
            order = grouped.argsort(dim=-1, stable=True)
            idx = torch.cat([order[..., -k:].flip(-1), order[..., :k]], -1)  # (..., rows, groups, 2k)
            mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True)
        fields, deq = self._quantize(grouped, mask)
        approx = deq
        if k:
            correction = _fp16_saturated(grouped.gather(-1, idx) - deq.gather(-1, idx))
            approx = deq.scatter_add(-1, idx, correction.float())
            fields["out_val"] = correction.flatten(-2)
            fields["out_idx"] = idx.to(torch.uint8).flatten(-2)
        return fields | self._low_rank(x, approx, kind, phase)

    def _quantize(
        self, grouped: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> tuple[Fields, torch.Tensor]:
        if not self.range_search:
            return super()._quantize(grouped, exclude)
        scale, zero = search_params(grouped, self.bits, exclude, self.range_search, self.range_min)
        return self._quantize_with(grouped, scale, zero)

    def _compress_block_scope(self, x: torch.Tensor, grouped: torch.Tensor, kind: Kind, phase: str) -> Fields:
        """Outliers chosen across the whole block (per head) by distance from their group's mean in
        group standard deviations: heavy-tailed groups give up several, Gaussian ones none."""
        tokens, dim = x.shape[-2:]
        budget = self._block_budget(kind, tokens, dim)
        mu, sd = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True) + 1e-6
        flat = grouped.flatten(-3)
        idx = ((grouped - mu).abs() / sd ** self.std_power[kind]).flatten(-3).topk(budget, -1).indices
        idx = idx.gather(-1, _kernel_order(idx, kind, tokens, dim).argsort(-1))
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True).view_as(grouped)
        fields, deq = self._quantize(grouped, mask)
        stored, correction = _store_corrections(
            flat.gather(-1, idx) - deq.flatten(-3).gather(-1, idx), self.outlier_dtype
        )
        approx = deq.flatten(-3).scatter_add(-1, idx, correction).view_as(grouped)
        fields |= stored
        fields["out_idx"] = idx.to(self.layout(kind, tokens, dim)["out_idx"].dtype)
        return fields | self._low_rank(x, approx, kind, phase)

    def _low_rank(self, x: torch.Tensor, approx: torch.Tensor, kind: Kind, phase: str) -> Fields:
        tokens, dim = x.shape[-2:]
        r, slot = self._phase_rank(kind, phase), self._slot_rank(kind)
        if not slot:
            return {}
        a = torch.zeros(*x.shape[:-2], tokens, slot, device=x.device)
        b = torch.zeros(*x.shape[:-2], dim, slot, device=x.device)
        if r:
            residual = x.float() - self._ungroup(approx, kind)
            a[..., :r], b[..., :r] = power_iteration(residual, r, self.power_iters)
        return self._store_factors(a, b)

    def _phase_rank(self, kind: Kind, phase: str) -> int:
        # prefill_rank may also be below the decode rank: the slot holds the larger, prefill uses its own
        if phase == "prefill" and self.prefill_rank is not None and self.rank[kind]:
            return self.prefill_rank
        return self.rank[kind]

    def _store_factors(self, a: torch.Tensor, b: torch.Tensor) -> Fields:
        qmax = {"fp16": 1, "int4": 7, "int8": 127}[self.factor_dtype]
        # B carries the residual's magnitude (A is orthonormal): a column of B past what fp16 (or an fp16
        # column scale) holds, as near the fp16 limits, would be stored as inf (NaN in every product);
        # it moves its excess into A's column instead (every other column is left exactly as it is)
        excess = (b.abs().amax(-2, keepdim=True) / (qmax * FP16_MAX)).clamp_min(1.0)
        a, b = a * excess, b / excess
        if self.factor_dtype == "fp16":
            return {"lr_a": a.to(torch.float16), "lr_b": b.to(torch.float16)}
        (qa, sa), (qb, sb) = _int_columns(a, qmax), _int_columns(b, qmax)
        if self.factor_dtype == "int4":
            return {
                "lr_a": _pack_int4_rows(qa),
                "lr_a_scale": sa,
                "lr_b": _pack_int4_rows(qb),
                "lr_b_scale": sb,
            }
        return {"lr_a": qa.to(torch.int8), "lr_a_scale": sa, "lr_b": qb.to(torch.int8), "lr_b_scale": sb}

    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        grouped = self._dequantize(fields, kind, tokens, dim)
        if "out_val" in fields and self.outlier_scope == "block":
            flat = grouped.flatten(-3).scatter_add(-1, fields["out_idx"].long(), outlier_values(fields))
            grouped = flat.view_as(grouped)
        elif "out_val" in fields:
            shape = (*grouped.shape[:-1], -1)
            idx = fields["out_idx"].long().reshape(shape)
            grouped = grouped.scatter_add(-1, idx, fields["out_val"].float().reshape(shape))
        x = self._ungroup(grouped, kind)
        ab = low_rank_factors(fields)
        if ab is not None:
            x = x + ab[0] @ ab[1].transpose(-1, -2)
        return x

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "outlier_ratio": self.outlier_ratio,
            # a fixed count per group only with outlier_scope: group; a block-scope budget is shared by
            # the block's groups (heavy-tailed ones take several, others none), so no per-group count
            "outliers_per_group": {
                kind: 2 * outliers_per_side(r, self.group) for kind, r in self.outlier_ratio.items()
            }
            if self.outlier_scope == "group"
            else None,
            "rank": self.rank,
            "slot_rank": {kind: self._slot_rank(kind) for kind in ("k", "v")},
            "power_iters": self.power_iters,
            "factor_dtype": self.factor_dtype,
            "outlier_scope": self.outlier_scope,
            "outlier_std_power": self.std_power,
            "range_search": self.range_search,
            "range_min": self.range_min,
            "outlier_dtype": self.outlier_dtype,
        }


def _gear_factory(bits: int, **defaults: Any):
    def factory(**options: Any) -> GearCodec:
        # An explicit `rank` / `outlier_ratio` overrides the per-kind defaults it stands for.
        drop = {f"{kind}_rank" for kind in ("key", "value") if "rank" in options}
        drop |= {f"{kind}_outlier_ratio" for kind in ("key", "value") if "outlier_ratio" in options}
        if options.get("outlier_scope") == "group":  # the paper's in-group outliers keep fp16 values
            drop.add("outlier_dtype")
        kept = {k: v for k, v in defaults.items() if k not in drop}
        return named_bits_factory(GearCodec, bits, **kept)(**options)

    factory.codec_class = GearCodec
    return factory


# Defaults, measured on SmolLM2-135M (BENCHMARKS.md, "KV-cache compression"): a block-wide outlier
# budget (heavy-tailed groups give up several outliers, Gaussian ones none), keys' outliers ranked by
# |x - mean| / sqrt(std), and an MSE range search for every group. gear-2bit spends 3% of key and 1.5%
# of value elements on outliers and no low-rank residual: 3.04 bits/element in a full block, all
# metadata counted. A key rank-1 residual (the previous default) bought a little perplexity but less
# GSM8K KL than its 0.13 bits/element buy KIVI, which put that point above the KIVI curve; rank 0
# lies below it on both. gear-4bit keeps a lighter budget (1%, key rank 1): at 4 bits the backbone
# error is small and outlier bytes cost more than they buy. Both store the outlier corrections as fp8
# E4M3 with one fp16 scale per block and head: one byte per outlier instead of two (gear-2bit 3.22 ->
# 3.04 bits/element) at the same perplexity and KL; of the 16 GEAR settings of the frontier, 9 lie
# above the KIVI curve with fp16 corrections, 4 with fp8. gear-2bit also stores its group scales and
# zeros as fp8 with one fp16 maximum per block and head (`scale_dtype: fp8`, 3.04 -> 2.80 bits/element:
# 20.3% -> 18.8% of the fp16 bytes for ppl 1.0362 -> 1.0397); with it every 2-bit setting of the
# frontier lies below the KIVI curve, 32-token groups included (their scales cost twice as much).
# gear-4bit keeps fp16 scales: at 4 bits fp8 ones cost perplexity (1.0036 against 1.0021).
GEAR2_DEFAULTS = {
    "outlier_scope": "block",
    "outlier_dtype": "fp8",
    "scale_dtype": "fp8",
    "key_outlier_ratio": 0.03,
    "value_outlier_ratio": 0.015,
    "key_outlier_std_power": 0.5,
    "key_rank": 0,
    "value_rank": 0,
    "range_search": 11,
}
GEAR4_DEFAULTS = {
    "outlier_scope": "block",
    "outlier_dtype": "fp8",
    "outlier_ratio": 0.01,
    "key_outlier_std_power": 0.5,
    "key_rank": 1,
    "value_rank": 0,
    "range_search": 11,
}
register_codec("gear-2bit")(_gear_factory(2, **GEAR2_DEFAULTS))
register_codec("gear-4bit")(_gear_factory(4, **GEAR4_DEFAULTS))
