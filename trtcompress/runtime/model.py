"""One forward step of many sequences at once over the paged KV cache (a ragged batch).

The step's tokens (decode tokens of some sequences, prompt chunks of others) are packed into one
`(T, hidden)` matrix, so every linear layer is one batch-invariant GEMM for the whole batch (see
linear.py); so is the attention of decode tokens (one batched call per layer: the fused kernel
straight from the compressed blocks, or `decode_attention.py` over decompressed blocks, both
batch-invariant) and their cache writes (`PagedKVCache.write_tokens`); prompt chunks attend per
sequence. Cache semantics are those of
`trtcompress.kv.decode.CachedDecoder`: the step's own tokens attend to their exact K/V (causally),
earlier tokens are seen as the cache reproduces them (compressed blocks decompressed, the fp16 tail,
the fp16 sink tokens), and after the step the new K/V are appended (a full tail block is compressed
by the codec).

Prompt chunks (and decode tokens where neither batched path applies) read the paged cache per
sequence: per layer and sequence, the committed tokens are rebuilt from
the compressed blocks (`PagedKVCache.gather_blocks`, the codec's own decompression, sink rows from the
sink slot) and the fp16 tail into a transient `(2, H, length + n, D)` float32 scratch, which also
holds the step's exact K/V, and SDPA runs over it. Scratches live for one group of sequences in one
layer: consecutive sequences of the step whose scratches hold at most `scratch_tokens` tokens together
(the context length; a longer sequence alone) are decompressed in one codec call per K/V. So the KV
memory a sequence holds between steps is what the cache accounts (`PagedKVCache.bytes_used`), and
the transient scratch is bounded by one context's worth of tokens, whatever the batch (the batched
decode attention's padded blocks by `decode_scratch_bytes`, 64 MiB: larger steps run in several
batches). Since
rebuilding every block at every step costs more than the attention itself at long contexts, a
*bounded* cache of decompressed blocks (`DecompressedBlocks`, `deploy.kv_decompressed_cache_mb`, 0 =
off) keeps the decompressed prefix of as many (sequence, layer) pairs as fit in its budget; its bytes
are counted (`BatchedModel.decompressed_bytes`). Decompression is deterministic, so the cache changes
speed only, never a number.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trtcompress.kv.paged import PagedKVCache, SequenceState
from trtcompress.models.layout import check_exact_attention
from trtcompress.runtime.decode_attention import (
    DecodeBatch,
    as_rows,
    batched_decode_attention,
    chunk_decode_works,
    decode_batch,
    invariant_bmm_calls,
)
from trtcompress.runtime.fused_attention import (
    FusedDecodeInputs,
    fused_decode_attention,
    fused_decode_inputs,
    fused_decode_supported,
)
from trtcompress.runtime.linear import (
    FALLBACK_TILE,
    CpuGemm,
    RuntimeLinear,
    build_group,
    build_linear,
    onednn_available,
    plugins_batch_invariant,
    probe_batch_invariance,
)
from trtcompress.runtime.scheduler import Work

if TYPE_CHECKING:
    from trtcompress.runtime.cuda_graphs import DecodeGraphs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _to_float32(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `module` (a norm; no CompressedLinear inside) with float32 parameters on `device`; the
    model's own module is left as it is (a bf16 / fp16 model still runs after an engine was built on it)."""
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.data = p.data.to(device, torch.float32)
    return module


class _Layer:
    def __init__(self, layer: nn.Module, tile: int, device: torch.device) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1 = _to_float32(layer.input_layernorm, device)
        self.ln2 = _to_float32(layer.post_attention_layernorm, device)
        self.qkv = build_group([attn.q_proj, attn.k_proj, attn.v_proj], tile, device)
        self.o = build_linear([attn.o_proj], tile, device)
        self.gate_up = build_group([mlp.gate_proj, mlp.up_proj], tile, device)
        self.down = build_linear([mlp.down_proj], tile, device)
        self.act = mlp.act_fn


def _run(group: list[RuntimeLinear], x: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for lin in group:
        out += lin.split(lin(x))
    return out


class DecompressedBlocks:
    """A bounded cache of decompressed blocks: per (sequence, layer), the float32 K and V
    `(2, H, n_blocks * block_size, D)` of the sequence's first `n_blocks` compressed blocks, as
    `PagedKVCache.gather_blocks` reproduces them (compressed blocks never change, so an entry stays
    valid until its sequence is freed). An entry is stored or grown only while the total stays within
    `budget` bytes; nothing is evicted to make room (attention visits every running sequence's
    blocks at every step, a cyclic scan under which LRU eviction would turn every access into a miss),
    so with a small budget the first sequences keep their entries and the others decompress at every
    step. `budget = 0` turns it off."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: dict[tuple[int, int], torch.Tensor] = {}
        self.bytes = 0

    def get(self, seq_id: int, layer: int) -> torch.Tensor | None:
        return self.entries.get((seq_id, layer))

    def fits(self, seq_id: int, layer: int, nbytes: int) -> bool:
        """Whether an entry of `nbytes` for (seq_id, layer) would fit in the budget."""
        old = self.entries.get((seq_id, layer))
        old_bytes = 0 if old is None else old.numel() * old.element_size()
        return self.bytes - old_bytes + nbytes <= self.budget

    def offer(self, seq_id: int, layer: int, kv: torch.Tensor) -> None:
        """Keep a copy of `kv` as the entry of (seq_id, layer) if that fits in the budget."""
        new_bytes = kv.numel() * kv.element_size()
        if self.fits(seq_id, layer, new_bytes):
            old = self.entries.get((seq_id, layer))
            self.bytes += new_bytes - (0 if old is None else old.numel() * old.element_size())
            self.entries[seq_id, layer] = kv.clone(memory_format=torch.contiguous_format)

    def forget(self, seq_id: int) -> None:
        for key in [key for key in self.entries if key[0] == seq_id]:
            entry = self.entries.pop(key)
            self.bytes -= entry.numel() * entry.element_size()


class BatchedModel:
    def __init__(
        self,
        model: nn.Module,
        cache: PagedKVCache,
        tile: int = 0,
        max_rows: int = 512,
        decompressed_cache_bytes: int = 0,
        scratch_tokens: int = 1024,
        decode_scratch_bytes: int = 64 << 20,
        cpu_gemm: CpuGemm = "auto",
    ) -> None:
        cfg = model.config
        inner = model.get_decoder()
        # (the engine's scratch_tokens is its context length)
        check_exact_attention(model, scratch_tokens, "the native runtime", "serve it with max_seq_len <= {}")
        self.device = cache.tails["k"].device  # the cache's device is the runtime's
        self.cache = cache
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cache.head_dim
        self.scaling = getattr(inner.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.vocab_size = cfg.vocab_size
        self.embed = inner.embed_tokens.weight.detach().to(self.device, torch.float32)
        self.layers = [_Layer(layer, tile, self.device) for layer in inner.layers]
        self.norm = _to_float32(inner.norm, self.device)
        self.rotary = copy.deepcopy(inner.rotary_emb).to(self.device)  # (Module.to moves in place)
        self.head = build_linear([model.get_output_embeddings()], tile, self.device)
        linears = [lin for layer in self.layers for group in (layer.qkv, layer.gate_up) for lin in group]
        linears += [lin for layer in self.layers for lin in (layer.o, layer.down)] + [self.head]
        self.gemm_backend = self._choose_cpu_gemm(cpu_gemm)
        if self.gemm_backend == "onednn":
            for lin in linears:
                lin.use_onednn(max_rows)
        self.gemm_tile = tile
        dense = [lin for lin in linears if lin.plugin is None]
        # one GEMM per call only if the GEMM is batch-invariant for these shapes
        weights = [w for lin in dense for w in lin.gemm_weights]
        if tile == 0 and dense and not probe_batch_invariance(weights, max_rows, linear=dense[0].linear):
            self.gemm_tile = FALLBACK_TILE
            for lin in dense:
                lin.tile = FALLBACK_TILE
        # the 4-bit ops (CUDA) choose their kernel by row count: probed too, tiled where that breaks
        # invariance; None: no such layer
        self.plugin_batch_invariant = plugins_batch_invariant(linears, max_rows)
        if self.plugin_batch_invariant is False:
            warnings.warn(
                "the 4-bit GEMM ops are not batch-invariant on this device, even in fixed tiles: a "
                "sequence's greedy tokens can depend on the batch it runs in",
                stacklevel=2,
            )
        self.blocks = DecompressedBlocks(decompressed_cache_bytes)
        self.scratch_tokens = scratch_tokens
        self.fused_decode = fused_decode_supported(cache)  # decode tokens read the compressed blocks
        # the other decode tokens: one batched attention per layer where it is batch-invariant here
        self.bmm_calls_of = invariant_bmm_calls(
            self.device, self.n_kv, self.n_heads, self.head_dim, cache.block_size
        )
        self.batched_decode = self.bmm_calls_of is not None
        token_bytes = 2 * self.n_kv * self.head_dim * 4  # float32 K and V of one token
        self.decode_scratch_tokens = max(1, decode_scratch_bytes // token_bytes)
        self.graphs: DecodeGraphs | None = None  # all-decode steps from CUDA graphs (deploy.cuda_graphs)

    def _choose_cpu_gemm(self, cpu_gemm: CpuGemm) -> str:
        """The dense GEMM library of the CPU path: "onednn" or "blas" (CUDA: "cuda")."""
        if cpu_gemm not in ("auto", "onednn", "blas"):
            raise ValueError(f"cpu_gemm must be auto, onednn or blas, got {cpu_gemm!r}")
        if self.device.type != "cpu":
            return self.device.type
        if cpu_gemm == "onednn" and not onednn_available():
            raise RuntimeError(
                f"deploy.cpu_gemm is onednn but this torch ({torch.__version__}) has no oneDNN linear "
                "(torch.ops.mkldnn._reorder_linear_weight): install an x86-64 or aarch64 CPU wheel of torch, "
                "or set deploy.cpu_gemm: blas"
            )
        return "onednn" if cpu_gemm != "blas" and onednn_available() else "blas"

    # ------------------------------------------------------------------------------ lifecycle

    def forget(self, seq_id: int) -> None:
        self.blocks.forget(seq_id)

    @property
    def decompressed_bytes(self) -> int:
        """Bytes held by the bounded decompressed-block cache (<= its budget)."""
        return self.blocks.bytes

    # -------------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        """Run one step; returns float32 logits `(S, vocab)` for the works that sample, in order."""
        if self.graphs is not None and self.graphs.applies(work):
            return self.graphs.run(work)
        dev = self.device
        ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(w.start, w.start + w.n, device=dev) for w in work])
        h = self.embed[ids]
        cos, sin = self._rope(h, positions)
        bounds = torch.tensor([0] + [w.n for w in work]).cumsum(0).tolist()
        # Decode tokens attend from the compressed blocks through the fused kernel where it reads the
        # cache, else all at once from decompressed blocks (decode_attention.py, where batch-invariant);
        # the other works (prompt chunks; decode tokens without either) through the scratch + SDPA.
        decode = [i for i, w in enumerate(work) if w.n == 1 and w.start > 0]
        fused = decode if self.fused_decode else []
        batched = decode if self.batched_decode and not fused else []
        taken = set(fused + batched)
        rest = [i for i in range(len(work)) if i not in taken]
        groups = [rest[lo:hi] for lo, hi in self._groups([work[i] for i in rest])] if rest else []
        writes, seq_ids = None, [work[i].seq.seq_id for i in decode]
        if fused or batched:  # the same for every layer of the step
            writes = self.cache.token_writes(seq_ids, [work[i].phase for i in decode])
            decode_rows = as_rows([bounds[i] for i in decode], dev)
        if fused:
            fused_inputs = fused_decode_inputs(self.cache, seq_ids, dev)
        batches = self._decode_batches(work, batched, bounds) if batched else []
        decode_scratch = self._decode_scratch(batches)
        t = ids.shape[0]
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            out = torch.empty(t, self.n_heads, self.head_dim, device=dev)
            k_t, v_t = k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D)
            if fused:
                out[decode_rows] = fused_decode_attention(
                    self.cache, li, fused_inputs, q[decode_rows], k[decode_rows], v[decode_rows], self.scaling
                )
            for batch in batches:
                out[batch.rows] = self._attend_batch(li, batch, q, k, v, decode_scratch)
            if writes is not None:  # after every read of the layer's cache: the step's decode K/V
                self.cache.write_tokens(li, writes, k[decode_rows], v[decode_rows])
            for members in groups:
                spans = [(bounds[i], bounds[i + 1]) for i in members]
                scratch = self._keys_values(li, [work[i] for i in members], spans, k_t, v_t)
                for i, kv, (a, b) in zip(members, scratch, spans, strict=True):
                    out[a:b] = self._attend(li, work[i], kv, q[a:b])
            h = self._out_mlp(layer, h, out)
        for w in work:
            self.cache.commit(w.seq.seq_id, w.n)
        rows = [b - 1 for w, b in zip(work, bounds[1:], strict=True) if w.samples]
        if not rows:
            return torch.empty(0, self.vocab_size)
        return self.head(self.norm(h[rows])).float().cpu()  # sampling (seeded generators) runs on CPU

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `(T, 1, D)` of the tokens' positions (broadcast over heads)."""
        cos, sin = self.rotary(h[None], positions[None])
        return cos[0, :, None], sin[0, :, None]

    def _qkv(self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q `(T, Hq, D)`, k and v `(T, H, D)` of the layer's input `h`, q and k rotated."""
        t = h.shape[0]
        q, k, v = _run(layer.qkv, layer.ln1(h))
        q = q.reshape(t, self.n_heads, self.head_dim)
        k = k.reshape(t, self.n_kv, self.head_dim)
        v = v.reshape(t, self.n_kv, self.head_dim)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def _out_mlp(self, layer: _Layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's output: attention projection and MLP, each with its residual."""
        h = h + layer.o(attn.reshape(h.shape[0], -1))
        gate, up = _run(layer.gate_up, layer.ln2(h))
        return h + layer.down(layer.act(gate) * up)

    def decode_all(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        inputs: FusedDecodeInputs,
        slots: torch.Tensor,
        offsets: torch.Tensor,
    ) -> torch.Tensor:
        """float32 logits `(B, vocab)` of one decode token per row through every layer, attention by the
        fused kernel (`inputs`), each token's K/V into tail `slots` at `offsets`
        (`PagedKVCache.write_token_tails`; sink copies and block compression are the caller's:
        `finish_token_writes`). Tensor operations only, no host-side decision and fixed shapes, so a
        CUDA graph can replay it (`cuda_graphs.DecodeGraphs`); `forward` computes the same numbers."""
        h = self.embed[ids]
        cos, sin = self._rope(h, positions)
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, cos, sin)
            out = fused_decode_attention(self.cache, li, inputs, q, k, v, self.scaling)
            self.cache.write_token_tails(li, slots, offsets, k, v)
            h = self._out_mlp(layer, h, out)
        return self.head(self.norm(h)).float()

    def _groups(self, work: list[Work]) -> list[tuple[int, int]]:
        """Consecutive works whose scratches together hold at most `scratch_tokens` tokens (a work
        longer than that alone): each group's blocks are decompressed in one codec call, and the
        transient scratch of a layer never exceeds max(scratch_tokens, the longest sequence) tokens."""
        groups, first, size = [], 0, 0
        for i, w in enumerate(work):
            if i > first and size + w.start + w.n > self.scratch_tokens:
                groups.append((first, i))
                first, size = i, 0
            size += w.start + w.n
        return [*groups, (first, len(work))]

    def _attend(self, layer: int, w: Work, kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Attention of one sequence's `n` new tokens over its scratch; then append their K/V to the cache."""
        start, n = w.start, w.n
        mask = None
        if n > 1:
            steps = torch.arange(start + n, device=q.device)
            mask = steps[None] <= (start + steps[:n])[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            kv[0][None],
            kv[1][None],
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=self.n_heads != self.n_kv,
        )[0]
        self.cache.write(layer, w.seq.seq_id, kv[0, :, start:], kv[1, :, start:], phase=w.phase)
        return o.transpose(0, 1)

    def _check_committed(self, w: Work) -> SequenceState:
        """The work's cache state, after checking the step starts where the cache's tokens end."""
        seq = self.cache.seqs[w.seq.seq_id]
        if seq.length != w.start:
            committed, start = seq.length, w.start
            raise RuntimeError(
                f"sequence {w.seq.seq_id}: {committed} tokens committed, step starts at {start}"
            )
        return seq

    def _decode_batches(self, work: list[Work], members: list[int], bounds: list[int]) -> list[DecodeBatch]:
        """The step's batched decode works in batches whose padded blocks fit the decode scratch."""
        bs = self.cache.block_size
        starts = [work[i].start for i in members]
        for i in members:
            self._check_committed(work[i])
        seq_ids = [work[i].seq.seq_id for i in members]
        slots = self.cache.tail_slots(seq_ids)
        tables = [self.cache.seqs[s].blocks for s in seq_ids] if self.cache.codec.elementwise else None
        out = []
        for lo, hi in chunk_decode_works(starts, bs, self.decode_scratch_tokens):
            rows = [bounds[i] for i in members[lo:hi]]
            table = None if tables is None else tables[lo:hi]
            out.append(
                decode_batch(seq_ids[lo:hi], rows, starts[lo:hi], slots[lo:hi], bs, self.device, table)
            )
        return out

    def _decode_scratch(self, batches: list[DecodeBatch]) -> torch.Tensor | None:
        """One float32 buffer for the padded blocks of the step's largest decode batch, reused by every
        batch and layer of the step (a fresh multi-MB tensor per layer cost an allocation, page faults
        and, zeroed, a pass over it). Elementwise codecs overwrite every place of a batch (padding
        places with the row's own last block, or zeros); the others leave padding places as they
        are: zero from here, or, when a step runs several decode batches, K/V an earlier batch wrote.
        A masked key gets weight exactly 0 (`batched_decode_attention`), so no number depends on what
        a padding place holds, as long as it is finite."""
        if not batches:
            return None
        per_place = 2 * self.n_kv * self.cache.block_size * self.head_dim
        size = max(b.size * b.num_blocks for b in batches) * per_place
        alloc = torch.empty if self.cache.codec.elementwise else torch.zeros
        return alloc(size, device=self.device)

    def _attend_batch(
        self,
        layer: int,
        batch: DecodeBatch,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """One decode token per work of `batch` over its committed tokens plus itself, laid out as whole
        blocks (the fp16 tail's block with the token's own K/V after it, then the decompressed blocks)
        in the step's buffer `scratch` (`_decode_scratch`): `batched_decode_attention`."""
        cache, bs, h, d, rows = self.cache, self.cache.block_size, self.n_kv, self.head_dim, batch.rows
        nb = batch.num_blocks
        kv = scratch[: 2 * batch.size * nb * h * bs * d].view(2, batch.size * nb, h, bs, d)
        blocks = kv.view(2, batch.size, nb, h, bs, d)
        blocks[0, :, 0] = cache.tails["k"][layer].index_select(0, batch.slots)
        blocks[1, :, 0] = cache.tails["v"][layer].index_select(0, batch.slots)
        own = batch.index, 0, slice(None), batch.tail_lens
        blocks[0][own] = k[rows]  # the token's exact K/V right after its tail's committed tokens
        blocks[1][own] = v[rows]
        if cache.codec.elementwise:  # every place after the tail's: one padded gather
            if batch.padded_blocks is not None:
                cache.decompress_blocks_into(layer, batch.padded_blocks, blocks[0, :, 1:], blocks[1, :, 1:])
                if batch.empty_rows is not None:  # they read another sequence's block: zero it
                    blocks[:, batch.empty_rows, 1:] = 0.0
                if cache.sink_tokens:  # block 0's sink rows come from the sink slot
                    n, first = cache.sink_tokens, batch.first_blocks
                    for kind, i in (("k", 0), ("v", 1)):
                        sinks = cache.sinks[kind][layer].index_select(0, batch.slots[first])
                        blocks[i, :, 1][first, :, :n] = sinks.float()
        elif self.blocks.budget == 0:  # every block, one codec call per K/V
            if len(batch.block_dest):
                k_blocks, v_blocks = cache.decompress_block_ranges(layer, batch.ranges)
                kv[0].index_copy_(0, batch.block_dest, k_blocks)
                kv[1].index_copy_(0, batch.block_dest, v_blocks)
        else:
            self._decompressed_prefixes(layer, batch, kv)
        return batched_decode_attention(q[rows], blocks, batch.masked, self.scaling, self.bmm_calls_of or 0)

    def _decompressed_prefixes(self, layer: int, batch: DecodeBatch, kv: torch.Tensor) -> None:
        """Put each sequence's compressed blocks into `kv` `(2, B * NB, H, block, D)` (row r's block j at
        r * NB + 1 + j): the prefixes the bounded decompressed-block cache holds (one copy each, into
        the row's consecutive places), the rest decompressed in one codec call per K/V and offered to
        that cache."""
        cache, bs, h, d, nb = self.cache, self.cache.block_size, self.n_kv, self.head_dim, batch.num_blocks
        missing = []
        for row, (seq_id, start) in enumerate(zip(batch.seq_ids, batch.starts, strict=True)):
            n_full = start // bs
            prefix = self.blocks.get(seq_id, layer) if n_full else None
            have = 0 if prefix is None else prefix.shape[2] // bs
            if have:  # (2, H, have * bs, D) -> (2, have, H, bs, D)
                first = row * nb + 1
                kv[:, first : first + have] = prefix.view(2, h, have, bs, d).transpose(1, 2)
            if have < n_full:
                missing.append((row, seq_id, have, n_full))
        if missing:
            k_blocks, v_blocks = cache.decompress_block_ranges(
                layer, [(s, lo, hi) for _, s, lo, hi in missing]
            )
            dest = [row * nb + 1 + j for row, _, lo, hi in missing for j in range(lo, hi)]
            dest_t = torch.tensor(dest, device=self.device)
            kv[0].index_copy_(0, dest_t, k_blocks)
            kv[1].index_copy_(0, dest_t, v_blocks)
            for row, seq_id, _, hi in missing:
                if self.blocks.fits(seq_id, layer, 2 * h * hi * bs * d * 4):
                    first = row * nb + 1
                    prefix = kv[:, first : first + hi].transpose(1, 2).reshape(2, h, hi * bs, d)
                    self.blocks.offer(seq_id, layer, prefix)

    def _keys_values(
        self, layer: int, work: list[Work], spans: list[tuple[int, int]], k: torch.Tensor, v: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per work, the transient scratch `(2, H, start + n, D)` float32: the `start` committed tokens
        as the cache reproduces them (decompressed blocks, then the fp16 tail), then the step's exact
        K/V (`k`, `v` `(H, T, D)`: columns `a:b` of `spans[i]` are work i's). Blocks that the
        decompressed-block cache does not hold are decompressed in one codec call for all works."""
        cache, bs = self.cache, self.cache.block_size
        scratch, missing = [], []
        for w, (a, b) in zip(work, spans, strict=True):
            seq_id, start = w.seq.seq_id, w.start
            seq = self._check_committed(w)
            n_full = start // bs
            kv = torch.empty(2, self.n_kv, start + w.n, self.head_dim, device=self.device)
            prefix = self.blocks.get(seq_id, layer) if n_full else None
            have = 0 if prefix is None else prefix.shape[2] // bs
            if have:
                kv[:, :, : have * bs] = prefix
            if have < n_full:
                missing.append((len(scratch), seq_id, have, n_full))
            kv[0, :, n_full * bs : start] = cache.tails["k"][layer, seq.slot, :, : start - n_full * bs]
            kv[1, :, n_full * bs : start] = cache.tails["v"][layer, seq.slot, :, : start - n_full * bs]
            kv[0, :, start:] = k[:, a:b]  # exact K/V of the step's own tokens
            kv[1, :, start:] = v[:, a:b]
            scratch.append(kv)
        if missing:
            blocks = cache.gather_block_ranges(layer, [(s, lo, hi) for _, s, lo, hi in missing])
            for (i, seq_id, lo, hi), (kb, vb) in zip(missing, blocks, strict=True):
                scratch[i][0, :, lo * bs : hi * bs] = kb
                scratch[i][1, :, lo * bs : hi * bs] = vb
                self.blocks.offer(seq_id, layer, scratch[i][:, :, : hi * bs])
        return scratch
