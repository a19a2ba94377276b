"""Conformance with NVIDIA ModelOpt's `export_tensorrt_llm_checkpoint` on SmolLM2-135M (runs on CPU).

ModelOpt quantizes; its exporter writes the reference; the same quantization, imported into
CompressedLinearStates, is written by our writer; the two must agree in config keys and values, tensor
names, shapes, dtypes and values (codes exactly, scales within fp16 rounding). TP=3 rather than TP=2:
SmolLM2 has 9 attention heads and 3 KV heads, and TensorRT-LLM splits whole heads per rank (ModelOpt
0.47 does write a TP=2 checkpoint, with 4.5 query heads per rank, which TensorRT-LLM cannot build; our
writer refuses TP=2 for this model, tested below). Group 64: 576 = 9 x 64 keeps whole groups per rank
(ModelOpt refuses partial blocks; our group-128 padding is tested on the tiny model).
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints.trtllm_util import (
    MODELOPT_MISSING,
    assert_same_checkpoint,
    modelopt_export,
    modelopt_quantize,
)
from trtcompress.checkpoints.trtllm import TrtllmOptions, write_trtllm_checkpoint
from trtcompress.checkpoints.trtllm_layout import ExportError

pytestmark = pytest.mark.model


def _smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


def _conformance(smollm2_dir, tmp_path, algo: str, tps: tuple[int, ...]) -> None:
    pytest.importorskip("modelopt", reason=MODELOPT_MISSING)
    from trtcompress.checkpoints.modelopt_import import import_modelopt_model

    model = modelopt_quantize(_smollm2(smollm2_dir), algo, block=64)
    for tp in tps:
        modelopt_export(model, tmp_path / f"modelopt-tp{tp}", tp)
    import_modelopt_model(model)
    for tp in tps:
        write_trtllm_checkpoint(model, tmp_path / f"ours-tp{tp}", TrtllmOptions(tp_size=tp))
        count = assert_same_checkpoint(tmp_path / f"modelopt-tp{tp}", tmp_path / f"ours-tp{tp}", tp)
        assert count == tp * (3 + 30 * (2 + 5 * (1 if algo == "none" else 3)))


def test_w4a16_awq_matches_modelopt_tp1_tp3(smollm2_dir, tmp_path):
    _conformance(smollm2_dir, tmp_path, "awq", (1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["none", "fp8"])
def test_matches_modelopt_tp1_tp3(smollm2_dir, tmp_path, algo):
    _conformance(smollm2_dir, tmp_path, algo, (1, 3))


def test_tp2_is_refused_for_nine_heads(smollm2_dir, tmp_path):
    with pytest.raises(ExportError, match="does not divide the 9 attention heads"):
        write_trtllm_checkpoint(_smollm2(smollm2_dir), tmp_path / "x", TrtllmOptions(tp_size=2))
    assert not (tmp_path / "x").exists()
