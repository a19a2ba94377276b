"""FP4 on SmolLM2-135M: LLM-FP4 W4A4 against the min-max FP4 W4A4 baseline, plus NVFP4 / MXFP4 weights.

The LLM-FP4 paper's table, on our protocol: FP baseline (fp32), MinMax FP4 (W4A4), LLM-FP4 (W4A4);
NVFP4 and MXFP4 (round-to-nearest, weights only) as reference points. Each preset runs in its own
process through the same code path as `trtcompress eval smollm2-135m --recipe PRESET --json` (load,
compress with the preset, evaluate against the fp32 model with the default protocol), with the
compression (calibration + search) timed on its own.

    python benchmarks/fp4.py [--presets w4a4-llmfp4 'w4a4-llmfp4+rounds=1+stride=1' nvfp4 ...]

`PRESET+FIELD=VALUE+...` overrides fields of the preset's pass (e.g. the llmfp4 search budget) and
makes a row of its own. Writes benchmarks/results/fp4.json (with `--out DIR`: DIR/fp4.json) and prints a
markdown table.

    python benchmarks/fp4.py --ablation [LAYER ...]

runs the LLM-FP4 search variants on real group inputs of those layers (default 3 and 15) of the fp32
model and reports the mean relative layer-output error (benchmarks/results/fp4_ablation.json, or under
`--out DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine

RESULTS = Path(__file__).parent / "results"
LABELS = {  # preset -> (row label, weight/activation bits)
    "w4a4-minmax-fp4": ("MinMax FP4", "4/4"),
    "w4a4-llmfp4": ("LLM-FP4", "4/4"),
    "nvfp4": ("NVFP4 (RTN)", "4/16"),
    "mxfp4": ("MXFP4 (RTN)", "4/16"),
}


def run_one(spec: str) -> dict:
    """Compress with `spec` (PRESET[+FIELD=VALUE...]) and evaluate, in this process; returns the row."""
    import torch

    from trtcompress.builders.compress import compress_model
    from trtcompress.compressed import compressed_linears
    from trtcompress.eval.harness import evaluate
    from trtcompress.models import load_model
    from trtcompress.recipe import load_recipe, with_overrides

    torch.set_grad_enabled(False)
    reference = load_model("smollm2-135m", log=lambda m: None)
    loaded = load_model("smollm2-135m", log=lambda m: None)
    preset, *sets = spec.split("+")
    overrides = []
    for item in sets:
        key, _, value = item.partition("=")
        overrides.append((f"passes.0.{key}", yaml.safe_load(value)))
    recipe = with_overrides(load_recipe(preset), overrides)
    start = time.perf_counter()
    compress_model(loaded.model, loaded.tokenizer, recipe)
    seconds = time.perf_counter() - start
    weights, acts = Counter(), Counter()
    for _, layer in compressed_linears(loaded.model):
        state = layer.state
        weights[state.quantized.format.name] += 1
        if state.act_quant is not None:
            acts[state.act_quant.name] += 1
    report = evaluate(
        loaded.model,
        loaded.tokenizer,
        recipe.eval,
        reference.model,
        model_name="smollm2-135m",
        recipe_name=preset,
    )
    return {
        "preset": spec,
        "pass": recipe.passes[0].model_dump(mode="json"),
        "calibration": recipe.calibration.model_dump(mode="json") if recipe.needs_calibration else None,
        "compress_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # MiB (KiB / 1024)
        "weight_formats": dict(weights),
        "act_formats": dict(acts),
        **{
            k: getattr(report, k)
            for k in (
                "ppl",
                "ppl_ref",
                "ppl_ratio",
                "gsm8k_kl",
                "gsm8k_top1",
                "gsm8k_bpb",
                "gsm8k_bpb_ref",
                "bits_per_param",
                "bits_per_param_ref",
            )
        },
    }


ABLATION = {  # label -> llmfp4 config overrides
    "1 round": {"rounds": 1},
    "2 rounds": {"rounds": 2},
    "3 rounds (preset)": {},
    "3 rounds, upstream grid": {"grid_mode": "upstream"},
    "3 rounds, tensor-wise act bias": {"act_bias": "tensor"},
    "3 rounds, auto act bias": {"act_bias": "auto"},
}


def ablation(layers: list[int], tokens: int, out_dir: Path = RESULTS) -> None:
    """Relative layer-output error of the search variants on real group inputs of the fp32 model."""
    import torch

    from trtcompress.compressed import QuantizedWeight
    from trtcompress.compressed.formats import FpFormat
    from trtcompress.models import load_model
    from trtcompress.models.calibration import calibration_tokens
    from trtcompress.models.layout import LLAMA_GROUPS, decoder_layers
    from trtcompress.passes.fp4 import minmax_act_quantizer
    from trtcompress.passes.llmfp4 import LLMFP4Config, OutputError, search_group

    torch.set_grad_enabled(False)
    loaded = load_model("smollm2-135m", log=lambda m: None)
    ids = calibration_tokens(loaded.tokenizer, 32, 512, 4096)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index in layers:
        layer = decoder_layers(loaded.model)[index]
        for group in LLAMA_GROUPS:

            def hook(module, args, key=(index, group.name)):
                captured.setdefault(key, args[0].reshape(-1, args[0].shape[-1]))

            hooks.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook))
    loaded.model(input_ids=ids)
    for h in hooks:
        h.remove()
    results: dict[str, list[float]] = {"min-max E2M1": []}
    seconds: dict[str, float] = {}
    for (index, name), x in captured.items():
        group = next(g for g in LLAMA_GROUPS if g.name == name)
        layer = decoder_layers(loaded.model)[index]
        weights = [layer.get_submodule(rel).weight.detach().float() for rel in group.linears]
        abs_max, sample = x.abs().amax(0), x[:: max(1, x.shape[0] // tokens)][:tokens].float()
        y = torch.cat([sample @ w.T for w in weights], 1)
        w_hat = torch.cat(
            [QuantizedWeight.round_to_nearest(w, FpFormat(2, 1, 0)).dequantize() for w in weights]
        )
        act = minmax_act_quantizer(abs_max, 2, 1)
        results["min-max E2M1"].append(
            OutputError(y, w_hat)(act.fake_quantize(sample)) / float(y.pow(2).sum())
        )
        for label, overrides in ABLATION.items():
            start = time.process_time()
            r = search_group(sample, weights, abs_max, LLMFP4Config(**overrides))
            seconds[label] = seconds.get(label, 0.0) + time.process_time() - start
            results.setdefault(label, []).append(r.error / r.reference)
        print(
            f"layer {index} {name}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in results.items()), flush=True
        )
    rows = [
        {"config": k, "mean_rel_error": sum(v) / len(v), "per_group": v, "cpu_seconds": seconds.get(k)}
        for k, v in results.items()
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fp4_ablation.json").write_text(json.dumps({"layers": layers, "rows": rows}, indent=2) + "\n")
    print("\n| configuration | mean rel. layer-output error | search cpu s |\n|---|---|---|")
    for r in rows:
        cpu = "-" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.0f}"
        print(f"| {r['config']} | {r['mean_rel_error']:.5f} | {cpu} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="*", default=list(LABELS), metavar="PRESET[+FIELD=VALUE...]")
    parser.add_argument("--ablation", nargs="*", type=int, metavar="LAYER", help="search ablation on layers")
    parser.add_argument("--ablation-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="where the JSON goes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ablation is not None:
        ablation(args.ablation or [3, 15], args.ablation_tokens, args.out)
        return
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    # Passive OpenMP waits: on a shared CPU, spinning barriers waste the cores other processes need.
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--one", preset]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{preset} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{preset}: ppl {r['ppl']:.2f} KL {r['gsm8k_kl']:.3f} ({r['compress_seconds']:.0f} s)", flush=True
        )
        result = {"machine": machine(), "omp_wait_policy": env["OMP_WAIT_POLICY"], "rows": rows}
        (args.out / "fp4.json").write_text(json.dumps(result, indent=2) + "\n")  # after every row
    print(f"\nmachine: {machine()}\n")
    print("| method | W/A bits | bits/param | ppl | ppl ratio | GSM8K KL | top-1 | bpb | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = rows[0]
    print(
        f"| FP baseline (fp32) | 32/32 | {first['bits_per_param_ref']:.3f} | {first['ppl_ref']:.2f} | 1.000 "
        f"| 0 | 1 | {first['gsm8k_bpb_ref']:.3f} | - |"
    )
    for r in rows:
        preset, _, sets = r["preset"].partition("+")
        label, bits = LABELS.get(preset, (preset, "?"))
        label = f"{label} ({sets.replace('+', ', ')})" if sets else label
        print(
            f"| {label} | {bits} | {r['bits_per_param']:.3f} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} "
            f"| {r['gsm8k_kl']:.3f} | {r['gsm8k_top1']:.3f} | {r['gsm8k_bpb']:.3f} "
            f"| {r['compress_seconds']:.0f} |"
        )
    for r in rows:
        if r["act_formats"]:
            print(f"\n{r['preset']}: weight formats {r['weight_formats']}")
            print(f"{r['preset']}: activation formats {r['act_formats']}")


if __name__ == "__main__":
    main()
