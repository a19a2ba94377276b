"""Calibrated weight quantization on SmolLM2-135M, side by side with NVIDIA ModelOpt on the same data.

Every method runs in its own process (so wall time and peak RSS are its own), on the same calibration
tokens (BoolQ passages after the perplexity window) and is scored by the same harness against the same
fp32 reference (REFERENCE section 2 protocol). ModelOpt is optional (`pip install -e '.[compare]'`);
without it its rows are skipped with a message.

    python benchmarks/compare_modelopt.py [--calib-samples 128] [--modelopt-samples 16] [--methods ...]

A method may carry its own sample count (`awq-int4-g128@16`: ours on ModelOpt's 16 x 512 tokens).
Rows are merged into benchmarks/results/compare_modelopt.json (or `--out FILE`) by (method, samples), so
methods can be measured in separate runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OURS = {  # label -> preset
    "rtn-int4-g128": "int4-g128-rtn",
    "gptq-int4-g128": "w4a16-gptq",
    "awq-int4-g128": "w4a16-awq",
    "rtn-int3-g128": "int3-g128-rtn",
    "gptq-int3-g128": "w3a16-gptq",
}
MODELOPT = {"modelopt-int4-awq-g128": 128, "modelopt-int4-awq-g64": 64}


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(label: str, calib_samples: int, modelopt_samples: int) -> dict:
    """Quantize and evaluate one method in this process; returns its row."""
    import copy

    method, _, samples_override = label.partition("@")
    if samples_override:
        calib_samples = modelopt_samples = int(samples_override)

    import torch

    from trtcompress.builders.compress import compress_model
    from trtcompress.eval.harness import evaluate
    from trtcompress.models import load_model
    from trtcompress.models.calibration import calibration_tokens
    from trtcompress.recipe import Recipe, load_recipe, with_overrides

    torch.set_grad_enabled(False)
    loaded = load_model("smollm2-135m", log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    rss_model_mb = _current_rss_mb()
    eval_config = Recipe().eval
    start = time.perf_counter()
    cpu_start = _cpu_seconds()
    if method in OURS:
        recipe = with_overrides(load_recipe(OURS[method]), [("calibration.num_samples", calib_samples)])
        compress_model(model, tokenizer, recipe)
        samples = calib_samples if recipe.needs_calibration else 0
    else:
        import modelopt.torch.quantization as mtq

        config = copy.deepcopy(mtq.INT4_AWQ_CFG)
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                entry["cfg"]["block_sizes"][-1] = MODELOPT[method]
        calib = calibration_tokens(tokenizer, modelopt_samples, 512, eval_config.ppl_tokens)

        def forward_loop(m):
            for batch in calib.split(4):
                m(input_ids=batch)

        model = mtq.quantize(model, config, forward_loop)
        samples = modelopt_samples
    seconds = time.perf_counter() - start
    cpu_seconds = _cpu_seconds() - cpu_start
    peak_quantize_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reference = load_model("smollm2-135m", log=lambda m: None).model
    report = evaluate(model, tokenizer, eval_config, reference, model_name="smollm2-135m", recipe_name=method)
    return {
        "method": method,
        "calib_samples": samples,
        "quantize_seconds": seconds,
        # CPU time of the quantization (all threads): on a shared machine the wall time above grows with
        # the neighbours' load, this much less so; CPU s / threads ~ wall s on an idle machine.
        "quantize_cpu_seconds": cpu_seconds,
        # both in MiB (2**20 bytes), whatever the keys say (kept so old rows merge)
        "rss_model_mb": rss_model_mb,  # process RSS with the fp32 model loaded, before quantization
        "peak_rss_quantize_mb": peak_quantize_mb,  # peak RSS up to the end of quantization
        "ppl": report.ppl,
        "ppl_ref": report.ppl_ref,
        "ppl_ratio": report.ppl_ratio,
        "gsm8k_kl": report.gsm8k_kl,
        "gsm8k_top1": report.gsm8k_top1,
        "gsm8k_bpb": report.gsm8k_bpb,
        # ModelOpt keeps fake-quantized fp32 weights: its bits/param is the nominal 4 + 16/block.
        "bits_per_param": report.bits_per_param if method in OURS else 4 + 16 / MODELOPT[method],
        "cpu_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib-samples", type=int, default=128, help="our calibrated passes (x 512 tokens)")
    parser.add_argument("--modelopt-samples", type=int, default=16, help="ModelOpt AWQ calibration (x 512)")
    parser.add_argument("--methods", nargs="*", default=[*OURS, *MODELOPT])
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_modelopt.json", help="results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.calib_samples, args.modelopt_samples)))
        return
    has_modelopt = importlib.util.find_spec("modelopt") is not None
    rows = []
    for method in args.methods:
        if method.partition("@")[0] not in {*OURS, *MODELOPT}:
            raise SystemExit(f"unknown method {method!r}; known: {', '.join([*OURS, *MODELOPT])}")
        if method.partition("@")[0] in MODELOPT and not has_modelopt:
            print(f"skipping {method}: NVIDIA ModelOpt is not installed (pip install -e '.[compare]')")
            continue
        cmd = [
            sys.executable,
            __file__,
            "--one",
            method,
            "--calib-samples",
            str(args.calib_samples),
            "--modelopt-samples",
            str(args.modelopt_samples),
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
        )
        if out.returncode != 0:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{method}: ppl {r['ppl']:.2f} KL {r['gsm8k_kl']:.3f} top-1 {r['gsm8k_top1']:.3f} "
            f"({r['quantize_seconds']:.0f} s)",
            flush=True,
        )
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else []
    fresh = {(r["method"], r["calib_samples"]) for r in rows}
    rows = [r for r in previous if (r["method"], r["calib_samples"]) not in fresh] + rows
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nfp32 ppl {rows[0]['ppl_ref']:.2f}\n")
    header = (
        "method | calib | bits/param | ppl | ppl ratio | GSM8K KL | top-1 | bpb | quantize s | CPU s"
        " | peak RSS MiB"
    )
    print(f"| {header} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['calib_samples']}x512 | {r['bits_per_param']:.3f} | {r['ppl']:.2f} | "
            f"{r['ppl_ratio']:.3f} | {r['gsm8k_kl']:.3f} | {r['gsm8k_top1']:.3f} | {r['gsm8k_bpb']:.3f} | "
            f"{r['quantize_seconds']:.0f} | {r.get('quantize_cpu_seconds', float('nan')):.0f} | "
            f"{r['peak_rss_quantize_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
