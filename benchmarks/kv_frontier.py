"""KV-cache bytes versus fidelity on SmolLM2-135M: FP16, INT8, FP8, KIVI-2/3/4 and GEAR (+ ablations).

Every point decodes the perplexity windows token by token (teacher forced; `extend` has the arithmetic
of token-by-token decoding, up to summation order: kv_decode_equivalence.py) with the compressed
cache, and scores GSM8K gold answers after a prefilled question, against the same model with an fp16
cache. Bytes per token are what the cache holds at the
context length (compressed blocks + fp16 tail, averaged over the tail's cycle), all metadata counted.
Also measures codec compression throughput on CPU against the decode step.

    python benchmarks/kv_frontier.py [--context 2048] [--ppl-tokens 2048] [--gsm8k 16] [--only a,b]

Writes benchmarks/results/kv_frontier_ctx{C}.json and .png (rewritten after every point).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from trtcompress.eval.datasets import TokenStream, gsm8k_problems
from trtcompress.kv import get_codec
from trtcompress.kv.codec import KVCodec
from trtcompress.kv.decode import CachedDecoder, cache_for_model
from trtcompress.kv.evaluate import answer_logits, fidelity_from_logits, kv_perplexity
from trtcompress.kv.kivi import KiviCodec
from trtcompress.models import load_model

RESULTS = Path(__file__).parent / "results"

# (label, family, codec name, options, block size, sink tokens). The default cache keeps the first
# token exact (kv_cache.sink_tokens = 1) for every codec; "no sink" points measure without it.
# KIVI-8 extends the KIVI curve past 4.5 bits.
OLD = {"outlier_ratio": 0.01, "key_rank": 1, "key_outlier_std_power": 1.0, "range_search": 0}
POINTS: list[tuple[str, str, str, dict[str, Any], int, int]] = [  # most important first
    ("fp16", "baseline", "fp16", {}, 64, 0),
    ("gear-2bit", "gear", "gear-2bit", {}, 64, 1),
    ("kivi-2bit", "kivi", "kivi-2bit", {}, 64, 1),
    ("kivi-3bit", "kivi", "kivi-3bit", {}, 64, 1),
    ("kivi-4bit", "kivi", "kivi-4bit", {}, 64, 1),
    ("gear-4bit", "gear", "gear-4bit", {}, 64, 1),
    ("gear-2bit no sink", "gear", "gear-2bit", {}, 64, 0),
    ("kivi-2bit no sink", "kivi", "kivi-2bit", {}, 64, 0),
    ("kivi-3bit no sink", "kivi", "kivi-3bit", {}, 64, 0),
    ("kivi-4bit no sink", "kivi", "kivi-4bit", {}, 64, 0),
    ("gear-4bit no sink", "gear", "gear-4bit", {}, 64, 0),
    ("kivi-8bit", "kivi", "kivi-8bit", {}, 64, 1),
    ("kivi-8bit no sink", "kivi", "kivi-8bit", {}, 64, 0),  # the no-sink curve past 4.5 bits
    ("gear-2bit key rank 2", "gear", "gear-2bit", {"key_rank": 2}, 64, 1),
    ("gear-2bit key rank 2 no sink", "gear", "gear-2bit", {"key_rank": 2}, 64, 0),
    (
        "gear-2bit key rank 2 + min/max range",
        "gear",
        "gear-2bit",
        {"key_rank": 2, "range_search": 0},
        64,
        1,
    ),
    (
        "gear-2bit key rank 2 + z-score key outliers",
        "gear",
        "gear-2bit",
        {"key_rank": 2, "key_outlier_std_power": 1.0},
        64,
        1,
    ),
    ("gear-2bit key rank 1 (previous default)", "gear", "gear-2bit", {"key_rank": 1}, 64, 1),
    (
        "gear-2bit 2% outliers + key rank 4",
        "gear",
        "gear-2bit",
        {"outlier_ratio": 0.02, "key_rank": 4},
        64,
        1,
    ),
    (
        "gear-2bit 1% outliers + key rank 1",
        "gear",
        "gear-2bit",
        {"outlier_ratio": 0.01, "key_rank": 1},
        64,
        1,
    ),
    ("gear-2bit previous defaults (no sink)", "gear", "gear-2bit", OLD, 64, 0),
    (
        "gear-2bit 2% / 1% outliers",
        "gear",
        "gear-2bit",
        {"key_outlier_ratio": 0.02, "value_outlier_ratio": 0.01},
        64,
        1,
    ),
    (
        "gear-2bit 4% / 2% outliers",
        "gear",
        "gear-2bit",
        {"key_outlier_ratio": 0.04, "value_outlier_ratio": 0.02},
        64,
        1,
    ),
    ("gear-2bit buffer 128 (block 128)", "gear", "gear-2bit", {}, 128, 1),
    ("gear-2bit buffer 32 (group 32)", "gear", "gear-2bit", {"group": 32}, 32, 1),
    ("int8", "baseline", "int8", {}, 64, 1),
    ("fp8", "baseline", "fp8", {}, 64, 1),
    ("gear-2bit int8 outliers", "gear", "gear-2bit", {"outlier_dtype": "int8"}, 64, 1),
]
# The GEAR points above as measured first: fp16 outlier corrections (the default until the sixth
# session). Every GEAR point again with one-byte outlier corrections (fp8 E4M3 and one fp16 scale per
# block and head instead of fp16 each; today's default), and the points with a low-rank residual also
# with int4 factors (two codes per byte, one fp16 scale per rank column; int8 is the default, which
# the fused kernel reads).
# The base points keep fp16 group scales explicitly (gear-2bit's default is fp8 since the seventh
# session); the "+ fp8 scales" points below add them.
POINTS = [
    (
        label,
        family,
        name,
        ({"outlier_dtype": "fp16", "scale_dtype": "fp16"} | options) if family == "gear" else options,
        block,
        sink,
    )
    for label, family, name, options, block, sink in POINTS
]
POINTS += [
    (f"{label} [fp8 outliers]", family, name, options | {"outlier_dtype": "fp8"}, block, sink)
    for label, family, name, options, block, sink in list(POINTS)
    if family == "gear" and options["outlier_dtype"] == "fp16"
]
INT4_FACTORS = {"factor_dtype": "int4"}
POINTS += [
    (
        label.replace("[fp8 outliers]", "[fp8 outliers + int4 factors]"),
        family,
        name,
        options | INT4_FACTORS,
        block,
        sink,
    )
    for label, family, name, options, block, sink in list(POINTS)
    if label.endswith("[fp8 outliers]")
    and ("rank" in label or name == "gear-4bit" or options.get("key_rank"))
]
# Each GEAR setting in its most compact form (fp8 outliers, int4 factors where it has a low rank) also
# with fp8 group scales and zeros (`scale_dtype: fp8`, one fp16 maximum per block and head; read by
# decompression only); KIVI with the same metadata gives the second curve these are compared with.
FP8_SCALES = {"scale_dtype": "fp8"}
_compact: dict[str, tuple] = {}
for _p in POINTS:
    for _suffix in (" [fp8 outliers]", " [fp8 outliers + int4 factors]"):  # the second one wins
        if _p[0].endswith(_suffix):
            _compact[_p[0].removesuffix(_suffix)] = _p
POINTS += [
    (label[:-1] + " + fp8 scales]", family, name, options | FP8_SCALES, block, sink)
    for label, family, name, options, block, sink in _compact.values()
]
# gear-2bit's default form since the seventh session (fp8 outliers, int8 factors, fp8 scales) for the
# settings with a low rank, whose most compact form above has int4 factors.
_labels = {p[0] for p in POINTS}
POINTS += [
    (label[:-1] + " + fp8 scales]", family, name, options | FP8_SCALES, block, sink)
    for label, family, name, options, block, sink in list(POINTS)
    if label.endswith("[fp8 outliers]")
    and name == "gear-2bit"
    and label[:-1] + " + fp8 scales]" not in _labels
]
POINTS += [
    (f"{k} [fp8 scales]", "kivi", k, FP8_SCALES, 64, 1) for k in ("kivi-2bit", "kivi-3bit", "kivi-4bit")
]
MAIN = ("kivi-2bit", "kivi-3bit", "kivi-4bit", "kivi-8bit")  # the KIVI curve: default cache (sink 1)
MAIN_FP8_SCALES = tuple(f"{k} [fp8 scales]" for k in MAIN[:3])  # KIVI with fp8 scales and zeros


def make_codec(name: str, options: dict[str, Any]) -> KVCodec:
    if name == "kivi-8bit":
        codec = KiviCodec(bits=8)
        codec.name = "kivi-8bit"
        return codec
    return get_codec(name, **options)


def kivi_curve_at(
    points: list[dict], x: float, key: str, sink: bool = True, labels: tuple[str, ...] | None = None
) -> float | None:
    """The KIVI curve (straight segments between KIVI points, block 64, with or without the sink
    token like the point compared with it; or between the points `labels`) at `x` bytes/token."""
    if labels is None:
        labels = MAIN if sink else tuple(f"{m} no sink" for m in MAIN)
    kivi = sorted(
        (p["kv_bytes_per_token"], p[key]) for p in points if p["label"] in labels and p.get(key) is not None
    )
    for (x0, y0), (x1, y1) in itertools.pairwise(kivi):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def plot(points: list[dict], path: Path, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, title in (
        (axes[0], "ppl_ratio", "perplexity ratio vs fp16 cache"),
        (axes[1], "gsm8k_kl", "GSM8K answer KL vs fp16 cache (nats/token)"),
    ):
        for names, style, color, label in (
            (MAIN, "o-", "tab:blue", "KIVI 2/3/4/8-bit (sink 1)"),
            (tuple(f"{m} no sink" for m in MAIN), "o--", "lightsteelblue", "KIVI, no sink"),
            (MAIN_FP8_SCALES, "o:", "tab:green", "KIVI 2/3/4-bit, fp8 scales"),
        ):
            kivi = sorted((p["kv_bytes_ratio"] * 100, p[key]) for p in points if p["label"] in names)
            if kivi:
                ax.plot(*zip(*kivi, strict=True), style, color=color, label=label)
        for p in points:
            x, y = p["kv_bytes_ratio"] * 100, p[key]
            if p["family"] == "gear":
                main = p["label"] in ("gear-2bit", "gear-4bit")
                nosink = "no sink" in p["label"]
                ax.plot(
                    x,
                    y,
                    "*" if main else ("v" if nosink else "^"),
                    color="tab:red" if main else ("tab:purple" if nosink else "tab:orange"),
                    ms=12 if main else 7,
                )
            elif p["family"] == "baseline" and p["label"] != "fp16":
                ax.plot(x, y, "s", color="tab:gray")
            else:
                continue
            ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axvline(25, color="k", ls=":", lw=0.8)
        if key == "ppl_ratio":
            ax.axhline(1.05, color="k", ls=":", lw=0.8)
            ax.set_ylim(0.99, 1.5)
        ax.set_xlabel(
            f"KV bytes/token, % of fp16 (context {context}, all metadata, fp16 tail and sink counted)"
        )
        ax.set_yscale("log" if key == "gsm8k_kl" else "linear")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compression_throughput(model, codec: KVCodec, repeats: int = 3) -> dict[str, float]:
    """Tokens/s at which the codec compresses full blocks for all layers (K and V), on this CPU."""
    cfg = model.config
    layers, heads, dim = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    x = torch.randn(layers, heads, 64, dim)
    codec.compress(x, "k")
    start = time.perf_counter()
    for _ in range(repeats):
        codec.compress(x, "k")
        codec.compress(x, "v")
    per_block = (time.perf_counter() - start) / repeats
    return {"compress_tokens_per_s": 64 / per_block, "compress_ms_per_block_all_layers": per_block * 1e3}


def decode_step_seconds(model, codec: KVCodec, context: int = 1024, steps: int = 8) -> float:
    """Mean seconds of `steps` decode steps at `context` tokens, after one untimed decode step: the first
    step after the prefill pays one-off work (allocations, a first decompression of the prefix blocks),
    which inflated the mean of 8 steps (and so shrank the compression share computed against it)."""
    ids = torch.randint(1, 1000, (context + steps + 1,))
    dec = CachedDecoder(model, cache_for_model(model, codec, context + 2 * steps + 64))
    dec.prefill(0, ids[:context])
    dec.decode([0], ids[context : context + 1])  # warm-up, not timed
    start = time.perf_counter()
    for i in range(1, steps + 1):
        dec.decode([0], ids[context + i : context + i + 1])
    return (time.perf_counter() - start) / steps


def bytes_breakdown(codec: KVCodec, block: int, dim: int = 64) -> dict[str, float]:
    """Bits per element of one full block, per field, K and V averaged (what `layout` allocates)."""
    out: dict[str, float] = {}
    for kind in ("k", "v"):
        for name, spec in codec.layout(kind, block, dim).items():
            out[f"{kind}.{name}"] = spec.nbytes * 8 / (block * dim) / 2
    return out


def finish(result: dict, points: list[dict], out_json: Path) -> dict:
    """Compare every point with the KIVI curve at its bytes, write the json and the plot."""
    for p in points:
        for key in ("ppl_ratio", "gsm8k_kl"):
            sink = p.get("sink_tokens", 1) > 0
            curve = kivi_curve_at(points, p["kv_bytes_per_token"], key, sink)
            p[f"kivi_curve_{key}"] = curve
            p[f"below_kivi_{key}"] = None if curve is None or p["family"] != "gear" else p[key] < curve
            if "fp8 scales" in p["label"] and sink:  # also against KIVI with the same fp8 metadata
                curve = kivi_curve_at(points, p["kv_bytes_per_token"], key, labels=MAIN_FP8_SCALES)
                p[f"kivi_fp8_scales_curve_{key}"] = curve
    result = result | {"points": points}
    out_json.write_text(json.dumps(result, indent=1))
    plot(points, out_json.with_suffix(".png"), result["context"])
    return result


def markdown(result: dict) -> str:
    """The BENCHMARKS.md table of a results file."""
    lines = [
        "| point | KV bytes/token (% fp16) | block bits/elem | ppl | ppl ratio | KIVI curve ppl ratio "
        "| GSM8K KL | KIVI curve KL | top-1 | bpb |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(result["points"], key=lambda p: p["kv_bytes_per_token"]):
        curve = p.get("kivi_curve_ppl_ratio")
        curve_kl = p.get("kivi_curve_gsm8k_kl")
        lines.append(
            f"| {p['label']} | {p['kv_bytes_per_token']:,.0f} ({100 * p['kv_bytes_ratio']:.1f}%) | "
            f"{p['block_bits_per_element']:.2f} | {p['ppl']:.3f} | {p['ppl_ratio']:.4f} | "
            f"{'-' if curve is None or p['family'] != 'gear' else f'{curve:.4f}'} | {p['gsm8k_kl']:.4f} | "
            f"{'-' if curve_kl is None or p['family'] != 'gear' else f'{curve_kl:.4f}'} | "
            f"{p['gsm8k_top1']:.3f} | {p['gsm8k_bpb']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--gsm8k", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated labels")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--throughput-only", action="store_true", help="only the codec throughput section")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the saved results")
    parser.add_argument(
        "--out", default="", help="results file (default benchmarks/results/kv_frontier_ctx{C}.json)"
    )
    parser.add_argument("--merge", default="", help="comma-separated results files to merge into --out")
    args = parser.parse_args()
    main_json = RESULTS / f"kv_frontier_ctx{args.context}.json"
    if args.table:
        print(markdown(json.loads((Path(args.out) if args.out else main_json).read_text())))
        return
    if args.merge:  # runs split over processes: one fp16 reference each, the same protocol
        merged: dict = {}
        points: dict[str, dict] = {}
        for path in args.merge.split(","):
            part = json.loads(Path(path).read_text())
            merged |= {k: v for k, v in part.items() if k != "points"}
            points |= {p["label"]: p for p in part.get("points", [])}
        finish(
            merged,
            [points[p[0]] for p in POINTS if p[0] in points],
            Path(args.out) if args.out else main_json,
        )
        return
    torch.manual_seed(0)
    loaded = load_model(args.model, log=lambda m: None)
    model, tok = loaded.model, loaded.tokenizer
    window = TokenStream(tok).window(args.ppl_tokens)
    problems = gsm8k_problems(args.gsm8k)
    out_json = Path(args.out) if args.out else RESULTS / f"kv_frontier_ctx{args.context}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out_json.read_text()) if out_json.exists() else {}
    known = {p[0] for p in POINTS}
    rows: dict[str, dict] = {p["label"]: p for p in previous.get("points", []) if p["label"] in known}
    wanted = set(filter(None, args.only.split(",")))
    result = previous
    todo = [p for p in POINTS if not wanted or p[0] in wanted or p[0] == "fp16"]
    ref_ppl = None
    ref_logits = None
    for label, family, name, options, block, sink in [] if args.throughput_only else todo:
        codec = make_codec(name, options)
        start = time.perf_counter()
        ppl = kv_perplexity(model, window, args.context, codec, block, sink_tokens=sink)
        scored = answer_logits(model, tok, problems, codec, block, sink)
        if label == "fp16":
            ref_ppl, ref_logits = ppl.result.ppl, scored
        fid = fidelity_from_logits(problems, scored, ref_logits)
        rows[label] = {
            "label": label,
            "family": family,
            "codec": codec.describe(),
            "block_size": block,
            "sink_tokens": sink,
            "ppl": ppl.result.ppl,
            "ppl_ratio": ppl.result.ppl / ref_ppl,
            "gsm8k_kl": fid.kl,
            "gsm8k_top1": fid.top1,
            "gsm8k_bpb": fid.bpb,
            "gsm8k_bpb_ref": fid.bpb_ref,
            "kv_bytes_per_token": ppl.bytes_per_token,
            "kv_bytes_per_token_ref": ppl.fp16_bytes_per_token,
            "kv_bytes_ratio": ppl.bytes_per_token / ppl.fp16_bytes_per_token,
            "kv_bytes_per_token_mean": ppl.bytes_per_token_mean,
            "block_bits_per_element": codec.bytes_per_token(block, 64) * 8 / 128,
            "bytes_breakdown": bytes_breakdown(codec, block),
            "seconds": time.perf_counter() - start,
        }
        print(
            f"{label:36s} bytes {rows[label]['kv_bytes_ratio']:.4f}  ppl {ppl.result.ppl:.3f} "
            f"ratio {rows[label]['ppl_ratio']:.4f}  KL {fid.kl:.4f}  top1 {fid.top1:.3f} "
            f"({rows[label]['seconds']:.0f} s)",
            flush=True,
        )
        result = finish(
            {"model": args.model, "context": args.context, "ppl_tokens": args.ppl_tokens,
             "gsm8k_problems": args.gsm8k} | {k: v for k, v in result.items() if k == "throughput"},
            list(rows.values()),
            out_json,
        )  # fmt: skip
    if not args.no_throughput:
        fp16_step = decode_step_seconds(model, get_codec("fp16"))
        tput = {}
        for name in ("int8", "kivi-2bit", "gear-2bit", "gear-4bit"):
            codec = get_codec(name)
            t = compression_throughput(model, codec)
            t["decode_step_ms_1k_context"] = decode_step_seconds(model, codec) * 1e3
            t["compress_share_of_decode"] = (
                (64 / t["compress_tokens_per_s"]) / 64 / (t["decode_step_ms_1k_context"] / 1e3)
            )
            tput[name] = t
            print(name, {k: round(v, 3) for k, v in t.items()}, flush=True)
        result["throughput"] = {
            "decode_step_ms_fp16_1k_context": fp16_step * 1e3,
            "codecs": tput,
            "threads": torch.get_num_threads(),
        }
        out_json.write_text(json.dumps(result, indent=1))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
