"""Pruning, low-rank compensation and distillation recovery on SmolLM2-135M, side by side.

Every method runs in its own process (its wall time, CPU time and peak RSS are its own) on the same
calibration tokens (BoolQ passages after the perplexity window) and is scored by the same harness
against the same fp32 reference (REFERENCE section 2 protocol). ModelOpt's SparseGPT 2:4 runs on the
same calibration sequences when nvidia-modelopt is installed.

    OMP_NUM_THREADS=1 python benchmarks/pruning.py [--calib-samples 32] [--methods ...]

Methods: the 2:4 family (magnitude, Wanda's score alone, `sparse24-wanda` = Wanda + Wanda++ regional
optimization, sparsegpt, modelopt-sparsegpt, sparsegpt+INT4, + KD), GPTQ INT3 g128 with EoRA at ranks
16/32/64 (true sweeps with the preset's alternating refinement), structured 25% FFN pruning with the
measured forward speedup, and the 2:4 speed picture (dense kernels: none).
Results: benchmarks/results/pruning.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRESETS = {
    "magnitude-2:4": "sparse24-magnitude",
    "wanda-2:4+ro": "sparse24-wanda",
    "sparsegpt-2:4": "sparse24-sparsegpt",
    "sparsegpt-2:4+int4-g128": "sparse24-sparsegpt-w4a16",
    "gptq-int3-g128": "w3a16-gptq",
    "gptq-int3-g128+eora32": "w3a16-gptq-eora32",
    "ffn25-structured": "ffn25-structured",
}
COMPOSED = ("wanda-2:4", "wanda-2:4+kd", "gptq-int3-g128+eora16", "gptq-int3-g128+eora64")
SPECIAL = ("modelopt-sparsegpt-2:4", "speed-2:4", "wanda-2:4+ro+kd")
ALL = (
    "magnitude-2:4", "wanda-2:4", "sparsegpt-2:4", "modelopt-sparsegpt-2:4", "sparsegpt-2:4+int4-g128",
    "wanda-2:4+ro+kd", "gptq-int3-g128", "gptq-int3-g128+eora16", "gptq-int3-g128+eora32",
    "gptq-int3-g128+eora64", "ffn25-structured", "speed-2:4",
)  # fmt: skip


def _usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": r.ru_maxrss / 1024}  # MiB (KiB / 1024)


def _recipe(method: str, calib_samples: int, kd_seconds: float):
    from trtcompress.recipe import load_recipe, with_overrides

    overrides: list = [("calibration.num_samples", calib_samples)]
    if method in PRESETS:
        recipe = load_recipe(PRESETS[method])
    elif method.startswith("gptq-int3-g128+eora"):  # the preset at another rank
        recipe = load_recipe("w3a16-gptq-eora32").model_copy(update={"name": method})
        overrides.append(("passes.1.rank", int(method.removeprefix("gptq-int3-g128+eora"))))
    else:
        full = load_recipe("sparse24-wanda-kd")  # wanda, regional, kd
        keep = {"wanda-2:4": [0], "wanda-2:4+ro+kd": [0, 1, 2], "wanda-2:4+kd": [0, 2]}[method]
        recipe = full.model_copy(update={"passes": [full.passes[i] for i in keep], "name": method})
    for i, p in enumerate(recipe.passes):
        if p.method == "kd":  # the budget: 10 minutes of this process's CPU time
            overrides += [(f"passes.{i}.max_seconds", kd_seconds), (f"passes.{i}.clock", "cpu")]
    return with_overrides(recipe, overrides)


def _evaluate(model, tokenizer, name: str) -> dict:
    from trtcompress.eval.harness import evaluate
    from trtcompress.models import load_model
    from trtcompress.recipe import Recipe

    reference = load_model("smollm2-135m", log=lambda m: None).model
    report = evaluate(model, tokenizer, Recipe().eval, reference, model_name="smollm2-135m", recipe_name=name)
    keys = ("ppl", "ppl_ref", "ppl_ratio", "gsm8k_kl", "gsm8k_top1", "gsm8k_bpb", "gsm8k_bpb_ref")
    row = {k: getattr(report, k) for k in keys}
    row.update(
        weight_bytes=report.weight_bytes, weight_bytes_ref=report.weight_bytes_ref,
        bits_per_param=report.bits_per_param, eval_seconds=report.eval_seconds,
    )  # fmt: skip
    return row


def _forward_ms(model, ids, repeats: int) -> float:
    import torch

    with torch.no_grad():
        model(input_ids=ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _interleaved_speed(models: dict, repeats: int = 7, tokens: int = 512) -> dict[str, float]:
    """Median forward ms of each model on the same 1 x `tokens` prompt, runs interleaved so machine-load
    drift hits all models alike."""
    import torch

    ids = torch.randint(1, 40000, (1, tokens), generator=torch.Generator().manual_seed(0))
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(_forward_ms(model, ids, 1))
    return {name: statistics.median(v) for name, v in samples.items()}


def _materialize(model) -> None:
    """Replace CompressedLinear modules by plain nn.Linear holding their effective weight (what a dense
    kernel would run: a 2:4 layer becomes a dense matrix with zeros)."""
    import torch

    from trtcompress.compressed.linear import compressed_linears, set_module

    for name, module in list(compressed_linears(model)):
        state = module.state
        linear = torch.nn.Linear(state.in_features, state.out_features, bias=state.bias is not None)
        linear.weight.data = state.weight()
        if state.bias is not None:
            linear.bias.data = state.bias.float()
        set_module(model, name, linear)


def run_one(method: str, calib_samples: int, kd_seconds: float) -> list[dict]:
    import torch

    from trtcompress.builders.compress import compress_model
    from trtcompress.models import load_model
    from trtcompress.models.calibration import calibration_tokens
    from trtcompress.recipe import Recipe

    torch.set_grad_enabled(False)
    loaded = load_model("smollm2-135m", log=lambda m: None)
    model, tokenizer = loaded.model, loaded.tokenizer
    base = _usage()
    start = time.perf_counter()
    logs: list[str] = []
    extra: dict = {}
    if method == "modelopt-sparsegpt-2:4":
        import modelopt.torch.sparsity as mts

        calib = calibration_tokens(tokenizer, calib_samples, 512, Recipe().eval.ppl_tokens)

        def forward_loop(m):
            for batch in calib.split(4):
                m(input_ids=batch)

        model = mts.sparsify(model, "sparsegpt", config={"forward_loop": forward_loop})
        model = mts.export(model)
    elif method == "speed-2:4":
        return [_speed_24(model, tokenizer)]
    elif method == "wanda-2:4+ro+kd":
        return _ro_then_kd(model, tokenizer, calib_samples, kd_seconds, base, start)
    else:
        recipe = _recipe(method, calib_samples, kd_seconds)
        compress_model(model, tokenizer, recipe, log=logs.append)
        kd_lines = [line for line in logs if line.startswith("kd: step")]
        if kd_lines:
            extra["kd_log"] = kd_lines
        regional = [line for line in logs if line.startswith("regional:")]
        if regional:
            extra["regional_log"] = regional
    used = _usage()
    row = {
        "method": method,
        "calib_samples": calib_samples,
        "compress_seconds": time.perf_counter() - start,
        "compress_cpu_seconds": used["cpu_s"] - base["cpu_s"],
        "peak_rss_mb": used["peak_rss_mb"],
        **extra,
    }
    if "+eora" in method:
        row["rank"] = int(method.split("+eora")[1])
    if method == "ffn25-structured":
        original = load_model("smollm2-135m", log=lambda m: None).model
        row["forward_ms_1x512"] = _interleaved_speed({"original": original, "pruned": model})
        row["params"] = sum(p.numel() for p in model.parameters())
        row["params_ref"] = sum(p.numel() for p in original.parameters())
        row["intermediate_size"] = model.config.intermediate_size
        del original
    row.update(_evaluate(model, tokenizer, method))
    if method.startswith("modelopt"):
        row["bits_per_param"] = 9.0  # nominal: fp16 values of the kept half + 2-bit index per kept value
    return [row]


def _ro_then_kd(model, tokenizer, calib_samples: int, kd_seconds: float, base: dict, start: float):
    """`sparse24-wanda-kd` in one process: the wanda + regional sweep, evaluated, then the kd pass on
    the same model against the fp32 teacher, evaluated again (two rows, one sweep)."""
    from trtcompress.builders.compress import compress_model
    from trtcompress.models import load_model
    from trtcompress.models.calibration import calibration_tokens
    from trtcompress.passes import PassContext, build_pass

    recipe = _recipe("wanda-2:4+ro+kd", calib_samples, kd_seconds)
    sweep = recipe.model_copy(update={"passes": recipe.passes[:2]})
    logs: list[str] = []
    compress_model(model, tokenizer, sweep, log=logs.append)
    row = {
        "method": "wanda-2:4+ro",
        "calib_samples": calib_samples,
        "compress_seconds": time.perf_counter() - start,
        "compress_cpu_seconds": _usage()["cpu_s"] - base["cpu_s"],
        "regional_log": [line for line in logs if line.startswith("regional:")],
        "regional": sweep.passes[1].model_dump(exclude={"targets", "exclude"}),
    }
    row.update(_evaluate(model, tokenizer, row["method"]))
    print(json.dumps({"progress": row["method"], "ppl": row["ppl"]}), file=sys.stderr, flush=True)
    kd = build_pass(recipe.passes[2])
    teacher = load_model("smollm2-135m", log=lambda m: None).model
    calib = calibration_tokens(tokenizer, calib_samples, recipe.calibration.seq_len, recipe.eval.ppl_tokens)
    kd_start, kd_cpu = time.perf_counter(), _usage()["cpu_s"]
    kd.apply(model, PassContext(calibration=calib, teacher=teacher, log=lambda m: None))
    del teacher
    kd_row = {
        "method": "wanda-2:4+ro+kd",
        "calib_samples": calib_samples,
        "compress_seconds": row["compress_seconds"] + time.perf_counter() - kd_start,
        "compress_cpu_seconds": row["compress_cpu_seconds"] + _usage()["cpu_s"] - kd_cpu,
        "kd_seconds": time.perf_counter() - kd_start,
        "kd_cpu_seconds": _usage()["cpu_s"] - kd_cpu,
        "kd": recipe.passes[2].model_dump(exclude={"targets", "exclude"}),
        "kd_history": kd.history,
        "peak_rss_mb": _usage()["peak_rss_mb"],
    }
    kd_row.update(_evaluate(model, tokenizer, kd_row["method"]))
    return [row, kd_row]


def _speed_24(model, tokenizer) -> dict:
    """Forward latency of the dense model, the 2:4 model run by dense kernels (zeros in dense matrices),
    and the 2:4 model through the CompressedLinear reference path (decodes mask and values per call)."""
    import copy

    import torch

    from trtcompress.builders.compress import compress_model
    from trtcompress.recipe import load_recipe

    pruned = copy.deepcopy(model)
    compress_model(pruned, tokenizer, load_recipe("sparse24-magnitude"))
    dense_zeros = copy.deepcopy(pruned)
    _materialize(dense_zeros)
    speeds = _interleaved_speed({"dense": model, "2:4 as dense": dense_zeros, "2:4 reference path": pruned})
    semi = "n/a"
    try:  # PyTorch's 2:4 semi-structured kernels (cuSPARSELt / CUTLASS) need a CUDA GPU
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(torch.zeros(64, 64, dtype=torch.float16))
        semi = "available"
    except Exception as exc:  # we report whatever stops it
        semi = f"unavailable on this machine: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return {"method": "speed-2:4", "forward_ms_1x512": speeds, "torch_semi_structured": semi}


ANCHOR_MODELOPT_SPARSEGPT = {"ppl": 115.2, "ppl_ratio": 5.9, "gsm8k_kl": 1.62, "gsm8k_top1": 0.46}


def _kd_curve(row: dict) -> list[tuple[int, float, float]]:
    """(step, loss, seconds): the pass's history, or its log lines 'kd: step N/M loss L (S s)'."""
    if row.get("kd_history"):
        return [(int(h["step"]), h["loss"], h["seconds"]) for h in row["kd_history"]]
    out = []
    for line in row.get("kd_log", []):
        parts = line.split()
        out.append((int(parts[2].split("/")[0]), float(parts[4]), float(parts[5].strip("("))))
    return out


def table(rows: list[dict], calib_samples: int) -> str:
    """The markdown summary of one calibration size: main table, targets, EoRA curve, KD curve, speed."""
    rows = [r for r in rows if r.get("calib_samples", calib_samples) == calib_samples]
    by = {r["method"]: r for r in rows}
    lines = [
        f"Calibration: {calib_samples} x 512 BoolQ tokens after the ppl window.",
        "",
        "| method | bits/param | ppl | ppl ratio | GSM8K KL | top-1 | bpb | compress s (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = next((r for r in rows if "ppl_ref" in r), None)
    if ref:
        lines.append(f"| fp32 (reference, same run) | 32 | {ref['ppl_ref']:.2f} | 1.000 | 0 | 1 | "
                     f"{ref['gsm8k_bpb_ref']:.3f} | - |")  # fmt: skip
    a = ANCHOR_MODELOPT_SPARSEGPT
    lines.append(f"| ModelOpt SparseGPT 2:4 (anchor, REFERENCE, 128 x 512 calib) | 9 | {a['ppl']} | "
                 f"{a['ppl_ratio']} | {a['gsm8k_kl']} | {a['gsm8k_top1']} | 1.616 | - |")  # fmt: skip
    for r in rows:
        if "ppl" not in r:
            continue
        lines.append(
            f"| {r['method']} | {r['bits_per_param']:.2f} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | "
            f"{r['gsm8k_kl']:.3f} | {r['gsm8k_top1']:.3f} | {r['gsm8k_bpb']:.3f} | "
            f"{r.get('compress_seconds', 0):.0f} / {r.get('compress_cpu_seconds', 0):.0f} |"
        )
    base = by.get("gptq-int3-g128")
    curve = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
    if curve and base:
        lines += ["", "EoRA on GPTQ INT3 g128 (one sweep per rank, `refine: 3`, fp16 factors; rank 0 = plain "
                  "GPTQ of the same run):", "",
                  "| rank | ppl | ppl ratio | KL | weight MB | bits/param | INT3-to-fp32 gap recovered |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in [{**base, "rank": 0}, *curve]:
            gap = (base["ppl"] - r["ppl"]) / (base["ppl"] - r["ppl_ref"])
            lines.append(
                f"| {r['rank']} | {r['ppl']:.2f} | {r['ppl_ratio']:.3f} | {r['gsm8k_kl']:.3f} | "
                f"{r['weight_bytes'] / 1e6:.1f} | {r['bits_per_param']:.3f} | {100 * gap:.0f}% |"
            )
    kd_rows = [r for r in rows if r.get("kd_log") or r.get("kd_history")]
    for r in kd_rows:
        curve = _kd_curve(r)
        every = max(1, len(curve) // 12)
        shown = [c for i, c in enumerate(curve) if i % every == 0 or i == len(curve) - 1]
        lines += ["", f"KD curve of `{r['method']}` (KL to the fp32 teacher on each step's batch; "
                  f"{len(curve)} steps):", "", "| step | loss | CPU s |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {step} | {loss:.4f} | {sec:.0f} |" for step, loss, sec in shown]
    if "ffn25-structured" in by:
        r = by["ffn25-structured"]
        ms = r["forward_ms_1x512"]
        speedup = ms["original"] / ms["pruned"]
        lines += ["", f"FFN-25% structured: intermediate_size {r['intermediate_size']}, params "
                  f"{r['params'] / 1e6:.1f} M vs {r['params_ref'] / 1e6:.1f} M; forward 1 x 512 tokens "
                  f"{ms['pruned']:.0f} ms vs {ms['original']:.0f} ms (speedup x{speedup:.2f})."]  # fmt: skip
    if "speed-2:4" in by:
        ms = by["speed-2:4"]["forward_ms_1x512"]
        lines += ["", "2:4 speed on this CPU (forward 1 x 512 tokens, median): "
                  + ", ".join(f"{k} {v:.0f} ms" for k, v in ms.items())
                  + f"; torch semi-structured: {by['speed-2:4']['torch_semi_structured']}."]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["method"] == "gptq-int3-g128"), None)
    curve = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
    if base:
        curve = [{**base, "rank": 0}, *curve]
    kd_rows = [r for r in rows if r.get("kd_log") or r.get("kd_history")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if curve:
        axes[0].plot(
            [r["rank"] for r in curve], [r["ppl"] for r in curve], "o-", label="GPTQ INT3 g128 + EoRA"
        )
        axes[0].axhline(curve[0]["ppl_ref"], color="gray", ls="--", label="fp32")
        axes[0].set(xlabel="EoRA rank", ylabel="ppl (BoolQ 4x1024)", title="EoRA rank curve")
        axes[0].legend()
    for r in kd_rows:
        c = _kd_curve(r)
        axes[1].plot([s for s, _, _ in c], [v for _, v, _ in c], "o-", label=r["method"])
    axes[1].set(xlabel="KD step", ylabel="KL to teacher (batch)", title="KD recovery")
    if kd_rows:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (x 512 tokens)")
    parser.add_argument("--kd-seconds", type=float, default=600, help="KD budget, CPU seconds")
    parser.add_argument("--methods", nargs="*", default=list(ALL))
    parser.add_argument("--output", default=str(RESULTS / "pruning.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", action="store_true", help="only print the table of the recorded results (writes nothing)"
    )
    args = parser.parse_args()
    output = Path(args.output)
    if args.table:
        rows = json.loads(output.read_text())
        print(table(rows, args.calib_samples))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.calib_samples, args.kd_seconds)))
        return
    unknown = set(args.methods) - set(PRESETS) - set(COMPOSED) - set(SPECIAL)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(ALL)}")
    rows = json.loads(output.read_text()) if output.exists() else []
    has_modelopt = importlib.util.find_spec("modelopt") is not None
    for method in args.methods:
        if method.startswith("modelopt") and not has_modelopt:
            print(f"skipping {method}: NVIDIA ModelOpt is not installed (pip install -e '.[compare]')")
            continue
        cmd = [sys.executable, __file__, "--one", method, "--calib-samples", str(args.calib_samples),
               "--kd-seconds", str(args.kd_seconds)]  # fmt: skip
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
        )
        if out.returncode != 0:
            print(f"{method} failed (exit {out.returncode})", flush=True)
            continue
        new = json.loads(out.stdout.strip().splitlines()[-1])
        names = {r["method"] for r in new}
        rows = json.loads(output.read_text()) if output.exists() else []  # another run may have written
        rows = [
            r for r in rows if not (r["method"] in names and r.get("calib_samples") == args.calib_samples)
        ]
        rows += new
        output.parent.mkdir(exist_ok=True)
        output.write_text(json.dumps(rows, indent=2) + "\n")
        for r in new:
            if "ppl" in r:
                print(
                    f"{r['method']}: ppl {r['ppl']:.2f} (x{r['ppl_ratio']:.2f}) KL {r['gsm8k_kl']:.3f} "
                    f"top-1 {r['gsm8k_top1']:.3f} bits {r['bits_per_param']:.2f} "
                    f"compress {r['compress_seconds']:.0f} s wall / {r['compress_cpu_seconds']:.0f} s CPU",
                    flush=True,
                )
            else:
                print(json.dumps(r), flush=True)
    print(table(rows, args.calib_samples))
    plot(rows, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
