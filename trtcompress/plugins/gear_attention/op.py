"""`torch.ops.trtcompress.gear_attention`: decode attention over one layer of a paged KIVI/GEAR cache.

CUDA tensors run the fused Triton kernel; CPU tensors run `reference.py` (set
`TRTCOMPRESS_GEAR_TRITON=1` with `TRITON_INTERPRET=1` to run the Triton kernel on CPU instead).
Absent optional fields (outliers, low-rank factors of codecs without them, the sink slots of a cache
without sink tokens) are passed as None.
"""

from __future__ import annotations

import os

import torch

from trtcompress.kv.paged import PagedKVCache
from trtcompress.plugins.gear_attention.reference import (
    GearLayout,
    gear_attention_reference,
    layout_for_codec,
)

FIELDS = ("codes", "scale", "zero", "out_val", "out_idx", "lr_a", "lr_a_scale", "lr_b", "lr_b_scale")
Opt = torch.Tensor | None


def _unflatten(tensors: list[Opt]) -> tuple[dict, dict]:
    k = {n: t for n, t in zip(FIELDS, tensors[:9], strict=True) if t is not None}
    v = {n: t for n, t in zip(FIELDS, tensors[9:], strict=True) if t is not None}
    return k, v


def _check_shapes(
    q: torch.Tensor,
    k_tail: torch.Tensor,
    block_table: torch.Tensor,
    num_blocks: torch.Tensor,
    tail_lens: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """q must be `(B, Hq, D)` with Hq a multiple of the cache's H heads and D its head dim (the kernel
    would attend a silently wrong GQA grouping otherwise), and the per-sequence tensors must have B rows
    (the kernel reads row b of each for query b: past their end for a larger q)."""
    heads, dim = k_tail.shape[1], k_tail.shape[-1]
    if q.dim() != 3 or q.shape[1] % heads or q.shape[2] != dim:
        raise ValueError(
            f"q must be (B, Hq, {dim}) with Hq a multiple of the cache's {heads} KV heads, "
            f"got {tuple(q.shape)}"
        )
    rows = {
        "block_table": (block_table.dim() == 2, block_table),
        "num_blocks": (num_blocks.dim() == 1, num_blocks),
        "tail_lens": (tail_lens.dim() == 1, tail_lens),
        "slots": (slots.dim() == 1, slots),
    }
    for name, (ok, t) in rows.items():
        if not ok or t.shape[0] != q.shape[0]:
            raise ValueError(
                f"{name} must have one row per query sequence (q has B = {q.shape[0]}), "
                f"got shape {tuple(t.shape)}"
            )


@torch.library.custom_op("trtcompress::gear_attention", mutates_args=())
def gear_attention(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_out_val: Opt,
    k_out_idx: Opt,
    k_lr_a: Opt,
    k_lr_a_scale: Opt,
    k_lr_b: Opt,
    k_lr_b_scale: Opt,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_out_val: Opt,
    v_out_idx: Opt,
    v_lr_a: Opt,
    v_lr_a_scale: Opt,
    v_lr_b: Opt,
    v_lr_b_scale: Opt,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    k_sink: Opt,
    v_sink: Opt,
    block_table: torch.Tensor,
    num_blocks: torch.Tensor,
    tail_lens: torch.Tensor,
    slots: torch.Tensor,
    bits: int,
    block: int,
    group: int,
    out_k: int,
    out_v: int,
    rank_k: int,
    rank_v: int,
    int8_factors: bool,
    sink: int,
    scale: float,
    k_out_scale: Opt = None,
    v_out_scale: Opt = None,
    k_scale_max: Opt = None,
    k_zero_max: Opt = None,
    v_scale_max: Opt = None,
    v_zero_max: Opt = None,
) -> torch.Tensor:
    _check_shapes(q, k_tail, block_table, num_blocks, tail_lens, slots)
    k, v = _unflatten(
        [
            k_codes,
            k_scale,
            k_zero,
            k_out_val,
            k_out_idx,
            k_lr_a,
            k_lr_a_scale,
            k_lr_b,
            k_lr_b_scale,
            v_codes,
            v_scale,
            v_zero,
            v_out_val,
            v_out_idx,
            v_lr_a,
            v_lr_a_scale,
            v_lr_b,
            v_lr_b_scale,
        ]
    )
    out_idx = k_out_idx if k_out_idx is not None else v_out_idx  # keys may have no outliers, values some
    scope = "block" if out_idx is not None and out_idx.dtype in (torch.int16, torch.int32) else "group"
    outlier_dtype = "fp16"
    if k_out_scale is not None or v_out_scale is not None:  # one-byte outlier values + block scales
        values = k_out_val if k_out_val is not None else v_out_val
        outlier_dtype = "fp8" if values is not None and values.dtype == torch.float8_e4m3fn else "int8"
    for fields, out_scale in ((k, k_out_scale), (v, v_out_scale)):
        if out_scale is not None:  # (a kind without outliers has none)
            fields["out_scale"] = out_scale
    scales_fp8 = k_scale_max is not None  # fp8 group scales and zeros with fp16 maxima
    for fields, maxima in ((k, (k_scale_max, k_zero_max)), (v, (v_scale_max, v_zero_max))):
        if scales_fp8:
            fields["scale_max"], fields["zero_max"] = maxima
    factor = k_lr_a if k_lr_a is not None else v_lr_a
    int4_factors = factor is not None and factor.dtype == torch.uint8  # two codes per byte
    layout = GearLayout(
        bits, block, group, (out_k, out_v), (rank_k, rank_v), int8_factors, scope, sink, outlier_dtype,
        int4_factors, scales_fp8,
    )  # fmt: skip
    args = (q, k, v, k_tail, v_tail, block_table, num_blocks, tail_lens, slots, layout, scale)
    if q.is_cuda or os.environ.get("TRTCOMPRESS_GEAR_TRITON") == "1":
        from trtcompress.plugins.gear_attention.kernel import gear_attention_triton

        return gear_attention_triton(*args, k_sink=k_sink, v_sink=v_sink)
    return gear_attention_reference(*args, k_sink=k_sink, v_sink=v_sink)


@gear_attention.register_fake
def _(q, *args, **kwargs) -> torch.Tensor:
    # args: the op's parameters after q (k_tail is args[18], block_table .. slots args[22:26])
    names = ("k_tail", "block_table", "num_blocks", "tail_lens", "slots")
    positions = (18, 22, 23, 24, 25)
    _check_shapes(q, *(kwargs[n] if n in kwargs else args[i] for n, i in zip(names, positions, strict=True)))
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def op_args_from_cache(
    q: torch.Tensor, cache: PagedKVCache, layer: int, seq_ids: list[int], scale: float | None = None
) -> tuple:
    """The op's flat arguments for `q` `(B, Hq, D)` (one query per sequence) over `seq_ids`' cache."""
    table, lengths = cache.block_table(seq_ids)
    num_blocks = lengths // cache.block_size
    tail_lens = lengths - num_blocks * cache.block_size
    layout = layout_for_codec(cache.codec, cache.head_dim, cache.sink_tokens)
    sink = cache.sink_tokens > 0
    fields = [cache.pools[kind].get(name) for kind in ("k", "v") for name in FIELDS]
    fields = [None if f is None else f[layer] for f in fields]
    return (
        q,
        *fields,
        cache.tails["k"][layer],
        cache.tails["v"][layer],
        cache.sinks["k"][layer] if sink else None,
        cache.sinks["v"][layer] if sink else None,
        table,
        num_blocks,
        tail_lens,
        cache.tail_slots(seq_ids),
        layout.bits,
        layout.block,
        layout.group,
        *layout.outliers,
        *layout.rank,
        layout.int8_factors,
        layout.sink,
        scale if scale is not None else cache.head_dim**-0.5,
        *(
            cache.pools[kind]["out_scale"][layer] if "out_scale" in cache.pools[kind] else None
            for kind in "kv"
        ),
        *(
            cache.pools[kind][name][layer] if name in cache.pools[kind] else None
            for kind in "kv"
            for name in ("scale_max", "zero_max")
        ),
    )


def gear_attention_from_cache(
    q: torch.Tensor, cache: PagedKVCache, layer: int, seq_ids: list[int], scale: float | None = None
) -> torch.Tensor:
    """Attention of `q` `(B, Hq, D)` (one query per sequence) over the committed cache of `seq_ids`."""
    return gear_attention(*op_args_from_cache(q, cache, layer, seq_ids, scale))
