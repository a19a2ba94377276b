"""End-to-end decode of the native runtime against HF `generate` on the same device, same model, same
precision, same prompts (issue 6's GPU row: "end-to-end decode tokens/s vs HF generate on the same GPU").

    python benchmarks/runtime_gpu.py OUT.json --model DIR [--device cuda] [--smoke]

DIR is a Hugging Face model directory: config.json and the tokenizer files are required, the weights
are optional. Without weights the model has SmolLM2-135M's architecture with random weights (seed 0):
decode throughput does not depend on the weights' values, and every request generates exactly
`--new` tokens (end id off, `min_new_tokens` for HF), so both sides do the same work. A GPU machine
that cannot hold the 517 MB checkpoint in a 64 MiB transfer gets the small files only:

    mkdir -p .gpu/model && cp $TRTCOMPRESS_CACHE/models/smollm2-135m-v1/{config,generation_config,\
tokenizer,tokenizer_config}.json .gpu/model/     # .gpu/ ignored by git (.git/info/exclude)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .gpu/whl pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5        # the GPU image lacks pydantic

and on the GPU (carry: [".gpu"]): `pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
&& PYTHONPATH=$PWD:/tmp/site python3 benchmarks/runtime_gpu.py $OUT/runtime_gpu.json --model .gpu/model`.

Measured, float32 on both sides (the runtime computes in float32), prompts of `--prompt` random token
ids: HF `generate` at batch 1 and as one static batch of 16; the runtime (`deploy.device`) with 1, 8
and 32 requests submitted at once (in-flight batching, offline `Engine.generate`), with the fp16 and
the gear-2bit KV cache (decode attention: one kernel launch per layer, `runtime/paged_attention.py`
for fp16 and the fused GEAR kernel for gear-2bit; plus, for fp16 at the largest level, the torch path
for an A/B in the same run: batched where it is batch-invariant on the device, else per sequence).
On CUDA the fp16 and gear-2bit rows run first with `deploy.cuda_graphs` (all-decode steps replayed
from CUDA graphs; each level's graph captured in its warm-up, `graph_replays` counts the timed steps
that replayed).
Tokens/s = generated tokens / wall seconds of the whole call (prefill included, on both sides); the
device is synchronized before each clock read. Results are written after every row, so a run cut
short keeps what it measured. `--smoke` runs tiny sizes (CPU check of the script itself, numbers not
worth reading).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def load(model_dir: Path, device: str, layers: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if has_weights and layers is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(model_dir)
        if layers is not None:
            config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().to(device), tokenizer, has_weights and layers is None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(100, vocab - 1, (n, length), generator=g).tolist()


def hf_row(model, ids: list[list[int]], new: int, device: str) -> dict:
    x = torch.tensor(ids, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(x[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
        sync(device)
        seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - x.shape[1]) * out.shape[0]
    return {"side": "HF generate", "batch": len(ids), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def runtime_row(engine, ids: list[list[int]], new: int, device: str, codec: str) -> dict:
    from trtcompress.runtime import SamplingParams

    params = SamplingParams(max_tokens=new, end_id=-1)
    # warm-up, also of a sequence past one cache block: Triton specializes integer arguments equal to 1
    # (the fused kernel's block-table width), so a 1-block warm-up would leave a compile in the timing
    warm = SamplingParams(max_tokens=2, end_id=-1)
    engine.generate([ids[0][:8]], warm)
    long = min(2 * engine.cache.block_size + 8, engine.context_len - 2)
    if long > engine.cache.block_size:
        engine.generate([(ids[0] * (long // len(ids[0]) + 1))[:long]], warm)
    if engine.model.graphs is not None:  # capture this batch size's graph outside the timing
        engine.generate([x[:8] for x in ids], warm)
    sync(device)
    replays = engine.model.graphs.replays if engine.model.graphs is not None else 0
    first = len(engine.steps)
    t0 = time.perf_counter()
    outs = engine.generate(ids, params)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    steps = list(engine.steps)[first:]
    return {"side": "native runtime", "kv": codec, "concurrent": len(ids), "seconds": seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds, "steps": len(steps),
            "mean_batch": sum(s.batch_size for s in steps) / max(len(steps), 1),
            "graph_replays": engine.model.graphs.replays - replays if engine.model.graphs else 0}  # fmt: skip


def decode_path(engine) -> str:
    """Which attention the engine's decode tokens take (runtime/model.py)."""
    model = engine.model
    if model.fused_decode:
        return "fused kernel" + (" + CUDA graphs" if model.graphs is not None else "")
    if not model.batched_decode:
        return "per sequence"
    return f"batched (bmm calls of {model.bmm_calls_of})" if model.bmm_calls_of else "batched"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a check of the script")
    args = ap.parse_args()
    from trtcompress.kv import get_codec
    from trtcompress.runtime import Engine
    from trtcompress.runtime.config import DeployConfig

    layers, levels, hf_batches = (None, (1, 8, 32), (1, 16)) if not args.smoke else (2, (1, 4), (1, 4))
    if args.smoke:
        args.prompt, args.new = 16, 8
    model, tokenizer, real = load(args.model, args.device, layers)
    vocab = model.config.vocab_size
    ids = prompts(vocab, max(*levels, *hf_batches), args.prompt)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"device": name, "torch": torch.__version__, "model": str(args.model), "real_weights": real,
              "layers": model.config.num_hidden_layers, "prompt_tokens": args.prompt,
              "new_tokens": args.new, "precision": "float32", "rows": []}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1))
        label = (
            f"batch {row['batch']}"
            if "batch" in row
            else f"{row['concurrent']} concurrent, {row['kv']} KV, {row['decode_attention']}"
        )
        print(f"{row['side']:15s} {label:28s} {row['tokens_per_s']:9.1f} tokens/s ({row['seconds']:.2f} s)",
              flush=True)  # fmt: skip

    for batch in hf_batches:
        try:
            record(hf_row(model, ids[:batch], args.new, args.device))
        except Exception as exc:  # keep the other rows
            result.setdefault("errors", []).append(f"HF batch {batch}: {exc!r}"[:500])
    context = args.prompt + args.new + 1
    # fp16 and gear-2bit with all-decode steps replayed from CUDA graphs first (GPU only), then without
    setups = [("fp16", True), ("gear-2bit", True)] if args.device.startswith("cuda") else []
    for codec, graphs in [*setups, ("fp16", False), ("gear-2bit", False)]:
        config = DeployConfig(
            device=args.device, max_batch_size=max(levels), max_num_tokens=max(256, args.prompt),
            max_seq_len=context, max_tokens_in_paged_kv_cache=max(levels) * (context + 64),
            kv_decompressed_cache_mb=256, cuda_graphs=graphs,
        )  # fmt: skip
        try:
            engine = Engine(copy.deepcopy(model), tokenizer, config, kv_codec=get_codec(codec))
        except Exception as exc:
            result.setdefault("errors", []).append(f"runtime {codec} graphs={graphs}: {exc!r}"[:500])
            continue
        runs = [(n, engine.model.fused_decode) for n in (levels if codec == "fp16" or graphs else levels[:2])]
        if codec == "fp16" and engine.model.fused_decode and not graphs:  # A/B: the torch decode attention
            runs.append((max(levels), False))
        for n, fused in runs:
            engine.model.fused_decode = fused
            try:
                row = runtime_row(engine, ids[:n], args.new, args.device, codec)
                row["decode_attention"] = decode_path(engine)
                record(row)
            except Exception as exc:
                result.setdefault("errors", []).append(f"runtime {codec} x{n}: {exc!r}"[:500])
    hf = {r["batch"]: r["tokens_per_s"] for r in result["rows"] if r["side"] == "HF generate"}
    for r in result["rows"]:
        if r["side"] == "native runtime":
            r["vs_hf_batch_1"] = r["tokens_per_s"] / hf[min(hf)] if hf else None
            r["vs_hf_static_batch"] = r["tokens_per_s"] / hf[max(hf)] if hf else None
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; errors: {result.get('errors', 'none')}")


if __name__ == "__main__":
    main()
