"""A LLaMA-family forward pass that keeps its keys and values in a PagedKVCache.

It reuses the Hugging Face model's modules (embeddings, norms, projections — `CompressedLinear`
included —, MLPs, rotary embedding, LM head) and replaces only the attention's cache handling:
- `prefill(seq, ids)`: the prompt attends to its own exact K/V (as a fused prefill kernel would);
  its full blocks are then compressed (phase "prefill"), the remainder stays in the fp16 tail;
- `decode(seqs, ids)`: one new token per sequence attends to the compressed blocks plus the fp16
  tail, then is appended (a tail that reaches a block's worth of tokens is compressed);
- `extend(seq, ids)`: teacher-forced decoding of many tokens, *exactly* equivalent to calling
  `decode` once per token: the tokens are processed in segments that never cross a block boundary,
  so every token sees the earlier blocks compressed, its own block's earlier tokens as the fp16 tail
  holds them and only its own K/V exact.
"""

from __future__ import annotations

import torch
from torch import nn

from trtcompress.kv.codec import KVCodec
from trtcompress.kv.paged import PagedKVCache
from trtcompress.models.layout import check_exact_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def model_head_dim(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def cache_for_model(
    model: nn.Module,
    codec: KVCodec,
    max_tokens: int,
    max_seqs: int = 1,
    block_size: int = 64,
    sink_tokens: int = 0,
) -> PagedKVCache:
    """A cache sized for `max_seqs` sequences of up to `max_tokens` tokens each."""
    cfg = model.config
    head_dim = model_head_dim(model)
    blocks = max_seqs * (max_tokens // block_size)
    return PagedKVCache(
        codec,
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        head_dim,
        max(blocks, 1),
        block_size,
        max_seqs,
        sink_tokens=sink_tokens,
    )


class CachedDecoder:
    """`reuse_decompressed` keeps each block's decompressed K/V once it is compressed, so a step
    decompresses only new blocks (an evaluation speed-up; identical numbers, since decompression is
    deterministic). The bytes accounted are the cache's; the fused kernel never materializes them."""

    def __init__(
        self,
        model: nn.Module,
        cache: PagedKVCache,
        context: int | None = None,
        reuse_decompressed: bool = True,
    ) -> None:
        """`context`: the longest sequence it will decode, which the model is checked against (default:
        what the cache's pool holds)."""
        context = context or (cache.num_blocks + 1) * cache.block_size
        check_exact_attention(model, context, "compressed-KV decoding", "use a context of at most {} tokens")
        self.model = model
        self.reuse = reuse_decompressed
        self._dense: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.inner = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.cache = cache
        cfg = model.config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cache.head_dim
        self.scaling = self.head_dim**-0.5

    # --------------------------------------------------------------------------------- public

    @torch.no_grad()
    def prefill(self, seq_id: int, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states `(n, hidden)` of a new sequence's prompt `ids` `(n,)`."""
        if seq_id not in self.cache.seqs:
            self.cache.add_sequence(seq_id)
        return self._forward([seq_id], ids[None], "prefill")[0]

    @torch.no_grad()
    def decode(self, seq_ids: list[int], ids: torch.Tensor) -> torch.Tensor:
        """One token per sequence (`ids` `(B,)`) -> hidden states `(B, hidden)`."""
        return self._forward(seq_ids, ids[:, None], "decode")[:, 0]

    @torch.no_grad()
    def extend(self, seq_ids: int | list[int], ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoding, equivalent to one `decode` call per token.

        One sequence: `ids` `(n,)` -> hidden `(n, hidden)`. Several sequences of equal length (e.g.
        perplexity windows): `ids` `(B, n)` -> `(B, n, hidden)`.
        """
        single = isinstance(seq_ids, int)
        seqs = [seq_ids] if single else list(seq_ids)
        rows = ids[None] if single else ids
        if len({self.cache.seqs[s].length for s in seqs}) > 1:
            raise ValueError("extend() batches sequences of equal length only")
        bs, out, done = self.cache.block_size, [], 0
        while done < rows.shape[1]:
            take = min(bs - self.cache.seqs[seqs[0]].length % bs, rows.shape[1] - done)
            out.append(self._forward(seqs, rows[:, done : done + take], "decode"))
            done += take
        hidden = torch.cat(out, 1)
        return hidden[0] if single else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    # -------------------------------------------------------------------------------- forward

    def _forward(self, seq_ids: list[int], ids: torch.Tensor, phase: str) -> torch.Tensor:
        cache = self.cache
        n = ids.shape[1]
        cache.reserve(seq_ids, n)
        starts = torch.tensor([cache.seqs[s].length for s in seq_ids])
        positions = starts[:, None] + torch.arange(n)[None]
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, n, D) broadcast over heads
        for li, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(*ids.shape, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(*ids.shape, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(*ids.shape, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            outs = []
            for b, seq_id in enumerate(seq_ids):
                k_old, v_old = self._committed(li, seq_id)
                k_new, v_new, own = k[b].float(), v[b].float(), None
                if phase == "decode" and n > 1:
                    # as one decode() per token: the segment's earlier tokens are read back from the
                    # cache's fp16 tail, only each token's own K/V is exact
                    own = (k_new, v_new)
                    tail = cache.tails["k"].dtype
                    k_new, v_new = k_new.to(tail).float(), v_new.to(tail).float()
                outs.append(
                    self._attend(q[b], torch.cat([k_old, k_new], 1), torch.cat([v_old, v_new], 1), own)
                )
                cache.write(li, seq_id, k[b], v[b], phase)
            o = torch.stack(outs).transpose(1, 2).reshape(*ids.shape, -1).to(h.dtype)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for s in seq_ids:
            cache.commit(s, n)
        return self.inner.norm(h)

    def _committed(self, layer: int, seq_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reuse:
            return self.cache.gather(layer, seq_id)
        n_full = self.cache.seqs[seq_id].length // self.cache.block_size
        key = (layer, seq_id)
        kb, vb = self._dense.get(key) or self.cache.gather_blocks(layer, seq_id, 0, 0)
        have = kb.shape[1] // self.cache.block_size
        if have < n_full:
            kn, vn = self.cache.gather_blocks(layer, seq_id, have, n_full)
            kb, vb = torch.cat([kb, kn], 1), torch.cat([vb, vn], 1)
            self._dense[key] = (kb, vb)
        kt, vt = self.cache.gather_tail(layer, seq_id)
        return torch.cat([kb, kt], 1), torch.cat([vb, vt], 1)

    def forget(self, seq_id: int) -> None:
        """Drop a finished sequence: its cache blocks and the decompressed copies."""
        self.cache.free(seq_id)
        self._dense = {k: v for k, v in self._dense.items() if k[1] != seq_id}

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        own: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q `(Hq, n, D)` over k, v `(Hkv, L + n, D)`; the n new tokens are causal among themselves.
        `own`: the new tokens' exact K/V `(Hkv, n, D)`, each token's own (the diagonal) where the last
        `n` rows of k, v hold them rounded as the cache stores them."""
        n, total = q.shape[1], k.shape[1]
        group = self.n_heads // self.n_kv
        qg = q.float().reshape(self.n_kv, group * n, self.head_dim)
        scores = (qg @ k.transpose(1, 2)).reshape(self.n_kv, group, n, total) * self.scaling
        rows, cols = torch.arange(n), total - n + torch.arange(n)
        if own is not None:
            exact = (qg.reshape(self.n_kv, group, n, self.head_dim) * own[0][:, None]).sum(-1)
            scores[..., rows, cols] = exact * self.scaling
        visible = torch.arange(total)[None] <= cols[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(-1)
        out = probs.reshape(self.n_kv, group * n, total) @ v
        if own is not None:  # each token's weight on itself moves from its rounded V to its exact V
            diag = probs[..., rows, cols][..., None]  # (Hkv, group, n, 1)
            fix = diag * (own[1] - v[:, total - n :])[:, None]
            out = out + fix.reshape(self.n_kv, group * n, self.head_dim)
        return out.reshape(self.n_heads, n, self.head_dim)
