"""Serving load benchmark (same as `trtcompress bench serve`): concurrent tritonclient gRPC streaming
clients against the native runtime in a real tritonserver, with HF `generate` (batch 1 and static batch
16) and one-request-at-a-time baselines measured in the same run.

    python benchmarks/serve_load.py [MODEL_OR_ARTIFACT] [--levels 1,8,32] [--requests 64]
        [--prompt-tokens 64] [--output-tokens 64] [--out benchmarks/results/serve_load]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trtcompress.bench_serve import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target", nargs="?", default="smollm2-135m")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--deploy", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load"))
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    result = run(args.target, levels, args.requests, args.prompt_tokens, args.output_tokens, args.deploy,
                 not args.no_hf, args.out)  # fmt: skip
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
