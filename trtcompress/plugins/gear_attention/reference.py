"""Reference decode attention over a paged KIVI/GEAR cache (plain torch; the definition of correct).

One layer's cache is the `PagedKVCache` pools sliced at that layer: for keys and for values a dict
of fields `(num_blocks, H, ...)` named as in `GearCodec.layout` (codes, scale, zero, out_val,
out_idx, lr_a, lr_a_scale, lr_b, lr_b_scale), plus the fp16 tails `(slots, H, T, D)`.

For one query q of a sequence with compressed blocks K̂ = deq(Kq) + S + A·Bᵀ:
    q·K̂ᵀ = q·deq(Kq)ᵀ + q·Sᵀ + (q·B)·Aᵀ        P·V̂ = P·deq(Vq) + P·S + (P·A)·Bᵀ
The tail (tokens of the block being filled) is attended to in fp16, and so are the first `sink`
tokens of a sequence once its first block is compressed (from the cache's sink slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtcompress.kv.gear import low_rank_factors, outlier_values
from trtcompress.kv.kivi import group_scale_zero
from trtcompress.kv.quant import unpack_bits

Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GearLayout:
    """Static shape of the compressed blocks (what the kernel is specialized on)."""

    bits: int
    block: int = 64  # tokens per block = key token group
    group: int = 64  # value channel group
    outliers: tuple[int, int] = (0, 0)  # outliers per group, keys / values (top + bottom)
    rank: tuple[int, int] = (0, 0)  # low-rank slot rank, keys / values
    int8_factors: bool = True
    outlier_scope: str = "group"  # "block": `outliers` is a per-block budget with flat int16 indices
    sink: int = 0  # exact fp16 sink tokens at the start of every sequence (PagedKVCache.sink_tokens)
    outlier_dtype: str = "fp16"  # block-scope outlier values: fp16, or one byte (int8 / fp8) + `out_scale`
    int4_factors: bool = False  # low-rank factor codes packed two per byte (with int8_factors' scales)
    scales_fp8: bool = False  # group scales and zeros as fp8 with fp16 maxima `scale_max` / `zero_max`

    @property
    def outlier_scaled(self) -> bool:
        """Outlier values stored in one byte, with one fp16 `out_scale` per block and head."""
        return self.outlier_dtype != "fp16"


def layout_for_codec(codec, head_dim: int = 64, sink: int = 0) -> GearLayout:
    """The GearLayout of a KiviCodec or GearCodec (blocks of `codec.group` tokens)."""
    from trtcompress.kv.gear import GearCodec, outliers_per_side

    if isinstance(codec, GearCodec):
        block_scope = codec.outlier_scope == "block"
        outliers = tuple(
            (codec._block_budget(k, codec.group, head_dim) if block_scope else
             2 * outliers_per_side(codec.outlier_ratio[k], codec.group))
            if outliers_per_side(codec.outlier_ratio[k], codec.group) else 0
            for k in "kv"
        )  # fmt: skip
        return GearLayout(
            bits=codec.bits,
            block=codec.group,
            group=codec.group,
            outliers=outliers,
            outlier_scope=codec.outlier_scope,
            rank=tuple(codec._slot_rank(k) for k in "kv"),
            int8_factors=codec.factor_dtype in ("int8", "int4"),  # integer codes with column scales
            int4_factors=codec.factor_dtype == "int4",
            sink=sink,
            outlier_dtype=codec.outlier_dtype,
            scales_fp8=codec.scale_dtype == "fp8",
        )
    return GearLayout(
        bits=codec.bits,
        block=codec.group,
        group=codec.group,
        sink=sink,
        scales_fp8=codec.scale_dtype == "fp8",
    )


def dequant_keys(f: Fields, lay: GearLayout) -> torch.Tensor:
    """Key blocks `(n, H, T, D)` from their fields (per-channel groups over the block's tokens)."""
    t = lay.block
    codes = unpack_bits(f["codes"], lay.bits, t).float()  # (n, H, D, T)
    scale, zero = (s.float() for s in group_scale_zero(f))
    x = codes * scale + zero  # scale/zero (n, H, D, 1)
    if lay.outliers[0] and lay.outlier_scope == "block":  # flat index = channel * T + token
        x = x.flatten(-2).scatter_add(-1, f["out_idx"].long(), outlier_values(f)).view_as(x)
    elif lay.outliers[0]:
        x = x.scatter_add(-1, f["out_idx"].long(), f["out_val"].float())
    x = x.transpose(-1, -2)
    if lay.rank[0]:
        a, b = low_rank_factors(f)
        x = x + a @ b.transpose(-1, -2)
    return x


def dequant_values(f: Fields, lay: GearLayout, dim: int) -> torch.Tensor:
    """Value blocks `(n, H, T, D)` (per-token groups of `group` channels, or of the whole head when
    the head dim is not a multiple of the group: the codec's `value_group`)."""
    from trtcompress.kv.kivi import value_group

    codes = unpack_bits(f["codes"], lay.bits, dim).float()  # (n, H, T, D)
    gs = value_group(dim, lay.group)
    ng = dim // gs
    scale, zero = (s.float() for s in group_scale_zero(f))
    x = codes.unflatten(-1, (ng, gs)) * scale[..., None] + zero[..., None]
    if lay.outliers[1] and lay.outlier_scope == "block":  # flat index = token * D + channel
        x = x.flatten(-3).scatter_add(-1, f["out_idx"].long(), outlier_values(f)).view_as(x)
    elif lay.outliers[1]:
        idx = f["out_idx"].long().unflatten(-1, (ng, -1))
        x = x.scatter_add(-1, idx, f["out_val"].float().unflatten(-1, (ng, -1)))
    x = x.flatten(-2)
    if lay.rank[1]:
        a, b = low_rank_factors(f)
        x = x + a @ b.transpose(-1, -2)
    return x


def gear_attention_reference(
    q: torch.Tensor,
    k_fields: Fields,
    v_fields: Fields,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    block_table: torch.Tensor,
    num_blocks: torch.Tensor,
    tail_lens: torch.Tensor,
    slots: torch.Tensor,
    layout: GearLayout,
    scale: float,
    k_sink: torch.Tensor | None = None,
    v_sink: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q `(B, Hq, D)` -> attention output `(B, Hq, D)` float32 (GQA: Hq a multiple of H).
    With `layout.sink`, `k_sink`/`v_sink` `(S, H, sink, D)` replace the first block's first rows.
    `return_lse`: also the softmax normaliser log Σ exp(scale·q·k) of each query row `(B, Hq)`."""
    bsz, hq, dim = q.shape
    h = k_tail.shape[1]
    out = torch.empty(bsz, hq, dim)
    lse = torch.empty(bsz, hq)
    for b in range(bsz):
        ids = block_table[b, : int(num_blocks[b])].long()
        slot, n_tail = int(slots[b]), int(tail_lens[b])
        ks = dequant_keys({n: t[ids] for n, t in k_fields.items()}, layout).transpose(0, 1)
        vs = dequant_values({n: t[ids] for n, t in v_fields.items()}, layout, dim).transpose(0, 1)
        ks, vs = ks.reshape(h, -1, dim), vs.reshape(h, -1, dim)
        if layout.sink and len(ids):
            ks[:, : layout.sink] = k_sink[slot].float()
            vs[:, : layout.sink] = v_sink[slot].float()
        k = torch.cat([ks, k_tail[slot, :, :n_tail].float()], 1)
        v = torch.cat([vs, v_tail[slot, :, :n_tail].float()], 1)
        qg = q[b].float().view(h, hq // h, dim)
        scores = qg @ k.transpose(1, 2) * scale
        out[b] = (torch.softmax(scores, -1) @ v).reshape(hq, dim)
        lse[b] = torch.logsumexp(scores, -1).reshape(hq)
    return (out, lse) if return_lse else out
