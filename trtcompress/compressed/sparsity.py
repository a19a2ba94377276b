"""Sparsity masks of compressed linears: an exact, compact encoding with honest byte counts.

A mask is a boolean (out, in) tensor, True = weight kept. It is stored as a bitmap, 1 bit per weight,
packed LSB-first along the input dimension with the same layout as 1-bit codes (packing.py): bit j of
row r sits in byte j // 8, bit j % 8. A bitmap costs 1 bit/weight whatever the pattern; 2-bit N:M
indices (NVIDIA's 2:4 metadata) cost the same for 2:4 and more for 4:8 (12 bits per 8 weights), so the
bitmap is the compact choice for every pattern we produce. Kept values are stored without the pruned
ones (row-major, in mask order): a 2:4 fp16 layer costs 8 bits of values + 1 bit of mask per weight.

`pattern` records the structure the pass guaranteed ("2:4", "4:8", "unstructured"); N:M masks are
checked on construction (exactly N kept in every aligned group of M inputs), so an exporter that needs
hardware 2:4 can trust it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from trtcompress.compressed.packing import pack_bits, packed_length, unpack_bits

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """(n, m) for an "n:m" pattern, None for "unstructured"; raises on anything else."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise ValueError(f"sparsity pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    """Raise unless every aligned group of m inputs of every row keeps exactly n weights."""
    out_f, in_f = mask.shape
    if in_f % m:
        raise ValueError(f"an {n}:{m} mask needs in_features divisible by {m}, got {in_f}")
    kept = mask.reshape(out_f, in_f // m, m).sum(-1, dtype=torch.int16)
    if not bool((kept == n).all()):
        bad = int((kept != n).sum())
        raise ValueError(f"mask is not {n}:{m}: {bad} groups of {m} do not keep exactly {n} weights")


@functools.lru_cache(maxsize=16)
def _valid_nm_bytes(n: int, m: int) -> torch.Tensor:
    """For m dividing 8: which byte values of a bitmap hold 8/m groups that each keep exactly n bits."""
    values = torch.arange(256)
    ok = torch.ones(256, dtype=torch.bool)
    for start in range(0, 8, m):
        group = (values >> start) & ((1 << m) - 1)
        count = sum((group >> i) & 1 for i in range(m))
        ok &= count == n
    return ok


@dataclass
class SparsityMask:
    """Which weights of an (out, in) linear are kept; bitmap-packed (uint8, (out, ceil(in / 8)))."""

    bits: torch.Tensor
    in_features: int
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.bits.dtype != torch.uint8 or self.bits.dim() != 2:
            raise ValueError("a sparsity mask is a 2-D uint8 bitmap")
        if self.bits.shape[1] != packed_length(self.in_features, 1):
            raise ValueError(
                f"mask bitmap has {self.bits.shape[1]} bytes per row, expected "
                f"{packed_length(self.in_features, 1)} for {self.in_features} inputs"
            )
        self._dense: torch.Tensor | None = None
        nm = parse_nm(self.pattern)
        if nm is None:
            return
        n, m = nm
        if self.in_features % m:
            raise ValueError(f"an {n}:{m} mask needs in_features divisible by {m}, got {self.in_features}")
        if 8 % m == 0 and self.in_features % 8 == 0:  # check on the bitmap bytes: cheap, runs every forward
            if not bool(_valid_nm_bytes(n, m).to(self.bits.device)[self.bits.long()].all()):
                raise ValueError(f"mask is not {n}:{m}: some groups of {m} do not keep exactly {n} weights")
        else:
            check_nm(self.dense(), n, m)

    @classmethod
    def from_bool(cls, mask: torch.Tensor, pattern: str = "unstructured") -> SparsityMask:
        return cls(pack_bits(mask.to(torch.uint8), 1), int(mask.shape[1]), pattern)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.bits.shape[0]), self.in_features

    def dense(self) -> torch.Tensor:
        """The boolean (out, in) mask."""
        if self._dense is None:
            self._dense = _unpack_bitmap(self.bits, self.in_features)
        return self._dense

    def density(self) -> float:
        out_f, in_f = self.shape
        return float(self.dense().sum()) / max(out_f * in_f, 1)

    def meta(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "density": round(self.density(), 6)}


def compact(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept entries of an (out, in) tensor, row-major in mask order (1-D)."""
    return values[mask].contiguous()


def expand(kept: torch.Tensor, mask: torch.Tensor, fill: int | float = 0) -> torch.Tensor:
    """Inverse of `compact`: an (out, in) tensor with `kept` at the mask's positions, `fill` elsewhere."""
    if kept.dim() != 1:
        raise ValueError(f"kept values must be 1-D, got shape {tuple(kept.shape)}")
    nnz = int(mask.sum())
    if kept.numel() != nnz:
        raise ValueError(f"{kept.numel()} kept values for a mask that keeps {nnz}")
    # masked_scatter fills the True positions in row-major order: the order `compact` reads them in.
    return torch.full(tuple(mask.shape), fill, dtype=kept.dtype, device=kept.device).masked_scatter_(
        mask, kept
    )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every aligned group of m inputs (per row)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {in_f}")
    grouped = scores.reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, grouped.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of each row, pruning floor(in * sparsity) per row (Wanda's per-output rule;
    floored with a tolerance: 100 * 0.29 is 28.999... in binary, and prunes 29)."""
    in_f = scores.shape[1]
    pruned = math.floor(in_f * sparsity + 1e-9)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        keep.scatter_(1, scores.topk(pruned, dim=1, largest=False).indices, False)
    return keep


def make_mask(scores: torch.Tensor, pattern: str, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask from importance scores: N:M when `pattern` is N:M, else per-row unstructured."""
    nm = parse_nm(pattern)
    return nm_mask(scores, *nm) if nm is not None else row_mask(scores, sparsity)


def _unpack_bitmap(bits: torch.Tensor, in_features: int) -> torch.Tensor:
    """Fast path of unpack_bits(bits, 1, n).bool(): the reference forward unpacks masks every call."""
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=bits.device)
    return (bits.unsqueeze(-1) & weights).ne(0).flatten(-2)[..., :in_features]


def compact_tensors(
    tensors: dict[str, torch.Tensor], mask: SparsityMask, bits: int | None
) -> dict[str, torch.Tensor]:
    """A state's tensors with the pruned entries dropped: `weight` -> `values` (kept values, 1-D) or
    `qweight` -> `qvalues` (kept codes, packed at `bits`), plus the `mask` bitmap."""
    keep = mask.dense()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "weight":
            out["values"] = compact(tensor, keep)
        elif name == "qweight":
            assert bits is not None
            codes = unpack_bits(tensor, bits, mask.in_features)
            out["qvalues"] = pack_bits(compact(codes, keep), bits)
        else:
            out[name] = tensor
    out["mask"] = mask.bits
    return out


def expand_tensors(
    tensors: dict[str, torch.Tensor], mask: SparsityMask, bits: int | None
) -> dict[str, torch.Tensor]:
    """Inverse of `compact_tensors` (pruned values are 0, pruned codes 0: the mask zeroes them anyway)."""
    keep = mask.dense()
    out = {k: v for k, v in tensors.items() if k not in ("values", "qvalues", "mask")}
    if "values" in tensors:
        out["weight"] = expand(tensors["values"], keep)
    if "qvalues" in tensors:
        if bits is None:
            raise ValueError("quantized kept codes without a quantization format")
        codes = unpack_bits(tensors["qvalues"], bits, int(keep.sum()))  # nnz
        out["qweight"] = pack_bits(expand(codes, keep), bits)
    return out
