"""The paged fp16 decode kernel (`runtime/paged_attention.py`, interpreted on CPU): attention and its
softmax normaliser over each sequence's committed tokens as the cache reproduces them (blocks, fp16
tail, sink rows from the sink slot), for GQA and lengths that end anywhere in a block; and a
sequence's bits alone equal its bits in any batch (batch invariance by construction)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported

from trtcompress.kv import get_codec
from trtcompress.kv.paged import PagedKVCache
from trtcompress.runtime.paged_attention import paged_fp16_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK, HEADS, DIM = 16, 2, 32
LENGTHS = [1, 5, BLOCK, BLOCK + 1, 2 * BLOCK + 7, 3 * BLOCK]


def _cache(sink: int) -> PagedKVCache:
    cache = PagedKVCache(get_codec("fp16"), 1, HEADS, DIM, 24, BLOCK, len(LENGTHS), DEVICE, sink)
    gen = torch.Generator().manual_seed(sink)
    for s, n in enumerate(LENGTHS):
        cache.add_sequence(s)
        cache.reserve(s, n)
        cache.write(0, s, *torch.randn(2, HEADS, n, DIM, generator=gen).to(DEVICE))
        cache.commit(s, n)
    return cache


def _attend(cache: PagedKVCache, seq_ids: list[int], q: torch.Tensor):
    table, lengths = cache.block_table(seq_ids)
    full = lengths // BLOCK
    sinks = {}
    if cache.sink_tokens:
        sinks = {"k_sink": cache.sinks["k"][0], "v_sink": cache.sinks["v"][0]}
    k_pool, v_pool = cache.pools["k"]["data"][0], cache.pools["v"]["data"][0]
    return paged_fp16_decode(
        q, k_pool, v_pool, cache.tails["k"][0], cache.tails["v"][0], table, full, lengths - full * BLOCK,
        cache.tail_slots(seq_ids), DIM**-0.5, **sinks,
    )  # fmt: skip


@pytest.mark.parametrize(("sink", "q_heads"), [(0, 6), (1, 2), (2, 4)])
def test_matches_attention_over_the_gathered_cache(sink: int, q_heads: int) -> None:
    cache = _cache(sink)
    ids = list(range(len(LENGTHS)))
    q = torch.randn(len(ids), q_heads, DIM, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, lse = _attend(cache, ids, q)
    g = q_heads // HEADS
    for s in ids:
        keys, values = (x.repeat_interleave(g, 0) for x in cache.gather(0, s))  # sink rows included
        scores = (q[s][:, None] @ keys.transpose(1, 2))[:, 0] * DIM**-0.5
        want = (torch.softmax(scores, -1)[:, None] @ values)[:, 0]
        torch.testing.assert_close(out[s], want, rtol=0, atol=2e-6)
        torch.testing.assert_close(lse[s], torch.logsumexp(scores, -1), rtol=0, atol=2e-6)


def test_a_sequence_gets_the_same_bits_in_any_batch() -> None:
    cache = _cache(1)
    ids = list(range(len(LENGTHS)))
    q = torch.randn(len(ids), 4, DIM, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out, lse = _attend(cache, ids, q)
    for s in ids:
        one, one_lse = _attend(cache, [s], q[s : s + 1])
        assert torch.equal(one[0], out[s]) and torch.equal(one_lse[0], lse[s])
    order = ids[::-1]
    shuffled, _ = _attend(cache, order, q[order])
    assert torch.equal(shuffled, out[order])


def test_a_sequence_without_committed_tokens_gives_an_empty_softmax() -> None:
    """Nothing to attend to: output 0 and lse -inf (no NaN), so merging the token's own K/V gives its
    own value."""
    cache = PagedKVCache(get_codec("fp16"), 1, HEADS, DIM, 4, BLOCK, 2, DEVICE)
    cache.add_sequence(0)
    out, lse = _attend(cache, [0], torch.randn(1, 4, DIM).to(DEVICE))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_shapes_the_kernel_cannot_tile_are_refused() -> None:
    cache = PagedKVCache(get_codec("fp16"), 1, HEADS, 24, 4, BLOCK, 1, DEVICE)  # head dim 24
    with pytest.raises(ValueError, match="power-of-two D"):
        paged_fp16_decode(torch.zeros(1, 2, 24), cache.pools["k"]["data"][0], cache.pools["v"]["data"][0],
                          cache.tails["k"][0], cache.tails["v"][0], torch.zeros(1, 1), torch.zeros(1),
                          torch.ones(1), torch.zeros(1), 1.0)  # fmt: skip


def test_kernels_compile_for_sm90() -> None:
    """No GPU here: the paged fp16 kernel and the GEAR kernel reading one-byte (fp8) outlier values
    compile to sm_90 machine code (Triton + ptxas, in a fresh interpreter without TRITON_INTERPRET)."""
    import json
    import subprocess
    import sys

    code = """
import json, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from trtcompress.runtime.paged_attention import paged_fp16_decode_kernel as paged
from trtcompress.plugins.gear_attention.kernel import gear_decode_kernel as gear

def build(fn, types, consts):
    sig = {n: "constexpr" if n in consts else types.get(n, "*fp16") for n in fn.arg_names}
    ptrs = [i for i, n in enumerate(fn.arg_names) if sig[n].startswith("*")]
    src = ASTSource(fn, sig, consts, attrs={(i,): [["tt.divisibility", 16]] for i in ptrs})
    return len(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"])

out = {"paged": build(paged, {"q_ptr": "*fp32", "out_ptr": "*fp32", "lse_ptr": "*fp32", "table_ptr": "*i32",
        "nblk_ptr": "*i32", "tail_ptr": "*i32", "slot_ptr": "*i32", "W": "i32"},
        {"H": 3, "G": 3, "GP": 16, "BS": 64, "D": 64, "SINK": 1})}
f32 = {n: "*fp32" for n in ("q_ptr", "out_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr")}
i32 = {n: "*i32" for n in ("block_table_ptr", "num_blocks_ptr", "tail_len_ptr", "slot_ptr")}
other = {"kc_ptr": "*u8", "vc_ptr": "*u8", "koi_ptr": "*i16", "voi_ptr": "*i16", "kov_ptr": "*fp8e4nv",
         "vov_ptr": "*fp8e4nv", "sm_scale": "fp32", "max_blocks": "i32"}
consts = dict(H=3, GROUP=3, G_PAD=16, D=64, T=64, VG=1, BITS=2, OUT_K=123, OUT_V=61, RANK_K=0, RANK_V=0,
              INT8_FACTORS=True, OUT_BLOCK=True, OUT_PAD=128, SINK=1, SPLITS=2, ASM=True, PREFETCH=False,
              OUT_RUNS=True, OUT_SCALED=True)
out["gear_fp8_outliers"] = build(gear, f32 | i32 | other, consts)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sizes["paged"] > 0 and sizes["gear_fp8_outliers"] > 0
