"""Model-level checks on the real SmolLM2-135M (converted once from its PyPI GGUF).

Anchors (REFERENCE section 2, same protocol): fp32 ppl 19.55, GSM8K gold-answer bpb 0.748;
RTN INT4 g128 sym ppl 32.27 (KL 0.440, top-1 0.715); RTN INT8 per-channel ppl 19.57.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_cli
from trtcompress.checkpoints import native
from trtcompress.compressed import compressed_linears
from trtcompress.eval.datasets import TokenStream

pytestmark = pytest.mark.model
FAST_EVAL = ["--gsm8k-problems", "8", "--set", "eval.gsm_symbolic_problems=0"]


def independent_ppl(model, tokenizer) -> float:
    """Perplexity through transformers' own loss (labels=ids), not through trtcompress.eval."""
    ids = TokenStream(tokenizer).window(4096)
    nll = 0.0
    with torch.no_grad():
        for w in range(4):
            x = torch.tensor([ids[w * 1024 : (w + 1) * 1024]])
            nll += model(input_ids=x, labels=x).loss.item()
    return math.exp(nll / 4)


def test_default_model_loads_offline_without_converting_again(smollm2_dir):
    """Converted once; later loads are a plain HF load of that directory. Checked by what happens (no
    conversion message, no file rewritten), not by wall time: CI machines are shared and noisy."""
    from trtcompress.models import load_model

    stamps = {f: f.stat().st_mtime_ns for f in smollm2_dir.rglob("*") if f.is_file()}
    messages: list[str] = []
    loaded = load_model("smollm2-135m", log=messages.append)
    assert not [m for m in messages if "converting" in m], messages
    assert {f: f.stat().st_mtime_ns for f in smollm2_dir.rglob("*") if f.is_file()} == stamps
    cfg = loaded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (1536, 49152, True)


def test_fp32_model_matches_the_protocol_anchor(smollm2_dir):
    result = run_cli("eval", "smollm2-135m", "--json", *FAST_EVAL)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ppl"] == pytest.approx(19.55, rel=0.005)
    assert data["ppl_ratio"] == 1.0 and data["gsm8k_kl"] == 0.0 and data["gsm8k_top1"] == 1.0


@pytest.fixture(scope="module")
def int4_artifact(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "int4"
    result = run_cli(
        "build", "smollm2-135m", "--recipe", "int4-g128-rtn", "-o", str(out), "--json", *FAST_EVAL
    )
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


def test_int4_build_and_eval_reproduce_an_independent_ppl(int4_artifact):
    out, built = int4_artifact
    evaluated = run_cli("eval", str(out), "--json", *FAST_EVAL)
    assert evaluated.returncode == 0, evaluated.stderr
    data = json.loads(evaluated.stdout)
    assert data["ppl"] == pytest.approx(built["ppl"], rel=1e-6)
    assert data["ppl"] == pytest.approx(32.27, rel=0.02)  # anchor
    assert data["bits_per_param"] == pytest.approx(4.135, abs=0.01)

    # Independent: a plain transformers model holding the artifact's dequantized weights.
    from trtcompress.models import load_model

    plain = load_model("smollm2-135m", log=print)
    artifact = native.load_artifact(out)
    for name, module in compressed_linears(artifact.model):
        plain.model.get_submodule(name).weight.data = module.state.weight()
    assert independent_ppl(plain.model, plain.tokenizer) == pytest.approx(data["ppl"], rel=0.02)


def test_int8_per_channel_is_within_half_a_percent_of_fp32(smollm2_dir, tmp_path):
    result = run_cli(
        "build", "smollm2-135m", "--recipe", "int8-rtn", "-o", str(tmp_path / "int8"), "--json", *FAST_EVAL
    )
    assert result.returncode == 0, (
        result.stderr
    )  # the preset's own gates (ppl_ratio <= 1.01, KL <= 0.01) pass
    data = json.loads(result.stdout)
    assert data["ppl_ratio"] <= 1.005
    assert data["bits_per_param"] == pytest.approx(8.028, abs=0.01)


@pytest.mark.slow
def test_full_protocol_int4_matches_all_anchors(int4_artifact):
    out, _ = int4_artifact
    # The artifact was built with a short protocol; ask for the full one (REFERENCE defaults).
    result = run_cli("eval", str(out), "--json", "--gsm8k-problems", "64")
    data = json.loads(result.stdout)
    assert data["protocol"]["gsm8k_problems"] == 64
    assert data["ppl_ref"] == pytest.approx(19.55, rel=0.005)
    assert data["gsm8k_bpb_ref"] == pytest.approx(0.748, abs=0.002)
    assert data["gsm8k_kl"] == pytest.approx(0.440, abs=0.01)
    assert data["gsm8k_top1"] == pytest.approx(0.715, abs=0.01)
    assert data["gsm8k_bpb"] == pytest.approx(0.933, abs=0.005)


@pytest.mark.slow
def test_two_processes_convert_the_default_model_once(tmp_path):
    env = dict(os.environ, TRTCOMPRESS_CACHE=str(tmp_path))
    code = "from trtcompress.models import resolve_model; print(resolve_model('smollm2-135m', log=print))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum("converting" in out for out in outputs) == 1  # the second waited on the lock and reused
    converted = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert len(converted) == 1 and (converted[0] / ".trtcompress-converted").is_file()
