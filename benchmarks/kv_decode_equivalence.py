"""How far `CachedDecoder.extend` (what `eval --kv` and kv_frontier.py decode with: a block's tokens in
one forward) is from one `decode` call per token (what a server does), per codec, on SmolLM2-135M.

Both read the same cache (compressed blocks + the block being filled from the fp16 tail + each token's
own K/V exact); they differ only in floating-point summation order (matmuls over n tokens against one).
With an fp16 cache that stays at the last digits; with 2-bit codes, an ulp that moves a value across an
fp16 rounding or a group's min/max moves whole codes, and the difference grows through the layers and
the blocks: this measures that noise floor of the KV tables.

    python benchmarks/kv_decode_equivalence.py [--context 512] [--codecs fp16,kivi-2bit,...] [--chunks 32,16]

`extend` is also run in calls of a few tokens (`--chunks`): the same semantics again, another
summation order, so the spread of those runs shows the noise without the per-token run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trtcompress.eval.datasets import TokenStream
from trtcompress.kv import get_codec
from trtcompress.kv.decode import CachedDecoder, cache_for_model
from trtcompress.models import load_model

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def window_ppl(
    model, ids: torch.Tensor, codec: str, chunk: int | None, block: int = 64, sink: int = 1
) -> float:
    """Perplexity of one window decoded after a one-token prefill: by `extend` calls of `chunk` tokens
    (None: one call for the window), or token by token (`chunk` 1: `decode`)."""
    context = len(ids)
    cache = cache_for_model(model, get_codec(codec), context + block, max_seqs=1, block_size=block,
                            sink_tokens=sink)  # fmt: skip
    dec = CachedDecoder(model, cache, context)
    hidden = [dec.prefill(0, ids[:1])]
    if chunk == 1:
        hidden += [dec.decode([0], ids[i : i + 1]) for i in range(1, context)]
    else:
        step = chunk or context
        hidden += [dec.extend(0, ids[i : i + step]) for i in range(1, context, step)]
    logits = dec.logits(torch.cat(hidden)[:-1])
    return float(torch.nn.functional.cross_entropy(logits, ids[1:]).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--codecs", default="fp16,kivi-2bit,gear-2bit")
    parser.add_argument("--chunks", default="32,16,8,3", help="extend() call sizes also measured")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_decode_equivalence.json")
    args = parser.parse_args()
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    loaded = load_model("smollm2-135m", log=lambda m: None)
    ids = torch.tensor(TokenStream(loaded.tokenizer).window(args.context))
    rows = []
    for codec in args.codecs.split(","):
        row: dict = {"codec": codec}
        modes = [("extend", None), ("per_token", 1)] + [(f"extend_chunk{c}", c) for c in args.chunks]
        for mode, chunk in modes:
            start = time.perf_counter()
            row[f"ppl_{mode}"] = window_ppl(loaded.model, ids, codec, chunk)
            row[f"seconds_{mode}"] = round(time.perf_counter() - start, 1)
        row["relative_difference"] = row["ppl_extend"] / row["ppl_per_token"] - 1
        row["chunked_relative_differences"] = [row[f"ppl_extend_chunk{c}"] / row["ppl_per_token"] - 1
                                               for c in args.chunks]  # fmt: skip
        spread = ", ".join(f"{d:+.2%}" for d in row["chunked_relative_differences"])
        print(f"{codec:12s} extend {row['ppl_extend']:.4f}  per token {row['ppl_per_token']:.4f}  "
              f"({row['relative_difference']:+.3%}; chunks {args.chunks}: {spread})", flush=True)  # fmt: skip
        rows.append(row)
    result = {"model": "smollm2-135m", "context": args.context, "chunks": args.chunks, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
