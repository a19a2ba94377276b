"""Group-size curve on SmolLM2-135M: ppl / GSM8K KL / top-1 against bits per parameter.

Same protocol and same reference model for every row (REFERENCE section 2). Writes
benchmarks/results/groupsize.{json,png} (or OUT_DIR/groupsize.{json,png}) and prints a markdown table for
BENCHMARKS.md.

    python benchmarks/groupsize.py [MODEL] [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trtcompress.eval.groupsize import run_groupsize_sweep
from trtcompress.ui import UI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", metavar="OUT_DIR")
    args = parser.parse_args()
    rows = run_groupsize_sweep(args.model, 4, [16, 32, 64, 128, 0], True, True, 64, args.out, UI())
    ref = rows[0]["ppl_ref"]
    print(f"reference fp32 ppl {ref:.2f}\n")
    print("| format | bits/param | weight MB | ppl | ppl ratio | GSM8K KL | top-1 | bpb |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r['bits_per_param']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {r['ppl']:.2f} | "
            f"{r['ppl_ratio']:.3f} | {r['gsm8k_kl']:.4f} | {r['gsm8k_top1']:.3f} | {r['gsm8k_bpb']:.4f} |"
        )


if __name__ == "__main__":
    main()
