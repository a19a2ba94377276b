"""Shared fixtures: a tiny random LLaMA (fast unit tests) and the real SmolLM2-135M (model tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trtcompress.eval.config import EvalConfig

TINY_EVAL = EvalConfig(ppl_tokens=256, context=128, gsm8k_problems=4, gsm_symbolic_problems=2, batch_size=2)
TINY_EVAL_FLAGS = [
    "--ppl-tokens", "256", "--set", "eval.context=128", "--gsm8k-problems", "3",
    "--set", "eval.gsm_symbolic_problems=1", "--set", "eval.batch_size=2",
]  # fmt: skip


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trtcompress.eval.datasets import boolq_passages_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([boolq_passages_text()[:50_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_model_dir(path: Path, model_type: str = "llama", seed: int = 0) -> Path:
    """A 2-layer random model whose widths (96, 160) leave partial groups for group sizes 64/128."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def make_loud(model: torch.nn.Module) -> torch.nn.Module:
    """Scale a tiny random model's decoder-layer projections x5, in place: at the std-0.02 init its greedy
    output repeats one token whatever the layers compute, so token comparisons could not fail."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(5)
    return model


@pytest.fixture(scope="session")
def tiny_loud_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model made loud (`make_loud`), saved once per session."""

    from trtcompress.models import load_model

    loaded = load_model(str(tiny_model_dir), log=lambda m: None)
    make_loud(loaded.model)
    out = tmp_path_factory.mktemp("tiny-loud")
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from trtcompress.models import load_model

    return load_model(str(tiny_model_dir), log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from trtcompress.models import resolve_model

    return resolve_model("smollm2-135m", log=lambda m: None)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `trtcompress` entry point in a subprocess (`env`: variables to add)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "trtcompress", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )
