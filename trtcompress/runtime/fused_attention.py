"""Decode attention read straight from the paged cache by one kernel launch per layer: the fused
GEAR/KIVI kernel for 2- and 4-bit codes, `paged_attention.py` for the fp16 codec.

A decode step's token attends to the sequence's committed tokens (compressed blocks, fp16 tail, sink
tokens: what `plugins/gear_attention` reads without materializing K and V) and to its own exact key and
value, which are not in the cache yet. The kernel returns the attention over the committed tokens with
its softmax normaliser lse = log Σ exp(scale·q·k); the token's own score s joins it exactly:

    out = out_cache · (1 - w) + v_own · w,   w = exp(s) / (exp(lse) + exp(s)) = sigmoid(s - lse)

Used by `BatchedModel` for decode tokens on CUDA (and on CPU with `TRTCOMPRESS_GEAR_TRITON=1` under
`TRITON_INTERPRET=1`, which is how the tests run it), when the cache's codec is one a kernel reads.
Both kernels give a sequence the same result whatever batch it runs in (one program per sequence and
KV head, blocks in order), which the batched torch path cannot promise on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from trtcompress.kv.paged import PagedKVCache
from trtcompress.plugins.gear_attention.reference import GearLayout, layout_for_codec


def _power_of_two(n: int, minimum: int = 16) -> bool:
    return n >= minimum and n & (n - 1) == 0


def _is_fp16(cache: PagedKVCache) -> bool:
    from trtcompress.kv.scalar import FP16Codec

    return isinstance(cache.codec, FP16Codec)


def fused_decode_supported(cache: PagedKVCache) -> bool:
    """Whether a kernel reads this cache, on CUDA (or with `TRTCOMPRESS_GEAR_TRITON=1`, interpreted on
    CPU): KIVI / GEAR codes of 2 or 4 bits in blocks of one key group of a power-of-two size (the GEAR
    kernel's token tile: a group of 48 made it fail at the first decode step), or fp16 blocks of a
    power-of-two size >= 16; a head dim that is a power of two >= 16 (a tile of the kernels)."""
    from trtcompress.kv.gear import GearCodec
    from trtcompress.kv.kivi import KiviCodec

    codec = cache.codec
    on_cuda = cache.tails["k"].device.type == "cuda"
    if not (on_cuda or os.environ.get("TRTCOMPRESS_GEAR_TRITON") == "1") or not _power_of_two(cache.head_dim):
        return False
    if _is_fp16(cache):
        return _power_of_two(cache.block_size)
    readable = isinstance(codec, KiviCodec | GearCodec) and codec.bits in (2, 4)
    return readable and codec.group == cache.block_size and _power_of_two(cache.block_size, minimum=1)


@dataclass(frozen=True)
class FusedDecodeInputs:
    """What the kernel needs of a step's decode sequences besides the layer's pools: the same for every
    layer of the step (block tables change only between steps), so built once per step."""

    seq_ids: list[int]
    block_table: torch.Tensor
    num_blocks: torch.Tensor
    tail_lens: torch.Tensor
    slots: torch.Tensor
    layout: GearLayout | None  # None: the fp16 codec


def decode_layout(cache: PagedKVCache) -> GearLayout | None:
    """What the fused GEAR/KIVI kernel reads of this cache's blocks (None: the fp16 paged kernel)."""
    return None if _is_fp16(cache) else layout_for_codec(cache.codec, cache.head_dim, cache.sink_tokens)


def fused_decode_inputs(cache: PagedKVCache, seq_ids: list[int], device: torch.device) -> FusedDecodeInputs:
    table, lengths = cache.block_table(seq_ids)
    num_blocks = lengths // cache.block_size
    return FusedDecodeInputs(
        seq_ids,
        table.to(device),
        num_blocks.to(device),
        (lengths - num_blocks * cache.block_size).to(device),
        cache.tail_slots(seq_ids).to(device),
        decode_layout(cache),
    )


def fused_decode_attention(
    cache: PagedKVCache,
    layer: int,
    inputs: FusedDecodeInputs,
    q: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one decode token per sequence of `inputs`: q `(B, Hq, D)`, its own K/V `(B, H, D)`,
    over the committed cache plus that token; `(B, Hq, D)` float32."""
    sinks = {}
    if cache.sink_tokens:
        sinks = {"k_sink": cache.sinks["k"][layer], "v_sink": cache.sinks["v"][layer]}
    if inputs.layout is None:
        out, lse = _fp16_attention(cache, layer, inputs, q, scale, sinks)
    else:
        out, lse = _gear_attention(cache, layer, inputs, q, scale, sinks)
    bsz, hq, dim = q.shape
    h = k_own.shape[1]
    own = (q.float().view(bsz, h, hq // h, dim) * k_own.float()[:, :, None]).sum(-1).view(bsz, hq) * scale
    w = torch.sigmoid(own - lse)[..., None]  # the token's share of the softmax over cache + itself
    v_rows = v_own.float()[:, :, None].expand(bsz, h, hq // h, dim).reshape(bsz, hq, dim)  # GQA heads
    return out * (1 - w) + v_rows * w


def _fp16_attention(cache, layer, inputs, q, scale, sinks):
    from trtcompress.runtime.paged_attention import paged_fp16_decode

    k_pool, v_pool = cache.pools["k"]["data"][layer], cache.pools["v"]["data"][layer]
    return paged_fp16_decode(
        q, k_pool, v_pool, cache.tails["k"][layer], cache.tails["v"][layer], inputs.block_table,
        inputs.num_blocks, inputs.tail_lens, inputs.slots, scale, **sinks,
    )  # fmt: skip


def _gear_attention(cache, layer, inputs, q, scale, sinks):
    from trtcompress.plugins.gear_attention.kernel import gear_attention_triton

    return gear_attention_triton(
        q.float(),
        {name: pool[layer] for name, pool in cache.pools["k"].items()},
        {name: pool[layer] for name, pool in cache.pools["v"].items()},
        cache.tails["k"][layer],
        cache.tails["v"][layer],
        inputs.block_table,
        inputs.num_blocks,
        inputs.tail_lens,
        inputs.slots,
        inputs.layout,
        scale,
        return_lse=True,
        **sinks,
    )
