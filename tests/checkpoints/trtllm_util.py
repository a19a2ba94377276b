"""Helpers shared by the TensorRT-LLM checkpoint tests: run ModelOpt, compare two checkpoint directories."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Keys our config adds (ModelOpt 0.47 omits rotary_base with transformers 5: TensorRT-LLM would then use
# the default 10000 instead of SmolLM2's 100000) or legitimately differs in.
MODELOPT_MISSING = (
    "nvidia-modelopt is not installed, so the ModelOpt conformance checks are skipped: "
    "pip install -e '.[dev]' (or nvidia-modelopt==0.47.0 requests)"
)
OURS_ONLY = {"rotary_base", "rotary_scaling", "trtcompress"}
IGNORED = {"producer", "rank"}  # "rank" is whichever rank ModelOpt wrote last


def modelopt_quantize(model, algo: str, block: int = 64, seed: int = 0):
    """ModelOpt INT4_AWQ (block `block`) or FP8 on a few random calibration tokens (CPU)."""
    mtq = pytest.importorskip("modelopt.torch.quantization", reason=MODELOPT_MISSING)
    if algo == "none":
        return model
    cfg = copy.deepcopy({"awq": mtq.INT4_AWQ_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[algo])
    for entry in cfg["quant_cfg"]:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer" and algo == "awq":
            entry["cfg"]["block_sizes"][-1] = block
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    return mtq.quantize(model, cfg, lambda m: m(input_ids=ids))


def modelopt_export(model, out: Path, tp: int) -> Path:
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    export_tensorrt_llm_checkpoint(model, "llama", torch.float16, out, inference_tensor_parallel=tp)
    return out


def _trim(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Our tensor without TensorRT-LLM's group padding (ModelOpt writes unpadded shapes)."""
    if ours.dim() == ref.dim() and all(a >= b for a, b in zip(ours.shape, ref.shape, strict=True)):
        return ours[tuple(slice(0, n) for n in ref.shape)]
    return ours


def assert_same_checkpoint(ref_dir: Path, ours_dir: Path, world: int, allow_padding: bool = False) -> int:
    """Config keys and values, tensor names, shapes, dtypes and values; returns the tensors compared."""
    ref_cfg = json.loads((ref_dir / "config.json").read_text())
    our_cfg = json.loads((ours_dir / "config.json").read_text())
    assert set(our_cfg) - set(ref_cfg) == OURS_ONLY, set(our_cfg) ^ set(ref_cfg)
    assert set(ref_cfg) <= set(our_cfg)
    for key in set(ref_cfg) - IGNORED:
        if key == "norm_epsilon":
            assert our_cfg[key] == pytest.approx(ref_cfg[key], rel=1e-6)
        elif key == "quantization":
            ref_q = {k: v for k, v in ref_cfg[key].items() if k != "exclude_modules"}
            assert {k: our_cfg[key][k] for k in ref_q} == ref_q
            assert sorted(our_cfg[key].get("exclude_modules") or []) == sorted(
                ref_cfg[key].get("exclude_modules") or []
            )
        else:
            assert our_cfg[key] == ref_cfg[key], key
    count = 0
    for rank in range(world):
        ref = load_file(str(ref_dir / f"rank{rank}.safetensors"))
        ours = load_file(str(ours_dir / f"rank{rank}.safetensors"))
        assert set(ours) == set(ref), set(ours) ^ set(ref)
        for name, r in ref.items():
            o = _trim(ours[name], r) if allow_padding else ours[name]
            assert o.shape == r.shape and o.dtype == r.dtype, (rank, name, o.shape, r.shape, o.dtype, r.dtype)
            if r.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn):
                assert torch.equal(o.view(torch.uint8), r.view(torch.uint8)), (rank, name)
            elif name.endswith("weights_scaling_factor") or name.endswith("activation_scaling_factor"):
                # ModelOpt keeps fp32 scales; the CompressedLinearState stores them in fp16
                torch.testing.assert_close(o, r, rtol=2**-11, atol=0, msg=f"{rank} {name}")
            else:
                torch.testing.assert_close(o, r, rtol=0, atol=0, msg=f"{rank} {name}")
            count += 1
    return count
