"""Fused GEAR decode attention: Triton kernel (interpreted on CPU) == reference == attention over the
decompressed cache; the quantize-and-pack kernel == the torch codec, bit for bit; the custom op."""

from __future__ import annotations

import pytest
import torch
import triton  # noqa: F401  (a dev dependency: the kernel tests must run, not skip)

from trtcompress.kv import get_codec
from trtcompress.kv.paged import PagedKVCache
from trtcompress.kv.quant import minmax_params, pack_bits, quantize_rows
from trtcompress.plugins.gear_attention import gear_attention_reference, layout_for_codec
from trtcompress.plugins.gear_attention.kernel import gear_attention_triton, quant_pack_triton

# Stated tolerance: the kernel feeds fp16 operands to tl.dot (fp32 accumulate), the reference is fp32.
ATOL = 2e-3


def _filled_cache(
    codec_name: str,
    lengths: list[int],
    heads: int = 2,
    dim: int = 64,
    seed: int = 0,
    sink: int = 0,
    **options,
):
    gen = torch.Generator().manual_seed(seed)
    codec = get_codec(codec_name, **options)
    blocks = sum(n // 64 for n in lengths) + 1
    cache = PagedKVCache(codec, 1, heads, dim, num_blocks=blocks, max_seqs=len(lengths), sink_tokens=sink)
    for s, n in enumerate(lengths):
        cache.add_sequence(s)
        done = 0
        for chunk in (n // 3, n - n // 3):  # two appends: blocks complete inside and across writes
            k = torch.randn(heads, chunk, dim, generator=gen) * 2
            v = torch.randn(heads, chunk, dim, generator=gen)
            cache.reserve(s, chunk)
            cache.write(0, s, k, v)
            cache.commit(s, chunk)
            done += chunk
    return cache


def _inputs(cache: PagedKVCache, seqs: list[int]):
    table, lengths = cache.block_table(seqs)
    nb = lengths // 64
    return (
        {n: t[0] for n, t in cache.pools["k"].items()},
        {n: t[0] for n, t in cache.pools["v"].items()},
        cache.tails["k"][0],
        cache.tails["v"][0],
        table,
        nb,
        lengths - nb * 64,
        cache.tail_slots(seqs),
    )


def _sinks(cache: PagedKVCache) -> dict:
    return {"k_sink": cache.sinks["k"][0], "v_sink": cache.sinks["v"][0]} if cache.sink_tokens else {}


def _dense(q: torch.Tensor, cache: PagedKVCache, seqs: list[int], scale: float) -> torch.Tensor:
    out = []
    for b, s in enumerate(seqs):
        k, v = cache.gather(0, s)
        h, d = k.shape[0], k.shape[2]
        p = torch.softmax(q[b].view(h, -1, d) @ k.transpose(1, 2) * scale, -1)
        out.append((p @ v).reshape(-1, d))
    return torch.stack(out)


@pytest.mark.parametrize(
    ("codec", "lengths", "q_heads", "splits", "options"),
    [
        ("gear-2bit", [200, 64, 37], 6, 1, {}),  # GQA 3, partially filled tail, a tail-only sequence
        ("gear-2bit", [200, 64, 37], 6, 2, {"sink": 1}),  # exact sink token (+ a sequence still in its tail)
        ("kivi-2bit", [300], 4, 3, {"sink": 3}),  # sink rows in split 0 only
        ("gear-2bit", [331], 4, 3, {"outlier_scope": "group", "rank": 2}),  # odd length, uneven split-K
        ("gear-2bit", [260, 100], 6, 2, {"outlier_scope": "block", "outlier_ratio": 0.01}),
        ("gear-4bit", [129, 190], 2, 2, {}),
        ("gear-4bit", [190], 2, 1, {"factor_dtype": "fp16", "outlier_scope": "block"}),
        ("kivi-2bit", [150], 2, 2, {}),
        ("kivi-4bit", [64, 128], 8, 1, {}),  # block-aligned: empty tails
        ("gear-2bit", [200, 64, 37], 6, 2, {"sink": 1, "outlier_dtype": "fp8"}),  # one-byte outliers
        ("gear-2bit", [200, 70], 6, 2, {"key_rank": 2, "value_rank": 1, "factor_dtype": "int4"}),  # nibbles
        ("gear-2bit", [200, 64, 37], 6, 2, {"sink": 1, "scale_dtype": "fp8"}),  # fp8 scales + block maxima
        ("kivi-2bit", [150, 64], 4, 1, {"scale_dtype": "fp8"}),
        ("gear-4bit", [129, 190], 2, 2, {"outlier_dtype": "int8"}),
        ("gear-2bit", [200, 90], 4, 2, {"outlier_dtype": "fp8", "key_outlier_ratio": 0.0}),  # values only
    ],
)
def test_kernel_matches_reference(codec: str, lengths: list[int], q_heads: int, splits: int, options) -> None:
    cache = _filled_cache(codec, lengths, seed=len(lengths) + q_heads, **options)
    seqs = list(range(len(lengths)))
    q = torch.randn(len(seqs), q_heads, 64, generator=torch.Generator().manual_seed(1))
    args = _inputs(cache, seqs)
    layout, scale = layout_for_codec(cache.codec, 64, cache.sink_tokens), 64**-0.5
    assert layout.outlier_scope == options.get("outlier_scope", layout.outlier_scope)
    ref = gear_attention_reference(q, *args, layout, scale, **_sinks(cache))
    torch.testing.assert_close(ref, _dense(q, cache, seqs, scale), atol=1e-5, rtol=1e-5)
    out = gear_attention_triton(q, *args, layout, scale, splits=splits, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("codec", "options"),
    [
        ("kivi-2bit", {}),
        ("gear-2bit", {"sink": 1, "outlier_dtype": "fp8", "scale_dtype": "fp8"}),  # the serving default
        ("gear-4bit", {"factor_dtype": "int4"}),
    ],
)
def test_kernel_ptx_unpack_matches_reference(codec: str, options) -> None:
    """The kernel as a GPU runs it: the codes unpacked by its inline PTX (emulated on the CPU, the
    interpreter cannot run PTX), 2- and 4-bit, four bytes per instance."""
    from tests.plugins.ptx_emulation import interpreted_inline_asm

    cache = _filled_cache(codec, [200, 70], seed=9, **options)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4))
    args, layout = _inputs(cache, [0, 1]), layout_for_codec(cache.codec, 64, cache.sink_tokens)
    ref = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache))
    with interpreted_inline_asm():
        out = gear_attention_triton(q, *args, layout, 0.125, splits=2, fast_unpack=True, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scope", ["group", "block"])
def test_kernel_head_dim_128_two_value_groups(scope: str) -> None:
    cache = _filled_cache("gear-2bit", [140], heads=1, dim=128, seed=5, outlier_scope=scope)
    q = torch.randn(1, 2, 128)
    args = _inputs(cache, [0])
    layout = layout_for_codec(cache.codec, 128)
    ref = gear_attention_reference(q, *args, layout, 128**-0.5)
    torch.testing.assert_close(ref, _dense(q, cache, [0], 128**-0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        gear_attention_triton(q, *args, layout, 128**-0.5, splits=2), ref, atol=ATOL, rtol=0
    )


def test_sink_rows_are_exact_and_used() -> None:
    cache = _filled_cache("kivi-2bit", [150], sink=2)
    k, v = cache.gather(0, 0)
    torch.testing.assert_close(k[:, :2], cache.sinks["k"][0, 0].float(), rtol=0, atol=0)
    torch.testing.assert_close(v[:, :2], cache.sinks["v"][0, 0].float(), rtol=0, atol=0)
    q = cache.sinks["k"][0, 0, :, 0].float().repeat_interleave(2, 0)[None]  # (1, 4, 64): look at the sink
    layout, args = layout_for_codec(cache.codec, 64, 2), _inputs(cache, [0])
    with_sink = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache))
    without = gear_attention_reference(q, *args, layout_for_codec(cache.codec), 0.125)
    assert (with_sink - without).abs().max() > 1e-3  # the sink slot, not block 0's rows, is attended to
    with pytest.raises(ValueError, match="sink"):
        gear_attention_triton(q, *args, layout, 0.125)


@pytest.mark.parametrize("codec", ["gear-2bit", "gear-4bit"])
def test_kernel_without_prefetch_is_the_same_function(codec: str) -> None:
    cache = _filled_cache(codec, [300, 130], sink=1, seed=3)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    args, layout = _inputs(cache, [0, 1]), layout_for_codec(cache.codec, 64, 1)
    ref = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache))
    for prefetch in (False, True):
        out = gear_attention_triton(q, *args, layout, 0.125, splits=3, prefetch=prefetch, **_sinks(cache))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("sums", ["runs", "onehot"])
@pytest.mark.parametrize(("dim", "pile_on"), [(64, None), (64, "token"), (128, "channel")])
def test_outlier_sums_match_reference(dim: int, pile_on: str | None, sums: str) -> None:
    """Both outlier paths ("runs", the default: gather + prefix sums over the codec's sorted outliers;
    "onehot": one-hot products) on real caches, also with outliers piled on one token (keys) or one
    channel (values): runs longer than a chunk."""
    gen = torch.Generator().manual_seed(7)
    codec = get_codec("gear-2bit")
    cache = PagedKVCache(codec, 1, 2, dim, num_blocks=6, max_seqs=2, sink_tokens=1)
    for s, n in enumerate([300, 90]):
        cache.add_sequence(s)
        k, v = torch.randn(2, n, dim, generator=gen), torch.randn(2, n, dim, generator=gen)
        if pile_on == "token":
            k[:, 70] *= 6  # the key outliers of block 1 pile on token 70
        if pile_on == "channel":
            v[:, :, 5] *= 6  # value outliers on channel 5
        cache.reserve(s, n)
        cache.write(0, s, k, v)
        cache.commit(s, n)
    q = torch.randn(2, 4, dim, generator=gen)
    args, layout = _inputs(cache, [0, 1]), layout_for_codec(codec, dim, 1)
    ref = gear_attention_reference(q, *args, layout, dim**-0.5, **_sinks(cache))
    out = gear_attention_triton(q, *args, layout, dim**-0.5, splits=2, outlier_sums=sums, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="outlier_sums"):
        gear_attention_triton(q, *args, layout, dim**-0.5, outlier_sums="scatter", **_sinks(cache))


@pytest.mark.parametrize("sums", ["runs", "onehot"])
@pytest.mark.parametrize("outlier_dtype", ["int8", "fp8"])
def test_one_byte_outlier_values_match_reference(outlier_dtype: str, sums: str) -> None:
    """Outlier corrections stored in one byte with one fp16 scale per block and head: both outlier
    paths scale them in the kernel as the reference and the codec's decompression do."""
    cache = _filled_cache("gear-2bit", [300, 90], seed=5, sink=1, outlier_dtype=outlier_dtype)
    assert cache.pools["k"]["out_val"].element_size() == 1 and "out_scale" in cache.pools["v"]
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    args, layout = _inputs(cache, [0, 1]), layout_for_codec(cache.codec, 64, 1)
    assert layout.outlier_scaled
    ref = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache))
    torch.testing.assert_close(ref, _dense(q, cache, [0, 1], 0.125), atol=1e-5, rtol=1e-5)
    out = gear_attention_triton(q, *args, layout, 0.125, splits=2, outlier_sums=sums, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("splits", [5, 48])
def test_split_k_reduce_with_many_and_empty_splits(splits: int) -> None:
    """The reduce kernel reads every split's partials at once (a power-of-two tile, masked past the
    split count; chunks of 32 past 32 splits): with more splits than blocks most splits are empty
    (m = -inf, weight 0), and the output and the normaliser still equal the reference."""
    cache = _filled_cache("gear-2bit", [300, 100], sink=1, seed=4)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(6))
    args, layout = _inputs(cache, [0, 1]), layout_for_codec(cache.codec, 64, 1)
    ref, ref_lse = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache), return_lse=True)
    out, lse = gear_attention_triton(q, *args, layout, 0.125, splits=splits, return_lse=True, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)


def test_block_outliers_are_stored_in_kernel_order() -> None:
    """Keys sorted by token, values by channel: what the "runs" path sums over."""
    codec = get_codec("gear-2bit")
    x = torch.randn(3, 64, 64)
    for kind in ("k", "v"):
        idx = codec.compress(x, kind)["out_idx"].long()
        axis = idx % 64  # token for keys (channel * 64 + token), channel for values (token * 64 + channel)
        assert (axis.diff(dim=-1) >= 0).all(), kind


@pytest.mark.parametrize("codec", ["gear-2bit", "kivi-2bit"])
def test_kernel_returns_the_softmax_normaliser(codec: str) -> None:
    """`return_lse` gives log Σ exp(scale·q·k) per query row: merging the cache's attention with an
    extra exact key/value by it equals attention over the cache plus that key (what the runtime does
    with a decode step's own token)."""
    cache = _filled_cache(codec, [150, 40], sink=1, seed=11)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    args, layout, scale = _inputs(cache, [0, 1]), layout_for_codec(cache.codec, 64, 1), 0.125
    ref, ref_lse = gear_attention_reference(q, *args, layout, scale, **_sinks(cache), return_lse=True)
    out, lse = gear_attention_triton(q, *args, layout, scale, return_lse=True, **_sinks(cache))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)
    k_new, v_new = torch.randn(2, 2, 64), torch.randn(2, 2, 64)  # one extra token per sequence
    s_new = (q.view(2, 2, 2, 64) * k_new[:, :, None]).sum(-1).view(2, 4) * scale
    w = torch.sigmoid(s_new - lse)[..., None]  # the new token's share of the merged softmax
    merged = out * (1 - w) + v_new.repeat_interleave(2, 1) * w
    for b, s in enumerate([0, 1]):
        k, v = cache.gather(0, s)
        k, v = torch.cat([k, k_new[b, :, None]], 1), torch.cat([v, v_new[b, :, None]], 1)
        p = torch.softmax(q[b].view(2, 2, 64) @ k.transpose(1, 2) * scale, -1)
        torch.testing.assert_close(merged[b], (p @ v).reshape(4, 64), atol=ATOL, rtol=0)


def test_kernel_refuses_3bit_codes() -> None:
    cache = _filled_cache("kivi-3bit", [70])
    layout = layout_for_codec(cache.codec, 64)
    with pytest.raises(ValueError, match="2- and 4-bit codes, not 3-bit"):
        gear_attention_triton(torch.randn(1, 2, 64), *_inputs(cache, [0]), layout, 0.125)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_pack_kernel_bit_exact(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(12, 64, generator=gen) * 3
    exclude = torch.zeros(12, 64, dtype=torch.bool)
    exclude[torch.arange(12), torch.randint(0, 64, (12,), generator=gen)] = True
    exclude[3] = True  # every element of a row kept exact as an outlier: the row keeps its whole range
    for ex in (None, exclude):
        codes, scale, zero = quant_pack_triton(x, bits, ex)
        s, z = minmax_params(x, bits, ex)
        assert torch.equal(scale, s) and torch.equal(zero, z)
        assert torch.equal(codes, pack_bits(quantize_rows(x, s, z, bits), bits))
        assert torch.isfinite(s.float()).all() and torch.isfinite(z.float()).all()


def test_custom_op_on_cpu_and_through_triton(monkeypatch) -> None:
    from trtcompress.plugins.gear_attention.op import gear_attention_from_cache, op_args_from_cache

    cache = _filled_cache("gear-2bit", [100, 70], sink=1)
    q = torch.randn(2, 6, 64)
    ref = _dense(q, cache, [0, 1], 0.125)
    out = gear_attention_from_cache(q, cache, 0, [0, 1])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    torch.testing.assert_close(gear_attention_from_cache(q, cache, 0, [0, 1]), ref, atol=ATOL, rtol=0)
    monkeypatch.delenv("TRTCOMPRESS_GEAR_TRITON")
    op = torch.ops.trtcompress.gear_attention.default
    # opcheck's schema test compares the inputs before and after with allclose, which torch does not
    # implement for float8 on CPU: checked on a cache with fp16 outlier values and group scales (the
    # schema is the same)
    fp16_values = _filled_cache("gear-2bit", [100, 70], sink=1, outlier_dtype="fp16", scale_dtype="fp16")
    torch.library.opcheck(
        op, op_args_from_cache(q, fp16_values, 0, [0, 1]), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("outlier_dtype", ["int8", "fp8"])
def test_custom_op_reads_one_byte_outlier_values(outlier_dtype: str, monkeypatch) -> None:
    """One-byte outlier values reach the op with their block scales (optional trailing arguments), on
    the reference and through the kernel."""
    from trtcompress.plugins.gear_attention.op import gear_attention_from_cache, op_args_from_cache

    options = {"outlier_dtype": outlier_dtype, "value_outlier_ratio": 0.0, "scale_dtype": "fp16"}
    cache = _filled_cache("gear-2bit", [100, 70], sink=1, **options)  # fp16 scales: see opcheck below
    assert "out_scale" in cache.pools["k"] and "out_scale" not in cache.pools["v"]  # keys only
    q = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    ref = _dense(q, cache, [0, 1], 0.125)
    torch.testing.assert_close(gear_attention_from_cache(q, cache, 0, [0, 1]), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    torch.testing.assert_close(gear_attention_from_cache(q, cache, 0, [0, 1]), ref, atol=ATOL, rtol=0)
    if outlier_dtype == "int8":  # torch's schema checker cannot compare float8 inputs (no fp8 mul on CPU)
        monkeypatch.delenv("TRTCOMPRESS_GEAR_TRITON")
        op = torch.ops.trtcompress.gear_attention.default
        torch.library.opcheck(
            op, op_args_from_cache(q, cache, 0, [0, 1]), test_utils=("test_schema", "test_faketensor")
        )


@pytest.mark.parametrize(
    ("codec_name", "options", "sink"),
    [
        ("gear-2bit", {"outlier_dtype": "fp8"}, 1),
        ("gear-2bit", {"outlier_dtype": "int8"}, 0),
        ("kivi-2bit", {}, 1),
        ("gear-4bit", {"factor_dtype": "int4"}, 1),  # key rank 1, its factors two codes per byte
        ("gear-2bit", {"scale_dtype": "fp8"}, 1),  # fp8 group scales with block maxima
    ],
)
def test_tensorrt_entry_reads_its_inputs_in_plugin_order(codec_name: str, options: dict, sink: int) -> None:
    """`gear_decode_trt_kernel` (what the TensorRT plugin launches) given its inputs in the plugin's order
    (trt.INPUT_NAMES: one-byte outlier scales and sink slots included) matches the reference."""
    from trtcompress.plugins.gear_attention.kernel import gear_decode_trt_kernel
    from trtcompress.plugins.gear_attention.trt import FIELDS, INPUT_NAMES, kernel_constants

    heads, q_heads, dim = 3, 9, 64
    cache = _filled_cache(codec_name, [200, 70], heads=heads, seed=11, sink=sink, **options)
    args = _inputs(cache, [0, 1])
    k_fields, v_fields, k_tail, v_tail, table, nb, tail_lens, slots = args
    layout = layout_for_codec(cache.codec, dim, sink)
    q = torch.randn(2, q_heads, dim, generator=torch.Generator().manual_seed(3))
    ref = gear_attention_reference(q, *args, layout, 0.125, **_sinks(cache))
    placeholder = torch.zeros(1, dtype=torch.float16)
    sinks = [cache.sinks[k][0].contiguous() for k in "kv"] if sink else [placeholder, placeholder]
    inputs = [q.half(), *(t.to(torch.int32).contiguous() for t in (table, nb, tail_lens, slots))]
    for fields in (k_fields, v_fields):
        inputs += [fields[n].contiguous() if n in fields else placeholder for n in FIELDS]
    inputs += [k_tail.contiguous(), v_tail.contiguous(), *sinks]
    assert len(inputs) == len(INPUT_NAMES)
    out = torch.empty(2, q_heads, dim)
    constants = kernel_constants(layout, heads, q_heads, dim, 0.125, asm=False)
    gear_decode_trt_kernel[(2, heads, 1)](*inputs, table.shape[1], out, **constants)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("splits", [1, 2])
def test_an_empty_sequence_attends_to_nothing(splits: int) -> None:
    """A sequence with no tokens yet (a CUDA-graph padding row: no blocks, empty tail): zeros from the
    kernel, as from the reference, not 0 / 0; the other rows unaffected."""
    cache = _filled_cache("kivi-2bit", [100, 0, 70], seed=2)  # sequence 1 holds nothing
    seqs = [0, 1, 2]
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(5))
    args, layout = _inputs(cache, seqs), layout_for_codec(cache.codec, 64)
    ref = gear_attention_reference(q, *args, layout, 0.125)
    assert not ref[1].any()
    out = gear_attention_triton(q, *args, layout, 0.125, splits=splits)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_head_dim_32_takes_one_value_group_per_token() -> None:
    """A head dim that is not a multiple of the codec's group (32 < 64): one value group per token, as
    the codec stores it (`value_group`), in the reference, the op and the kernel."""
    from trtcompress.plugins.gear_attention.op import gear_attention_from_cache

    cache = _filled_cache("gear-2bit", [150], heads=2, dim=32, seed=6)
    q = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(7))
    dense = _dense(q, cache, [0], 32**-0.5)
    args, layout = _inputs(cache, [0]), layout_for_codec(cache.codec, 32)
    torch.testing.assert_close(
        gear_attention_reference(q, *args, layout, 32**-0.5), dense, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(gear_attention_from_cache(q, cache, 0, [0]), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        gear_attention_triton(q, *args, layout, 32**-0.5, splits=2), dense, atol=ATOL, rtol=0
    )


def test_op_reads_value_outliers_when_keys_have_none() -> None:
    """Block-scope outliers on values only (key_outlier_ratio 0): the op must not take the values'
    indices for group-scope ones because the keys have none."""
    from trtcompress.plugins.gear_attention.op import gear_attention_from_cache

    cache = _filled_cache("gear-2bit", [150], seed=8, key_outlier_ratio=0.0)
    assert "out_idx" not in cache.pools["k"] and "out_idx" in cache.pools["v"]
    q = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        gear_attention_from_cache(q, cache, 0, [0]), _dense(q, cache, [0], 0.125), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("triton_path", [False, True])
def test_op_refuses_queries_that_do_not_fit_the_cache(triton_path: bool, monkeypatch) -> None:
    """3 query heads over 2 KV heads: the kernel attended with a silently wrong GQA grouping (the
    reference failed on a view); both paths now refuse it, as they do a head dim the cache does not hold."""
    from trtcompress.plugins.gear_attention.op import gear_attention_from_cache

    if triton_path:
        monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    cache = _filled_cache("gear-2bit", [70])
    for q in (torch.randn(1, 3, 64), torch.randn(1, 4, 32)):
        with pytest.raises(ValueError, match="multiple of the cache's 2 KV heads"):
            gear_attention_from_cache(q, cache, 0, [0])


@pytest.mark.parametrize("triton_path", [False, True])
def test_op_refuses_a_batch_the_block_table_does_not_hold(triton_path: bool, monkeypatch) -> None:
    """q for more sequences than the block table / lengths / slots hold: the kernel read past their end
    (a crash under TRITON_INTERPRET, garbage on a GPU) and the reference failed on an IndexError; q for
    fewer was attended silently against the first rows. Both paths and the fake implementation refuse."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trtcompress.plugins.gear_attention.op import gear_attention, op_args_from_cache

    cache = _filled_cache("kivi-2bit", [100, 70])
    args = list(op_args_from_cache(torch.randn(2, 4, 64), cache, 0, [0, 1]))
    if triton_path:  # (a q of 3 rows, past the table's 2, crashed this process: only the smaller q here)
        monkeypatch.setenv("TRTCOMPRESS_GEAR_TRITON", "1")
    for batch in (1,) if triton_path else (1, 3):
        q = torch.randn(batch, 4, 64)
        with pytest.raises(ValueError, match="one row per query sequence"):
            gear_attention(q, *args[1:])
        mode = FakeTensorMode()
        fake = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in (q, *args[1:])]
        with mode, pytest.raises(ValueError, match="one row per query sequence"):
            gear_attention(*fake)
