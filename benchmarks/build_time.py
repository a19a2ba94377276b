"""Build time of the INT4 preset on SmolLM2-135M, against an fp32 evaluation measured in the same run.

Three runs, each a fresh `trtcompress` process (model already converted into the cache):
  baseline  `eval smollm2-135m` on the 4,096-token perplexity window only (fp32, one model)
  int4-4k   `build --recipe int4-g128-rtn` with the evaluation reduced to that same 4k-token window
            (the issue's target: under 60 s including eval of 4k tokens)
  int4-full `build --recipe int4-g128-rtn` with the default protocol (4k-token ppl + 64 GSM8K + 16
            gsm_symbolic problems, each scored by the compressed and the reference model)
Writes benchmarks/results/build_time.json (or OUT.json) and prints a markdown table.

    python benchmarks/build_time.py [OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, run_timed

PPL_ONLY = ["--gsm8k-problems", "0", "--set", "eval.gsm_symbolic_problems=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).parent / "results" / "build_time.json"
    parser.add_argument("out", nargs="?", type=Path, default=default)
    args = parser.parse_args()
    run_timed(["eval", "smollm2-135m", "--quiet", *PPL_ONLY])  # warm caches (and convert once if needed)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "baseline: fp32 eval, 4k-token ppl": run_timed(["eval", "smollm2-135m", "--json", *PPL_ONLY]),
            "int4-g128-rtn build, 4k-token eval": run_timed(
                ["build", "smollm2-135m", "-r", "int4-g128-rtn", "-o", f"{tmp}/a", "--json", *PPL_ONLY]
            ),
            "int4-g128-rtn build, default protocol": run_timed(
                ["build", "smollm2-135m", "-r", "int4-g128-rtn", "-o", f"{tmp}/b", "--json"]
            ),
        }
    for name, run in runs.items():
        if run.returncode != 0:
            raise SystemExit(f"{name} failed with exit code {run.returncode}")
    base = next(iter(runs.values())).seconds
    rows = [
        {
            "run": name,
            "seconds": r.seconds,
            "ratio_to_baseline": r.seconds / base,
            "peak_rss_mb": r.peak_rss_mb,  # MiB (ru_maxrss KiB / 1024), the key kept for old results
            "ppl": json.loads(r.stdout)["ppl"],
        }
        for name, r in runs.items()
    ]
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print(f"machine: {machine()}\n")
    print("| run | wall s | x baseline | peak RSS MiB | ppl |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['seconds']:.1f} | {r['ratio_to_baseline']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['ppl']:.2f} |"
        )


if __name__ == "__main__":
    main()
