"""TensorRT-LLM / HF-quant export of SmolLM2-135M per quantization mode: time and bytes.

For each mode: compress a fresh SmolLM2-135M (RTN / block-FP / LLM-FP4 min-max passes: the export does not
depend on how the codes were chosen), write the TensorRT-LLM checkpoint (TP 1, and TP 3 for one mode) and,
where the layout exists, the ModelOpt HF checkpoint; record seconds and bytes. Usage:
    python benchmarks/trtllm_export.py [--out benchmarks/results/trtllm_export.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SYM8, SYM4 = {"method": "gsq", "bits": 8, "group_size": 0}, {"method": "gsq", "bits": 4, "group_size": 0}
MODES = [  # (name, passes, tp sizes, write hf)
    ("NO_QUANT (fp16)", [], (1,), False),
    ("W8A16 (int8 per channel)", [SYM8], (1,), False),
    ("W4A16 (int4 per channel)", [SYM4], (1,), False),
    ("W4A16_AWQ layout (int4 g64 sym)", [{"method": "gsq", "bits": 4, "group_size": 64}], (1, 3), True),
    ("W4A16_AWQ layout (int4 g128 sym, padded)", [{**SYM4, "group_size": 128}], (1,), False),
    ("W4A16_AWQ + zero points (int4 g64 asym)",
     [{"method": "gsq", "bits": 4, "group_size": 64, "symmetric": False}], (1,), False),
    ("W4A16_MXFP4", [{"method": "mxfp4"}], (1,), False),
    ("NVFP4 weight-only (HF W4A16_NVFP4)", [{"method": "nvfp4"}], (), True),
    ("LLM-FP4 W4A4 (plugin entries)", [{"method": "minmax-fp4"}], (1,), False),
]  # fmt: skip


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/trtllm_export.json")
    args = parser.parse_args()
    from trtcompress.builders.compress import compress_model
    from trtcompress.checkpoints.hf_quant import write_hf_checkpoint
    from trtcompress.checkpoints.trtllm import TrtllmOptions, kv_cache_scales, write_trtllm_checkpoint
    from trtcompress.models.loading import load_model
    from trtcompress.recipe import Recipe

    torch.set_num_threads(2)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="trtllm-export-"))
    try:
        for name, passes, tps, hf in MODES:
            loaded = load_model("smollm2-135m", log=lambda m: None)
            recipe = Recipe.model_validate({
                "passes": [{**p, "exclude": ["lm_head"]} for p in passes],
                "calibration": {"num_samples": 4, "seq_len": 128},
            })  # fmt: skip
            start = time.perf_counter()
            compress_model(loaded.model, loaded.tokenizer, recipe, log=lambda m: None)
            row = {"mode": name, "compress_s": round(time.perf_counter() - start, 2)}
            for tp in tps:
                out = work / f"{len(rows)}-tp{tp}"
                start = time.perf_counter()
                config = write_trtllm_checkpoint(loaded.model, out, TrtllmOptions(tp_size=tp))
                row[f"trtllm_tp{tp}_s"] = round(time.perf_counter() - start, 2)
                row[f"trtllm_tp{tp}_bytes"] = _bytes(out)
                row["quant_algo"] = config["quantization"]["quant_algo"]
                row["plugins"] = sorted(config["trtcompress"]["plugins"])
            if hf:
                out = work / f"{len(rows)}-hf"
                start = time.perf_counter()
                quant = write_hf_checkpoint(loaded.model, None, out)
                row["hf_s"] = round(time.perf_counter() - start, 2)
                row["hf_bytes"] = _bytes(out)
                row["hf_quant_algo"] = quant["quant_algo"]
            if not passes:  # static KV-cache scales, INT8 / FP8 kv_cache_quant_algo
                from trtcompress.models.calibration import calibration_tokens

                tokens = calibration_tokens(loaded.tokenizer, 4, 128, skip_tokens=4096)
                start = time.perf_counter()
                scales = kv_cache_scales(loaded.model, tokens, "FP8")
                out = work / "kv-fp8"
                write_trtllm_checkpoint(
                    loaded.model, out, TrtllmOptions(kv_cache="fp8", kv_cache_scales=scales)
                )
                row["kv_fp8_calibrate_and_write_s"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
