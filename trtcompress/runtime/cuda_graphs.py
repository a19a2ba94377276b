"""All-decode steps replayed from CUDA graphs (`deploy.cuda_graphs`).

On a GPU a decode step of a small model is a thousand small kernels (norms, projections, rotary,
attention, cache writes, MLP, 30 layers) whose launches from Python cost more than their work: on an
H200 one request decoded SmolLM2-135M at 42 ms per step, HF `generate` at 27 ms (BENCHMARKS.md). A
CUDA graph records the step once and replays it as one launch.

A graph has fixed shapes and addresses, so each batch size bucket (1, 2, 4, ... up to
`max_batch_size`) gets its own, captured the first time a step of that size runs, and a step of n
sequences runs in the smallest bucket >= n: its inputs (token ids, positions, block tables, lengths,
tail slots and write offsets) are copied into the bucket's static buffers, the rows past n are
padding that attends to nothing and writes its K/V into a tail slot no sequence owns
(`PagedKVCache.take_slot`). What a graph cannot hold runs on the host after the replay:
`PagedKVCache.finish_token_writes` (sink copies, the compression of tails that became full) and the
commit. Block tables are `max_blocks` wide (the context's blocks), so sequences that grow never need a
new graph.

Applies to steps whose every work is one decode token, on any cache a fused decode kernel reads
(`fused_decode_supported`: fp16 through the paged Triton kernel, 2/4-bit KIVI and GEAR through the
fused GEAR kernel, whose launch depends on shapes only); every other step runs `BatchedModel.forward`
as before. For a compressed cache the graph writes the new tokens into the fp16 tails, and the blocks
that fill are compressed on the host after the replay (`finish_token_writes`), as in eager steps. The graph
runs `BatchedModel.decode_all`, the same operations as the eager fused path, so a sequence's numbers
do not depend on whether its step was replayed (the GEMMs are batch-invariant, checked at start;
tested on CPU with `capture=False`, which runs the same static step eagerly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtcompress.runtime.fused_attention import FusedDecodeInputs, decode_layout
from trtcompress.runtime.scheduler import Work


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below `max_batch_size`, then `max_batch_size`: a step of n sequences pads to the
    smallest bucket >= n (at most 2x the rows, log2 graphs)."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch_size)


@dataclass
class _Static:
    """One bucket's fixed-address inputs, its output and its graph (None: run eagerly)."""

    ids: torch.Tensor
    positions: torch.Tensor
    inputs: FusedDecodeInputs
    slots: torch.Tensor
    offsets: torch.Tensor
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model, pad_slot: int, buckets: tuple[int, ...], max_blocks: int, capture: bool = True):
        if not model.fused_decode:
            raise ValueError(
                "CUDA graphs replay the fused decode kernels: they need deploy.device cuda and a KV cache "
                "one of them reads (fp16 with a power-of-two block size, or 2/4-bit KIVI/GEAR with blocks "
                "of one key group, kv_cache.block_size = the codec's group, a power of two) and a "
                "power-of-two head dim"
            )
        if capture and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the runtime runs on {model.device}")
        self.model, self.pad_slot, self.max_blocks, self.capture = model, pad_slot, max_blocks, capture
        self.buckets = tuple(sorted(buckets))
        self.static: dict[int, _Static] = {}
        self.replays = 0  # steps run from a bucket (counted for tests and benchmarks)

    def applies(self, work: list[Work]) -> bool:
        return 0 < len(work) <= self.buckets[-1] and all(w.n == 1 and w.start > 0 for w in work)

    def run(self, work: list[Work]) -> torch.Tensor:
        """`BatchedModel.forward` for an all-decode step: logits `(S, vocab)` of the works that sample."""
        cache, n = self.model.cache, len(work)
        bucket = next(b for b in self.buckets if b >= n)
        st = self.static.get(bucket) or self._build(bucket)
        seq_ids = [w.seq.seq_id for w in work]
        writes = cache.token_writes(seq_ids, [w.phase for w in work])
        table = torch.zeros(bucket, self.max_blocks, dtype=torch.int32)
        # ids, positions, full blocks, tail tokens (= where the new token goes in the tail), slot
        meta = torch.zeros(5, bucket, dtype=torch.long)
        meta[4] = self.pad_slot  # padding rows: no blocks, an empty tail, the reserved slot
        for row, w in enumerate(work):
            seq = cache.seqs[w.seq.seq_id]
            full = seq.length // cache.block_size
            table[row, :full] = torch.tensor(seq.blocks[:full], dtype=torch.int32)
            meta[:, row] = torch.tensor(
                [w.token_ids[0], w.start, full, seq.length - full * cache.block_size, seq.slot]
            )
        st.ids.copy_(meta[0])
        st.positions.copy_(meta[1])
        st.inputs.block_table.copy_(table)
        st.inputs.num_blocks.copy_(meta[2])
        st.inputs.tail_lens.copy_(meta[3])
        st.inputs.slots.copy_(meta[4])
        st.slots.copy_(meta[4])
        st.offsets.copy_(meta[3])
        if st.graph is not None:
            st.graph.replay()
            logits = st.logits
        else:
            logits = self._step(st)
        self.replays += 1
        cache.finish_token_writes(writes)
        for w in work:
            cache.commit(w.seq.seq_id, w.n)
        rows = [row for row, w in enumerate(work) if w.samples]
        return logits[rows].cpu()

    def _step(self, st: _Static) -> torch.Tensor:
        return self.model.decode_all(st.ids, st.positions, st.inputs, st.slots, st.offsets)

    def _build(self, bucket: int) -> _Static:
        """The bucket's buffers (every row padding until a step fills them) and, on CUDA, its graph:
        two eager runs on a side stream first (Triton compiles, cuBLAS picks its kernels), then the
        capture. Padding rows only ever touch the reserved slot, so neither changes a sequence."""
        dev = self.model.device
        i32 = lambda: torch.zeros(bucket, dtype=torch.int32, device=dev)  # noqa: E731
        slots = torch.full((bucket,), self.pad_slot, dtype=torch.long, device=dev)
        table = torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=dev)
        st = _Static(
            ids=torch.zeros(bucket, dtype=torch.long, device=dev),
            positions=torch.zeros(bucket, dtype=torch.long, device=dev),
            inputs=FusedDecodeInputs(
                [], table, i32(), i32(), slots.to(torch.int32), decode_layout(self.model.cache)
            ),
            slots=slots,
            offsets=torch.zeros(bucket, dtype=torch.long, device=dev),
        )
        if self.capture:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(st)
            torch.cuda.current_stream(dev).wait_stream(side)
            st.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(st.graph):  # its own memory pool: buckets replay in any order
                st.logits = self._step(st)
        self.static[bucket] = st
        return st
