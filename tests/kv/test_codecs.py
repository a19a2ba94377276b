"""KV codecs: exact byte layouts, round trips, and the properties GEAR adds over KIVI."""

from __future__ import annotations

import pytest
import torch

from trtcompress.kv import codec_names, get_codec
from trtcompress.kv.gear import GearCodec, outliers_per_side, power_iteration
from trtcompress.kv.quant import levels, minmax_params, pack_bits, quantize_rows, unpack_bits

NAMES = ["fp16", "int8", "fp8", "kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit", "gear-4bit"]


def _kv(seed: int = 0, shape=(3, 2, 64, 64)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., 5] *= 6  # an outlier key channel, as real keys have
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_registry_names_exact() -> None:
    assert sorted(codec_names()) == sorted(NAMES)
    with pytest.raises(ValueError, match="did you mean 'gear-2bit'"):
        get_codec("gear-2bits")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, 64), codes)
    # LSB first: element 0 sits in the lowest bits of byte 0
    assert packed[0, 0].item() & (2**bits - 1) == codes[0, 0].item()


def test_levels_use_two_to_the_bits() -> None:
    assert [levels(b) for b in (2, 3, 4)] == [3, 7, 15]  # not bits**2 - 1 (= 8 for 3 bits)
    codec = get_codec("kivi-3bit")
    x = torch.linspace(-1, 1, 64).repeat(1, 64, 1)  # (H=1, T=64, D=64) values ramp per token
    fields = codec.compress(x, "v")
    codes = unpack_bits(fields["codes"], 3, 64)
    assert codes.unique().numel() == 8  # 8 levels, 7 steps
    # a uniform ramp on 7 steps: rms error = step / sqrt(12) = (2 / 7) / 3.46, i.e. 0.143 of the rms
    assert _rel(codec.decompress(fields, "v", 64, 64), x) == pytest.approx(0.143, abs=0.01)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["k", "v"])
def test_layout_is_exact(name: str, kind: str) -> None:
    codec = get_codec(name)
    x = _kv()
    fields = codec.compress(x, kind)
    layout = codec.layout(kind, 64, 64)
    assert set(fields) == set(layout)
    total = 0
    for field, spec in layout.items():
        assert fields[field].dtype == spec.dtype, field
        assert tuple(fields[field].shape) == (3, 2, *spec.shape), field
        total += fields[field][0, 0].numel() * fields[field].element_size()
    assert codec.block_bytes(kind, 64, 64) == total
    out = codec.decompress(fields, kind, 64, 64)
    assert out.shape == x.shape and out.dtype == torch.float32


def test_bits_per_element() -> None:
    # fp16 scale + fp16 zero per group of 64: KIVI-b = b + 0.5 bits/element (the published 2.5 for KIVI-2).
    for bits in (2, 3, 4):
        assert get_codec(f"kivi-{bits}bit").bytes_per_token(64, 64) * 8 / 128 == pytest.approx(bits + 0.5)
    assert get_codec("fp16").bytes_per_token(64, 64) == 256
    assert get_codec("int8").bytes_per_token(64, 64) == 128 + 4


@pytest.mark.parametrize("kind", ["k", "v"])
def test_errors_order(kind: str) -> None:
    x = _kv(1)
    err = {n: _rel(get_codec(n).decompress(get_codec(n).compress(x, kind), kind, 64, 64), x) for n in NAMES}
    assert err["fp16"] < 1e-3
    assert err["int8"] < 0.02 and err["fp8"] < 0.04
    assert err["kivi-4bit"] < err["kivi-3bit"] < err["kivi-2bit"]
    assert err["gear-2bit"] < 0.8 * err["kivi-2bit"]
    assert err["gear-4bit"] < 0.8 * err["kivi-4bit"]


@pytest.mark.parametrize(("name", "qmax"), [("int8", 127.0), ("fp8", 448.0)])
def test_scaled_codecs_map_each_tokens_absmax_to_the_largest_code(name: str, qmax: float) -> None:
    """A scale of absmax / 120 for int8 stayed well inside test_errors_order's 2% bound (1.06% measured,
    1.12% with it): the largest |code| of every token and head must be the grid's maximum, and int8 round
    to within half a step (plus the fp16 scale's rounding)."""
    x = _kv(1)
    codec = get_codec(name)
    fields = codec.compress(x, "k")
    assert torch.equal(fields["codes"].float().abs().amax(-1), torch.full(x.shape[:-1], qmax))
    if name == "int8":
        err = (codec.decompress(fields, "k", 64, 64) - x).abs()
        assert (err <= 0.51 * fields["scale"].float()[..., None]).all()


def test_keys_are_quantized_per_channel() -> None:
    # One huge channel must not spoil the others: per-channel groups isolate it (per-token would not).
    x = _kv(2)
    x[..., 9] *= 100
    codec = get_codec("kivi-4bit")
    out = codec.decompress(codec.compress(x, "k"), "k", 64, 64)
    others = [c for c in range(64) if c != 9]
    assert _rel(out[..., others], x[..., others]) < 0.15
    per_token = codec.decompress(codec.compress(x, "v"), "v", 64, 64)
    assert _rel(per_token[..., others], x[..., others]) > 1.0


def test_gear_outliers_exact() -> None:
    x = _kv(3)
    x[0, 0, 17, 33] = 250.0
    x[0, 0, 40, 2] = -300.0
    codec = get_codec("gear-2bit", rank=0, outlier_dtype="fp16")
    default = get_codec("gear-2bit", rank=0)  # fp8 E4M3 corrections: 3 mantissa bits
    for kind in ("k", "v"):  # exact up to the fp16 rounding of the stored correction (2**-11 relative)
        out = codec.decompress(codec.compress(x, kind), kind, 64, 64)
        assert out[0, 0, 17, 33].item() == pytest.approx(250.0, rel=2**-11)
        assert out[0, 0, 40, 2].item() == pytest.approx(-300.0, rel=2**-11)
        out = default.decompress(default.compress(x, kind), kind, 64, 64)
        assert out[0, 0, 17, 33].item() == pytest.approx(250.0, rel=2**-4)
        assert out[0, 0, 40, 2].item() == pytest.approx(-300.0, rel=2**-4)
    assert (
        outliers_per_side(0.02, 64) == 1 and outliers_per_side(0.1, 64) == 4 and outliers_per_side(0, 64) == 0
    )


def test_power_iteration_recovers_low_rank() -> None:
    gen = torch.Generator().manual_seed(4)
    low = torch.randn(2, 64, 3, generator=gen) @ torch.randn(2, 3, 64, generator=gen)
    a, b = power_iteration(low, 3)
    assert _rel(a @ b.transpose(-1, -2), low) < 1e-4
    a, b = power_iteration(low, 1)
    assert 0.05 < _rel(a @ b.transpose(-1, -2), low) < 1.0


def test_gear_low_rank_helps_and_costs() -> None:
    x = _kv(5) + torch.randn(3, 2, 64, 1) @ torch.randn(3, 2, 1, 64) * 2  # a low-rank structure
    plain, ranked = GearCodec(bits=2, rank=0), GearCodec(bits=2, rank=2)
    e0 = _rel(plain.decompress(plain.compress(x, "v"), "v", 64, 64), x)
    e2 = _rel(ranked.decompress(ranked.compress(x, "v"), "v", 64, 64), x)
    assert e2 < e0
    # int8 factors + fp16 column scales: (64 + 64) * 2 + 4 * 2 bytes per block and head
    assert ranked.block_bytes("v", 64, 64) - plain.block_bytes("v", 64, 64) == 256 + 8
    fp16 = GearCodec(bits=2, rank=2, factor_dtype="fp16")
    assert fp16.block_bytes("v", 64, 64) - plain.block_bytes("v", 64, 64) == 512


def test_int4_factors_halve_the_low_rank_bytes() -> None:
    """factor_dtype int4: two codes per byte along tokens / channels, one fp16 scale per rank column;
    the residual it keeps is within a few percent of int8 factors' and still beats no low rank."""
    from trtcompress.kv.gear import _pack_int4_rows, unpack_int4_rows

    codes = torch.randint(-7, 8, (3, 64, 2)).float()
    assert torch.equal(unpack_int4_rows(_pack_int4_rows(codes)), codes)
    x = _kv(5) + torch.randn(3, 2, 64, 1) @ torch.randn(3, 2, 1, 64) * 2
    plain = GearCodec(bits=2, rank=0)
    int8, int4 = GearCodec(bits=2, rank=2), GearCodec(bits=2, rank=2, factor_dtype="int4")
    assert int4.block_bytes("v", 64, 64) - plain.block_bytes("v", 64, 64) == 128 + 8  # (64 + 64) * 2 / 2
    fields = int4.compress(x, "v")
    assert fields["lr_a"].dtype == torch.uint8 and fields["lr_a"].shape[-2:] == (32, 2)
    errors = [_rel(c.decompress(c.compress(x, "v"), "v", 64, 64), x) for c in (plain, int8, int4)]
    assert errors[2] < errors[0] and errors[2] < 1.05 * errors[1]
    with pytest.raises(ValueError, match="factor_dtype must be int8, int4 or fp16"):
        GearCodec(bits=2, factor_dtype="int2")


def test_int4_factors_in_the_kernel_layout() -> None:
    from trtcompress.plugins.gear_attention.reference import layout_for_codec

    layout = layout_for_codec(get_codec("gear-2bit", key_rank=1, factor_dtype="int4"))
    assert layout.int4_factors and layout.int8_factors  # integer codes with column scales, packed
    assert not layout_for_codec(get_codec("gear-2bit", key_rank=1)).int4_factors


def test_prefill_rank_sizes_the_slot() -> None:
    codec = GearCodec(bits=2, rank=2, prefill_rank=4)
    x = _kv(6)
    pre, dec = codec.compress(x, "k", phase="prefill"), codec.compress(x, "k", phase="decode")
    assert pre["lr_a"].shape[-1] == dec["lr_a"].shape[-1] == 4
    assert torch.count_nonzero(dec["lr_a"][..., 2:]) == 0 and torch.count_nonzero(pre["lr_a"][..., 2:]) > 0
    e_pre = _rel(codec.decompress(pre, "k", 64, 64), x)
    e_dec = _rel(codec.decompress(dec, "k", 64, 64), x)
    assert e_pre < e_dec


def test_prefill_rank_below_the_decode_rank_is_used() -> None:
    """A prefill_rank smaller than the decode rank was ignored: prefill blocks took the slot's rank."""
    x = _kv(8)
    for rank, prefill_rank in ((2, 0), (3, 1)):
        codec = GearCodec(bits=2, rank=rank, prefill_rank=prefill_rank)
        pre, dec = codec.compress(x, "k", phase="prefill"), codec.compress(x, "k", phase="decode")
        assert pre["lr_a"].shape[-1] == dec["lr_a"].shape[-1] == rank  # the slot: the larger rank
        assert torch.count_nonzero(pre["lr_a"][..., prefill_rank:]) == 0
        assert torch.count_nonzero(pre["lr_a"][..., :prefill_rank]) > 0 or prefill_rank == 0
        assert torch.count_nonzero(dec["lr_a"]) > 0


def test_compression_is_deterministic() -> None:
    x = _kv(7)
    codec = get_codec("gear-2bit")
    a, b = codec.compress(x, "v"), codec.compress(x.clone(), "v")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_value_groups_for_small_heads() -> None:
    # head_dim 24 (the tiny test model): one value group per token; keys still per channel over 64 tokens
    x = torch.randn(2, 64, 24)
    for name in NAMES:
        codec = get_codec(name)
        for kind in ("k", "v"):
            out = codec.decompress(codec.compress(x, kind), kind, 64, 24)
            assert out.shape == x.shape and torch.isfinite(out).all()


def test_block_must_cover_key_groups() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        get_codec("kivi-2bit").compress(torch.randn(1, 32, 64), "k")


def test_range_search_never_worse_than_minmax() -> None:
    from trtcompress.kv.quant import dequantize_rows, search_params

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 64, generator=gen) * torch.rand(200, 1, generator=gen) * 4
    exclude = torch.rand(200, 64, generator=gen) < 0.02
    for bits in (2, 3, 4):
        for ex in (None, exclude):
            keep = ~ex if ex is not None else torch.ones_like(x, dtype=torch.bool)

            def err(s, z, bits=bits, keep=keep):
                deq = dequantize_rows(quantize_rows(x, s, z, bits), s, z)
                return ((deq - x).square() * keep).sum(-1)

            e_search, e_minmax = err(*search_params(x, bits, ex, 11)), err(*minmax_params(x, bits, ex))
            assert (e_search <= e_minmax * (1 + 1e-6)).all()
            if bits == 2:
                assert e_search.sum() < 0.8 * e_minmax.sum()  # min/max wastes 2-bit levels on the tails
    s1, z1 = search_params(x, 2, None, 1)  # one step = min/max
    s0, z0 = minmax_params(x, 2)
    assert torch.equal(s1, s0) and torch.equal(z1, z0)


@pytest.mark.parametrize("outlier_dtype", ["int8", "fp8"])
def test_one_byte_outlier_corrections(outlier_dtype: str) -> None:
    """Block-scope corrections in one byte each plus one fp16 scale per block and head: the bytes drop
    by one per outlier less the scale, every outlier still lands within its rounding, and what
    decompression reproduces is what the low-rank residual and the layout were computed from."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 64, generator=gen) * torch.where(
        torch.rand(1, 1, 64, generator=gen) < 0.05, 9.0, 1.0
    )
    exact = get_codec("gear-2bit", outlier_dtype="fp16")
    small = get_codec("gear-2bit", outlier_dtype=outlier_dtype)
    for kind in ("k", "v"):
        budget = exact.layout(kind, 64, 64)["out_val"].shape[0]
        saved = exact.block_bytes(kind, 64, 64) - small.block_bytes(kind, 64, 64)
        assert saved == budget - 2  # one byte per correction, plus a 2-byte scale
        fields = small.compress(x, kind)
        assert {k: v.shape for k, v in fields.items()} == {
            k: (2, *spec.shape) for k, spec in small.layout(kind, 64, 64).items()
        }
        want = exact.decompress(exact.compress(x, kind), kind, 64, 64)
        got = small.decompress(fields, kind, 64, 64)
        # only the outliers move, each by at most the byte's rounding of its correction (1/254 of the
        # largest correction of its block and head for int8, 1/16 of its own for fp8 E4M3) plus the fp16
        # rounding of the exact one (1/2048)
        largest = exact.compress(x, kind)["out_val"].float().abs().amax(-1)[:, None, None]
        moved = (got - want).abs()
        rounding = 1 / 254 if outlier_dtype == "int8" else 1 / 16
        assert (moved <= 1.01 * largest * (rounding + 1 / 2048)).all()
        assert ((moved > 0).flatten(1).sum(-1) <= budget).all()
        assert ((got - x) ** 2).mean() < 1.05 * ((want - x) ** 2).mean()


@pytest.mark.parametrize("name", ["gear-2bit:fp8", "gear-2bit:int8", "fp8", "int8"])
def test_a_zero_head_or_token_stays_finite(name: str) -> None:
    """A block-head with nothing to correct (all zeros: pruned or silent heads) and an all-zero token
    must decompress to finite values: their scales are clamped after the fp16 rounding (a zero scale
    would store 0 / 0 = NaN)."""
    codec_name, _, outlier_dtype = name.partition(":")
    codec = get_codec(codec_name, **({"outlier_dtype": outlier_dtype} if outlier_dtype else {}))
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    x[0] = 0.0  # a whole head
    x[1, 5] = 0.0  # one token
    x[1, 6] = 1e-7  # a token far below fp16's normal range
    for kind in ("k", "v"):
        out = codec.decompress(codec.compress(x, kind), kind, 64, 64)
        assert torch.isfinite(out).all()
        assert out[0].abs().max() < 1e-3  # the zero head stays (about) zero


def test_outlier_dtype_is_validated() -> None:
    from trtcompress.plugins.gear_attention.reference import layout_for_codec

    with pytest.raises(ValueError, match="outlier_dtype must be one of"):
        get_codec("gear-2bit", outlier_dtype="bf16")
    with pytest.raises(ValueError, match="needs outlier_scope: block"):
        get_codec("gear-2bit", outlier_dtype="fp8", outlier_scope="group")
    assert layout_for_codec(get_codec("gear-2bit")).outlier_dtype == "fp8"  # the default
    assert layout_for_codec(get_codec("gear-4bit")).outlier_scaled
    assert not layout_for_codec(get_codec("gear-2bit", outlier_dtype="fp16")).outlier_scaled
    # the paper's in-group outliers keep fp16 values (one-byte ones need a block scale)
    assert get_codec("gear-2bit", outlier_scope="group").outlier_dtype == "fp16"


@pytest.mark.parametrize("name", ["kivi-2bit", "gear-2bit"])
def test_fp8_scales_and_zeros(name: str) -> None:
    """scale_dtype fp8: group scales and zeros as float8 E4M3 with one fp16 maximum each per block and
    head (one byte each instead of two); codes computed with the rounded values, so the error stays
    close to fp16 metadata; a silent head stays finite (scales never round to 0)."""
    from trtcompress.plugins.gear_attention.reference import layout_for_codec

    x = _kv(7)
    x[0, 1] = 0.0  # a silent head
    fp16, fp8 = get_codec(name, scale_dtype="fp16"), get_codec(name, scale_dtype="fp8")
    groups = 64 * 1  # rows x groups per block and head (64 channels x 1 group of 64 tokens; 64 x 1)
    for kind in ("k", "v"):
        assert fp16.block_bytes(kind, 64, 64) - fp8.block_bytes(kind, 64, 64) == 2 * groups - 4
        fields = fp8.compress(x, kind)
        assert fields["scale"].dtype == fields["zero"].dtype == torch.float8_e4m3fn
        assert fields["scale_max"].shape == (3, 2, 1)
        got = fp8.decompress(fields, kind, 64, 64)
        want = fp16.decompress(fp16.compress(x, kind), kind, 64, 64)
        assert torch.isfinite(got).all() and got[0, 1].abs().max() < 1e-3
        assert _rel(got, x) < 1.1 * _rel(want, x)
    assert layout_for_codec(fp8).scales_fp8 and not layout_for_codec(fp16).scales_fp8
    with pytest.raises(ValueError, match="scale_dtype must be one of"):
        get_codec(name, scale_dtype="bf16")


@pytest.mark.parametrize(
    ("name", "options"),
    [("gear-2bit", {}), ("gear-2bit", {"outlier_dtype": "fp16", "scale_dtype": "fp16", "range_search": 0})],
)
def test_a_key_channel_taken_whole_by_outliers_stays_finite(name: str, options: dict) -> None:
    """A large two-valued key channel (±100) is all outliers: its group has no element left to quantize.
    Its range must not become (inf, -inf): that made the group, and through the block's shared fp8
    scales the whole block-head, NaN."""
    k = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(3))
    k[0, :, 5] = 100.0 * (torch.arange(64) % 2 * 2 - 1)
    codec = get_codec(name, **options)
    out = codec.decompress(codec.compress(k.half().float(), "k"), "k", 64, 64)
    assert torch.isfinite(out).all()
    assert (out - k).abs().max() < 8  # fp8 corrections of ±100 carry ~6% error; the rest is 2-bit


@pytest.mark.parametrize("options", [{"outlier_dtype": "fp16"}, {"outlier_scope": "group"}])
def test_fp16_corrections_past_the_fp16_range_stay_finite(options: dict) -> None:
    """A value outlier of +60000 in a token of -60000s (finite fp16 input): its correction x - deq
    exceeds 65504 and was stored as inf, which made the decompressed block inf (NaN in attention)."""
    v = torch.full((1, 64, 64), -60000.0) + torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(5))
    v[0, 5, 7] = 60000.0
    codec = get_codec("gear-2bit", **options)
    out = codec.decompress(codec.compress(v.half().float(), "v"), "v", 64, 64)
    assert torch.isfinite(out).all()
    assert out[0, 5, 7] > 0  # saturated, but on the outlier's side


@pytest.mark.parametrize("factor_dtype", ["fp16", "int4", "int8"])
def test_low_rank_factors_past_the_fp16_range_stay_finite(factor_dtype: str) -> None:
    """Key channels alternating ±65504 (finite fp16) leave a residual whose B factor column exceeds
    65504: fp16 factors stored it as inf, and the decompressed block was NaN."""
    k = (torch.arange(64) % 2 * 2 - 1.0).view(1, 64, 1).expand(1, 64, 64) * 65504
    codec = get_codec(
        "gear-2bit", rank=2, factor_dtype=factor_dtype, outlier_dtype="fp16", scale_dtype="fp16"
    )
    fields = codec.compress(k.contiguous(), "k")
    assert all(torch.isfinite(v.float()).all() for v in fields.values())
    out = codec.decompress(fields, "k", 64, 64)
    assert torch.isfinite(out).all()
    assert (out - k).abs().max() < 64


@pytest.mark.parametrize(("name", "options"), [("gear-2bit", {}), ("kivi-2bit", {"scale_dtype": "fp8"})])
@pytest.mark.parametrize("kind", ["k", "v"])
def test_fp8_zeros_at_the_fp16_limit_stay_finite(name: str, options: dict, kind: str) -> None:
    """A group whose minimum is -65504 (finite fp16): its fp8 zero's block maximum rounded up to
    146.25, and the code -448 read back as fp16(-448 x 146.25) = -inf, which made the whole group
    -inf (NaN in attention)."""
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(6))
    x[0, 3, :] = -65504.0  # a token (values: its group minimum) or, transposed, a channel (keys)
    x = x if kind == "v" else x.transpose(1, 2).contiguous()
    codec = get_codec(name, **options)
    out = codec.decompress(codec.compress(x, kind), kind, 64, 64)
    assert torch.isfinite(out).all()
    assert (out - x).abs().max() < 64  # the zero rounds to within an fp8 step of its block maximum


def test_group_outliers_of_a_tied_group_are_distinct() -> None:
    """Top and bottom outliers of an all-equal group: distinct elements, each corrected once."""
    codec = get_codec("gear-2bit", outlier_scope="group", outlier_dtype="fp16", scale_dtype="fp16")
    k = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(4))
    k[0, :, 3] = 0.3
    fields = codec.compress(k, "k")
    idx = fields["out_idx"][0, 3].long()
    assert idx.unique().numel() == idx.numel()
    out = codec.decompress(fields, "k", 64, 64)
    assert (out[0, :, 3] - k[0, :, 3].half().float()).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("gear-2bit", {"outlier_scope": "blok"}, "outlier_scope must be"),
        ("gear-2bit", {"outlier_ratio": 1.5}, "outlier ratio must be in"),
        ("gear-2bit", {"outlier_ratio": -0.1}, "outlier ratio must be in"),
        ("gear-2bit", {"outlier_scope": "group", "outlier_ratio": 0.99}, "leave part of each group"),
        ("gear-2bit", {"rank": -1}, "rank must be a whole number"),
        ("gear-2bit", {"rank": 2.5}, "rank must be a whole number"),
        ("gear-2bit", {"rank": 1, "power_iters": 0}, "power_iters must be"),
        ("gear-2bit", {"prefill_rank": 4}, "prefill_rank sizes a low-rank residual"),
        ("gear-4bit", {"bits": 2}, "the codec's name sets its bits"),
        ("kivi-2bit", {"bits": 4}, "the codec's name sets its bits"),
        ("kivi-2bit", {"group": 0}, "group must be a positive"),
        # these passed validation and failed at the first compressed block (TypeError in torch)
        ("gear-2bit", {"range_search": 2.5}, "range_search must be a whole number"),
        ("gear-2bit", {"range_search": True}, "range_search must be a whole number"),
        ("gear-2bit", {"key_outlier_std_power": "half"}, "key_outlier_std_power must be a finite"),
        ("gear-4bit", {"value_outlier_std_power": float("nan")}, "value_outlier_std_power must be a finite"),
        # a quoted number or a bool: a TypeError ("'<=' not supported between ...") or silently 1
        ("gear-2bit", {"outlier_ratio": "0.02"}, "outlier ratio must be in .* got '0.02'"),
        ("gear-2bit", {"value_outlier_ratio": "0.01"}, "value outlier ratio must be in"),
        ("gear-2bit", {"range_min": "0.5"}, r"range_min must be a number in \(0, 1\]"),
        ("gear-2bit", {"range_min": True}, r"range_min must be a number in \(0, 1\]"),
        ("gear-2bit", {"rank": 1, "power_iters": True}, "power_iters must be"),
        ("gear-2bit", {"key_rank": None}, "key rank must be a whole number"),
        # accepted, then 10**6 range steps asked for 49 GB at the first compressed block (a traceback
        # mid-evaluation) and 10**9 power iterations never finished it
        ("gear-2bit", {"range_search": 10**6}, r"range_search must be a whole number of steps in \[0, 256\]"),
        ("gear-2bit", {"range_search": 257}, r"range_search .* in \[0, 256\], got 257"),
        ("gear-2bit", {"rank": 1, "power_iters": 10**9}, r"power_iters must be a whole number in \[1, 100\]"),
    ],
)
def test_invalid_codec_options_are_refused(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_codec(name, **options)


@pytest.mark.parametrize(
    ("name", "options", "block", "dim", "in_recipe", "message"),
    [
        ("kivi-3bit", {"group": 20}, 20, 64, True, "a cache block of 20 holds 60 bits"),
        ("kivi-3bit", {}, 64, 68, False, "a head dim of 68 holds 204 bits"),
        ("gear-2bit", {"rank": 100}, 64, 64, True, "rank 100 exceeds what a block of 64 tokens"),
        ("gear-4bit", {"key_rank": 65}, 64, 128, True, "rank 65 exceeds what a block of 64 tokens"),
        ("gear-2bit", {"rank": 1, "prefill_rank": 80}, 128, 64, False, "rank 80 .* 128 tokens x 64 channels"),
        # the whole head (272 channels) is one value group: in-group index 270 stored as uint8 was 14
        ("gear-2bit", {"outlier_scope": "group"}, 64, 272, False, "value groups of 272 channels"),
    ],
)
def test_blocks_a_codec_cannot_store_are_refused_before_any_compression(
    name: str, options: dict, block: int, dim: int, in_recipe: bool, message: str
) -> None:
    """Such options used to pass validation and fail at the first full block (mid-evaluation or
    mid-serving) with a shape error from the bit packing or the power iteration, or silently restored
    an outlier at the wrong channel (uint8 in-group index past 255). What the block size
    alone decides fails in the recipe; what the head dim decides, when the cache is built."""
    from pydantic import ValidationError

    from trtcompress.kv.config import KVCacheConfig
    from trtcompress.kv.paged import PagedKVCache

    with pytest.raises(ValueError, match=message):
        PagedKVCache(get_codec(name, **options), 1, 2, dim, 4, block)
    if in_recipe:
        with pytest.raises(ValidationError, match=message):
            KVCacheConfig(codec=name, block_size=block, options=options)
    else:
        KVCacheConfig(codec=name, block_size=block, options=options)  # the head dim is not known there


def test_a_per_kind_rank_given_with_rank_is_not_ignored() -> None:
    """`rank` with `key_rank` / `value_rank`: the per-kind one overrides `rank` for its kind, as
    `key_outlier_ratio` does `outlier_ratio`. It was silently ignored (value_rank 0 with rank 2 stored
    and computed a value rank of 2, and counted its bytes)."""
    codec = get_codec("gear-2bit", rank=2, value_rank=0)
    assert codec.rank == {"k": 2, "v": 0}
    assert "lr_a" in codec.layout("k", 64, 64) and "lr_a" not in codec.layout("v", 64, 64)
    assert "lr_a" not in codec.compress(_kv(), "v")
    assert GearCodec(bits=2, rank=3, key_rank=1).rank == {"k": 1, "v": 3}
    assert get_codec("gear-2bit", rank=3).rank == {"k": 3, "v": 3}  # rank alone still sets both
    assert GearCodec(bits=2).rank == {"k": 2, "v": 2}


def test_describe_reports_a_per_group_outlier_count_only_where_there_is_one() -> None:
    """`eval --kv gear-2bit` reported `outliers_per_group: {k: 2, v: 2}` in its details for the default
    block scope, whose 3% budget is shared by the block's groups (46 outliers of a 64 x 24 key block,
    several in a heavy-tailed group, none in others): a count that codec never used."""
    block = get_codec("gear-2bit").describe()
    assert block["outlier_scope"] == "block" and block["outliers_per_group"] is None
    group = get_codec("gear-2bit", outlier_scope="group", outlier_ratio=0.04).describe()
    assert group["outliers_per_group"] == {"k": 4, "v": 4}  # ceil(0.02 x 64) = 2 at each end
    x = _kv()
    fields = get_codec("gear-2bit", outlier_scope="group", outlier_ratio=0.04).compress(x, "k")
    assert fields["out_idx"].shape[-1] == 4  # one 64-token group per channel row: 4 outliers stored
