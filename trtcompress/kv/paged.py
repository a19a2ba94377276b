"""A paged, compressed KV cache: fixed-size token blocks per sequence, stored by a KVCodec.

Storage (all preallocated, so `bytes_allocated` is the sum of real tensor sizes):
- one pool tensor per codec field and per K/V: `(layers, num_blocks, H, *field_shape)`; a physical
  block id indexes the same slot in every layer (one block table per sequence serves all layers);
- one fp16 *tail* slot per sequence: `(layers, max_seqs, H, block_size, D)` for K and V. It holds the
  tokens of the block being filled (GEAR's streaming buffer); when it holds `block_size` tokens they
  are compressed, one chunk at a time, into a physical block;
- optionally one fp16 *sink* slot per sequence: `(layers, max_seqs, H, sink_tokens, D)`, the first
  `sink_tokens` tokens of the sequence kept exact for its whole life (the attention sink: on SmolLM2 the
  first token takes a large share of every later token's attention, so its quantization error costs
  far more than any other token's). The first block is compressed with those rows replaced by the
  mean of the block's other tokens (so they do not widen the quantization ranges of the rest), and
  every reader (gather, the fused attention kernel) takes them from the sink slot instead.

A forward step for a set of sequences: `reserve(seq, n)` (allocates every block the step will
fill, all-or-nothing, so a full cache fails before anything changed), then per layer
`write(layer, seq, k, v)`, then `commit(seq, n)`. `free(seq)` returns a finished sequence's blocks.
This is the interface the continuous-batching runtime drives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtcompress.errors import CompressionError
from trtcompress.kv.codec import Fields, Kind, KVCodec


class NonFiniteKVError(CompressionError, ValueError):
    """Keys or values with inf or NaN reached a block to compress (a broken or overflowing model): a
    one-line error from the CLI, as non-finite weights or activations are, not a traceback."""


class CacheFullError(RuntimeError):
    """Not enough free blocks (or sequence slots) for the request; nothing was changed."""


@dataclass
class SequenceState:
    slot: int  # tail slot
    blocks: list[int] = field(default_factory=list)  # physical block ids, in token order
    length: int = 0  # committed tokens


@dataclass(frozen=True)
class TokenWrites:
    """Where one new token per sequence goes in the tails: `PagedKVCache.token_writes`."""

    seq_ids: list[int]  # row i of a batch is the token of seq_ids[i]
    slots: torch.Tensor  # (B,) tail slot of each sequence
    offsets: torch.Tensor  # (B,) position of the token in its tail
    sinks: list[tuple[int, int, int]]  # (row, slot, position) of tokens that are sink tokens
    full: list[tuple[int, str]]  # (seq_id, phase) of the sequences whose tail the token fills


class PagedKVCache:
    def __init__(
        self,
        codec: KVCodec,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 64,
        max_seqs: int = 8,
        device: torch.device | str = "cpu",
        sink_tokens: int = 0,
    ) -> None:
        codec.check_block(block_size, head_dim)
        if not 0 <= sink_tokens < block_size:
            raise ValueError(f"sink_tokens must be in [0, block_size), got {sink_tokens}")
        self.sink_tokens = sink_tokens
        self.codec = codec
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.block_size, self.num_blocks, self.max_seqs = block_size, num_blocks, max_seqs
        self.pools: dict[Kind, Fields] = {
            kind: {
                name: torch.zeros(
                    num_layers, num_blocks, num_kv_heads, *spec.shape, dtype=spec.dtype, device=device
                )
                for name, spec in codec.layout(kind, block_size, head_dim).items()
            }
            for kind in ("k", "v")
        }
        tail_shape = (num_layers, max_seqs, num_kv_heads, block_size, head_dim)
        self.tails: dict[Kind, torch.Tensor] = {
            kind: torch.zeros(tail_shape, dtype=torch.float16, device=device) for kind in ("k", "v")
        }
        sink_shape = (num_layers, max_seqs, num_kv_heads, sink_tokens, head_dim)
        self.sinks: dict[Kind, torch.Tensor] = {
            kind: torch.zeros(sink_shape, dtype=torch.float16, device=device) for kind in ("k", "v")
        }
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self.seqs: dict[int, SequenceState] = {}

    # ------------------------------------------------------------------------------------- sizes

    @property
    def block_bytes(self) -> int:
        """Bytes of one physical block, K and V, all layers."""
        per_layer = sum(
            self.codec.block_bytes(kind, self.block_size, self.head_dim, self.num_kv_heads)
            for kind in ("k", "v")
        )
        return per_layer * self.num_layers

    @property
    def token_bytes_fp16(self) -> int:
        """Bytes of one token in an fp16 cache (K and V, all layers): the reference."""
        return 2 * 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def bytes_allocated(self) -> int:
        tensors = [t for pool in self.pools.values() for t in pool.values()]
        tensors += list(self.tails.values()) + list(self.sinks.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_at(self, length: int) -> int:
        """Bytes one sequence of `length` committed tokens holds: its compressed blocks, the fp16
        tokens of its tail and its fp16 sink tokens (counted from the start, while they are also in
        the tail: the sink slot holds them all along)."""
        n_full = length // self.block_size
        fp16_tokens = length - n_full * self.block_size + min(length, self.sink_tokens)
        return n_full * self.block_bytes + fp16_tokens * self.token_bytes_fp16

    def bytes_used(self, seq_id: int | None = None) -> int:
        """Bytes holding data: compressed blocks, fp16 tail tokens and fp16 sink tokens."""
        seqs = self.seqs.values() if seq_id is None else [self.seqs[seq_id]]
        return sum(self.bytes_at(s.length) for s in seqs)

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    def can_reserve(self, seq_ids: list[int], n_new: int) -> bool:
        """Whether `reserve(seq_ids, n_new)` would succeed (a scheduler's admission check)."""
        return sum(self.blocks_needed(s, n_new) for s in dict.fromkeys(seq_ids)) <= len(self._free_blocks)

    def blocks_needed(self, seq_id: int, n_new: int) -> int:
        """Blocks to allocate before `n_new` more tokens: none where a reservation not yet committed
        already holds them."""
        seq = self.seqs[seq_id]
        return max(0, (seq.length + n_new) // self.block_size - len(seq.blocks))

    # -------------------------------------------------------------------------------- lifecycle

    def add_sequence(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        if not self._free_slots:
            raise CacheFullError(f"all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        # No stale rows of the slot's previous sequence: attention masks them, but a masked inf there
        # would still make 0 * inf = NaN in another sequence's output.
        for kind in ("k", "v"):
            self.tails[kind][:, slot] = 0
        self.seqs[seq_id] = SequenceState(slot=slot)

    def reserve(self, seq_ids: list[int] | int, n_new: int) -> None:
        """Allocate the blocks that appending `n_new` tokens to each sequence will fill (all or nothing)."""
        ids = [seq_ids] if isinstance(seq_ids, int) else list(dict.fromkeys(seq_ids))  # each sequence once
        needed = [self.blocks_needed(s, n_new) for s in ids]
        if sum(needed) > len(self._free_blocks):
            raise CacheFullError(f"need {sum(needed)} blocks, {len(self._free_blocks)} free")
        for s, n in zip(ids, needed, strict=True):
            self.seqs[s].blocks += [self._free_blocks.pop() for _ in range(n)]

    def write(self, layer: int, seq_id: int, k: torch.Tensor, v: torch.Tensor, phase: str = "decode") -> None:
        """Append `k`, `v` `(H, n, D)` at the sequence's committed length (before `commit`)."""
        seq, bs = self.seqs[seq_id], self.block_size
        n = k.shape[-2]
        if (seq.length + n) // bs > len(seq.blocks):
            raise RuntimeError(f"sequence {seq_id}: call reserve() before writing {n} tokens")
        pos, done = seq.length, 0
        while done < n:
            offset = pos % bs
            take = min(bs - offset, n - done)
            for kind, x in (("k", k), ("v", v)):
                self.tails[kind][layer, seq.slot, :, offset : offset + take] = x[:, done : done + take]
                if pos < self.sink_tokens:
                    n_sink = min(self.sink_tokens - pos, take)
                    self.sinks[kind][layer, seq.slot, :, pos : pos + n_sink] = x[:, done : done + n_sink]
            pos, done = pos + take, done + take
            if pos % bs == 0:  # the tail is full: compress it into its block
                self._compress_tail(layer, seq, pos, phase)

    def _compress_tail(self, layer: int, seq: SequenceState, pos: int, phase: str) -> None:
        """Compress the sequence's full tail (tokens up to `pos`, a multiple of the block size) into
        its block."""
        block = seq.blocks[pos // self.block_size - 1]
        for kind in ("k", "v"):
            x = self.tails[kind][layer, seq.slot].float()
            if not torch.isfinite(x).all():  # one inf would spread through a block's shared scales
                raise NonFiniteKVError(
                    f"non-finite {'keys' if kind == 'k' else 'values'} in layer {layer}, block "
                    f"{pos // self.block_size - 1} (tokens {pos - self.block_size}-{pos - 1}) of a sequence: "
                    "the model produced inf or NaN (fp16 overflow?), which no KV codec can store"
                )
            if pos == self.block_size and self.sink_tokens:  # the sink rows are read from the sink slot
                x[:, : self.sink_tokens] = x[:, self.sink_tokens :].mean(1, keepdim=True)
            fields = self.codec.compress(x, kind, phase=phase)
            for name, value in fields.items():
                self.pools[kind][name][layer, block] = value

    def token_writes(self, seq_ids: list[int], phases: list[str] | None = None) -> TokenWrites:
        """Where one new token per sequence goes (see `write_tokens`): the same for every layer of a
        step, so built once per step (after `reserve`, before `commit`)."""
        bs, device = self.block_size, self.tails["k"].device
        slots, offsets, sinks, full = [], [], [], []
        for row, seq_id in enumerate(seq_ids):
            seq = self.seqs[seq_id]
            if (seq.length + 1) // bs > len(seq.blocks):
                raise RuntimeError(f"sequence {seq_id}: call reserve() before writing 1 token")
            slots.append(seq.slot)
            offsets.append(seq.length % bs)
            if seq.length < self.sink_tokens:
                sinks.append((row, seq.slot, seq.length))
            if (seq.length + 1) % bs == 0:
                full.append((seq_id, phases[row] if phases is not None else "decode"))
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return TokenWrites(list(seq_ids), as_index(slots), as_index(offsets), sinks, full)

    def write_tokens(self, layer: int, writes: TokenWrites, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` of one token per sequence for a whole decode batch: `k`, `v` `(B, H, D)`, row i the
        token of `writes.seq_ids[i]`. One indexed store per K/V; only the tokens that fill their block
        (once every `block_size` steps) or are sink tokens take a per-sequence path."""
        if k.shape[0] != len(writes.seq_ids) or v.shape[0] != len(writes.seq_ids):
            raise ValueError(f"{len(writes.seq_ids)} sequences, K/V for {k.shape[0]} / {v.shape[0]} tokens")
        self.write_token_tails(layer, writes.slots, writes.offsets, k, v)
        for kind, x in (("k", k), ("v", v)):
            for row, slot, pos in writes.sinks:
                self.sinks[kind][layer, slot, :, pos] = x[row]
        for seq_id, phase in writes.full:
            seq = self.seqs[seq_id]
            self._compress_tail(layer, seq, seq.length + 1, phase)

    def write_token_tails(
        self, layer: int, slots: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """The tail part of `write_tokens`: row i of `k`, `v` `(B, H, D)` into tail slot `slots[i]` at
        `offsets[i]`, one indexed store per K/V, no host-side decision (a CUDA graph can replay it)."""
        self.tails["k"][layer][slots, :, offsets] = k.to(torch.float16)
        self.tails["v"][layer][slots, :, offsets] = v.to(torch.float16)

    def finish_token_writes(self, writes: TokenWrites) -> None:
        """What `write_tokens` does besides the tails, for every layer at once, after the tails of all
        layers were written (`write_token_tails`): sink tokens copied from their tail position, full
        tails compressed into their blocks. Same result as `write_tokens` layer by layer: a layer's
        compression touches only that layer."""
        for _, slot, pos in writes.sinks:  # a sink token is in block 0: its tail position is `pos`
            for kind in ("k", "v"):
                self.sinks[kind][:, slot, :, pos] = self.tails[kind][:, slot, :, pos]
        for seq_id, phase in writes.full:
            seq = self.seqs[seq_id]
            for layer in range(self.num_layers):
                self._compress_tail(layer, seq, seq.length + 1, phase)

    def take_slot(self) -> int:
        """Take a tail slot out of circulation for good (no sequence gets it): a place where padding
        rows of a fixed-size decode batch (a CUDA graph's) can write without touching a sequence."""
        if not self._free_slots:
            raise CacheFullError("no free tail slot to take")
        return self._free_slots.pop()

    def commit(self, seq_id: int, n_new: int) -> None:
        self.seqs[seq_id].length += n_new

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        self._free_blocks += reversed(seq.blocks)
        self._free_slots.append(seq.slot)

    # ------------------------------------------------------------------------------------ views

    def block_fields(self, layer: int, kind: Kind, blocks: list[int] | torch.Tensor) -> Fields:
        ids = torch.as_tensor(blocks, dtype=torch.long, device=self.tails[kind].device)
        return {name: pool[layer].index_select(0, ids) for name, pool in self.pools[kind].items()}

    def gather(self, layer: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values as the codec reproduces them, float32 `(H, length, D)`."""
        n_full = self.seqs[seq_id].length // self.block_size
        kb, vb = self.gather_blocks(layer, seq_id, 0, n_full)
        kt, vt = self.gather_tail(layer, seq_id)
        return torch.cat([kb, kt], 1), torch.cat([vb, vt], 1)

    def gather_blocks(
        self, layer: int, seq_id: int, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompressed blocks `start..stop-1` of a sequence, float32 `(H, (stop - start) * block, D)`."""
        return self.gather_block_ranges(layer, [(seq_id, start, stop)])[0]

    def gather_block_ranges(
        self, layer: int, ranges: list[tuple[int, int, int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`gather_blocks` for several `(seq_id, start, stop)` at once: one codec call per K/V for all
        their blocks. Per range, float32 K and V `(H, (stop - start) * block, D)`, the first
        `sink_tokens` rows of a range that starts at block 0 taken from the sink slot."""
        bs, h, d = self.block_size, self.num_kv_heads, self.head_dim
        ranges = [(seq_id, start, max(start, stop)) for seq_id, start, stop in ranges]
        blocks = self.decompress_block_ranges(layer, ranges)
        out: list[list[torch.Tensor]] = [[] for _ in ranges]
        for x in blocks:
            parts = x.split([stop - start for _, start, stop in ranges])
            for row, ((_, start, stop), part) in enumerate(zip(ranges, parts, strict=True)):
                out[row].append(part.permute(1, 0, 2, 3).reshape(h, (stop - start) * bs, d))
        return [(k, v) for k, v in out]

    def decompress_block_ranges(
        self, layer: int, ranges: list[tuple[int, int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of every `(seq_id, start, stop)` range in one codec call per K/V, concatenated in
        range order: float32 K and V `(blocks, H, block, D)`, the sink rows of a sequence's block 0 taken
        from its sink slot."""
        bs, h, d = self.block_size, self.num_kv_heads, self.head_dim
        ids = [b for seq_id, start, stop in ranges for b in self.seqs[seq_id].blocks[start:stop]]
        out = []
        for kind in ("k", "v"):
            if ids:
                x = self.codec.decompress(self.block_fields(layer, kind, ids), kind, bs, d)
            else:
                x = self.tails[kind].new_zeros(0, h, bs, d, dtype=torch.float32)
            if self.sink_tokens:
                first = 0
                for seq_id, start, stop in ranges:
                    if start == 0 and stop > 0:
                        x[first, :, : self.sink_tokens] = self.sinks[kind][
                            layer, self.seqs[seq_id].slot
                        ].float()
                    first += max(0, stop - start)
            out.append(x)
        return out[0], out[1]

    def decompress_blocks_into(
        self, layer: int, ids: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor
    ) -> None:
        """Physical blocks `ids` (repeats allowed) decompressed into float32 `k_out` / `v_out` (any strides,
        `len(ids)` blocks of `(H, block, D)`), one codec call per K/V. Sink rows are left as the block
        holds them: a caller that reads a sequence's block 0 takes them from `sinks`."""
        for kind, out in (("k", k_out), ("v", v_out)):
            fields = self.block_fields(layer, kind, ids)
            self.codec.decompress_into(fields, kind, self.block_size, self.head_dim, out)

    def gather_tail(self, layer: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp16 tail (committed tokens of the block being filled), float32 `(H, n, D)`."""
        seq = self.seqs[seq_id]
        n = seq.length % self.block_size
        return self.tails["k"][layer, seq.slot, :, :n].float(), self.tails["v"][
            layer, seq.slot, :, :n
        ].float()

    def block_table(self, seq_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids padded with -1 `(B, max_blocks)` int32, committed lengths `(B,)` int32)."""
        seqs = [self.seqs[s] for s in seq_ids]
        width = max([len(s.blocks) for s in seqs] + [1])
        table = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for row, s in enumerate(seqs):
            table[row, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        return table, torch.tensor([s.length for s in seqs], dtype=torch.int32)

    def tail_slots(self, seq_ids: list[int]) -> torch.Tensor:
        return torch.tensor([self.seqs[s].slot for s in seq_ids], dtype=torch.int32)
