"""One forward step of many sequences at once over the paged KV cache (a ragged batch).

The step's tokens (decode tokens of some sequences, prompt chunks of others) are packed into one
`(T, hidden)` matrix, so every linear layer is one batch-invariant GEMM for the whole batch (see
linear.py); only attention is per sequence. Cache semantics are those of
`trtcompress.kv.decode.CachedDecoder`: the step's own tokens attend to their exact K/V (causally),
earlier tokens are seen as the cache reproduces them (compressed blocks decompressed, the fp16 tail),
and after the step the new K/V are appended (a full tail block is compressed by the codec).

CPU attention reads a per-sequence *view*: the decompressed K/V of the sequence, `(layers, 2, H, cap,
D)` float32, updated with each step's new tokens (fp16-rounded, then replaced by the codec's
reconstruction when their block is compressed). It is what `CachedDecoder(reuse_decompressed=True)`
keeps, laid out so attention needs no concatenation; the block pool stays the memory that admission and
byte accounting count. (On a GPU the GEAR attention op reads the blocks directly.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.linear import (
    FALLBACK_TILE,
    RuntimeLinear,
    build_group,
    build_linear,
    probe_batch_invariance,
)
from trtcompress.runtime.scheduler import Work


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _to_float32(module: nn.Module) -> None:
    """Float32 parameters and buffers, in place (norms, embeddings; no CompressedLinear inside)."""
    for p in module.parameters():
        p.data = p.data.float()


class _Layer:
    def __init__(self, layer: nn.Module, tile: int, device: torch.device) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm, layer.post_attention_layernorm
        _to_float32(self.ln1)
        _to_float32(self.ln2)
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


class BatchedModel:
    def __init__(self, model: nn.Module, cache: PagedKVCache, tile: int = 0, max_rows: int = 512) -> None:
        cfg = model.config
        inner = model.get_decoder()
        for layer in inner.layers:
            attn = layer.self_attn
            if getattr(attn, "q_norm", None) is not None or getattr(attn, "sliding_window", None):
                raise NotImplementedError("the native runtime supports LLaMA-style attention only")
        self.device = torch.device("cpu")
        self.cache = cache
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cache.head_dim
        self.scaling = getattr(inner.layers[0].self_attn, "scaling", self.head_dim**-0.5)
        self.vocab_size = cfg.vocab_size
        self.embed = inner.embed_tokens.weight.detach().float()
        self.layers = [_Layer(layer, tile, self.device) for layer in inner.layers]
        self.norm = inner.norm
        _to_float32(self.norm)
        self.rotary = inner.rotary_emb
        self.head = build_linear([model.get_output_embeddings()], tile, self.device)
        self.gemm_tile = tile
        if tile == 0:  # one GEMM per call: only if this BLAS is batch-invariant for these shapes
            linears = [lin for layer in self.layers for group in (layer.qkv, layer.gate_up) for lin in group]
            linears += [lin for layer in self.layers for lin in (layer.o, layer.down)] + [self.head]
            if not probe_batch_invariance([lin.weight for lin in linears if lin.plugin is None], max_rows):
                self.gemm_tile = FALLBACK_TILE
                for lin in linears:
                    lin.tile = FALLBACK_TILE
        self.views: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------ lifecycle

    def forget(self, seq_id: int) -> None:
        self.views.pop(seq_id, None)

    def _view(self, work: Work) -> torch.Tensor:
        view = self.views.get(work.seq.seq_id)
        if view is None:
            cap = work.seq.max_total
            shape = (len(self.layers), 2, self.n_kv, cap, self.head_dim)
            view = self.views[work.seq.seq_id] = torch.empty(shape, dtype=torch.float32)
        return view

    # -------------------------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, work: list[Work]) -> torch.Tensor:
        """Run one step; returns float32 logits `(S, vocab)` for the works that sample, in order."""
        ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(w.start, w.start + w.n) for w in work])
        h = self.embed[ids]
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # (T, 1, D): broadcast over heads
        views = [self._view(w) for w in work]
        bounds = torch.tensor([0] + [w.n for w in work]).cumsum(0).tolist()
        t = ids.shape[0]
        for li, layer in enumerate(self.layers):
            q, k, v = _run(layer.qkv, layer.ln1(h))
            q = q.reshape(t, self.n_heads, self.head_dim)
            k = k.reshape(t, self.n_kv, self.head_dim)
            v = v.reshape(t, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = torch.empty(t, self.n_heads, self.head_dim)
            for w, view, a, b in zip(work, views, bounds[:-1], bounds[1:], strict=True):
                out[a:b] = self._attend(li, w, view, q[a:b], k[a:b], v[a:b])
            h = h + layer.o(out.reshape(t, -1))
            gate, up = _run(layer.gate_up, layer.ln2(h))
            h = h + layer.down(layer.act(gate) * up)
        for w in work:
            self.cache.commit(w.seq.seq_id, w.n)
        rows = [b - 1 for w, b in zip(work, bounds[1:], strict=True) if w.samples]
        if not rows:
            return torch.empty(0, self.vocab_size)
        return self.head(self.norm(h[rows])).float()

    def _attend(
        self, layer: int, w: Work, view: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one sequence's `n` new tokens; then append their K/V to cache and view."""
        start, n = w.start, w.n
        kv = view[layer]
        k_t, v_t = k.transpose(0, 1), v.transpose(0, 1)  # (H, n, D)
        kv[0, :, start : start + n] = k_t  # exact K/V of the step's own tokens
        kv[1, :, start : start + n] = v_t
        mask = None
        if n > 1:
            mask = torch.arange(start + n)[None] <= (start + torch.arange(n))[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            kv[0, :, : start + n][None],
            kv[1, :, : start + n][None],
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=self.n_heads != self.n_kv,
        )[0]
        self._append(layer, w, kv, k_t, v_t)
        return o.transpose(0, 1)

    def _append(self, layer: int, w: Work, kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new K/V into the cache; the view then holds what the cache reproduces."""
        seq_id, start, n = w.seq.seq_id, w.start, w.n
        self.cache.write(layer, seq_id, k, v, phase=w.phase)
        kv[0, :, start : start + n] = k.half().float()  # the fp16 tail, as the cache stores it
        kv[1, :, start : start + n] = v.half().float()
        bs = self.cache.block_size
        b0, b1 = start // bs, (start + n) // bs  # blocks this write completed (and compressed)
        if b1 > b0:
            kb, vb = self.cache.gather_blocks(layer, seq_id, b0, b1)
            kv[0, :, b0 * bs : b1 * bs] = kb
            kv[1, :, b0 * bs : b1 * bs] = vb
