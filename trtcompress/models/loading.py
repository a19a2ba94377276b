"""Resolve a model argument (a known name or a local HF directory) and load it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trtcompress.errors import ModelError
from trtcompress.models.gguf_convert import ensure_converted
from trtcompress.models.registry import PACKAGED_MODELS, SUPPORTED_MODEL_TYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path
    spec: str  # what the user passed: a known name or a path

    @property
    def config(self):
        return self.model.config


def resolve_model(spec: str, log=print) -> Path:
    """A known model name -> its converted cache directory; otherwise a validated local directory."""
    key = spec.lower()
    if key in PACKAGED_MODELS:
        return ensure_converted(PACKAGED_MODELS[key], log=log)
    path = Path(spec).expanduser()
    validate_model_dir(path)
    return path.resolve()


def validate_model_dir(path: Path) -> dict:
    """Check that `path` holds a loadable LLaMA-family HF checkpoint; returns its config dict."""
    known = ", ".join(PACKAGED_MODELS)
    if not path.exists():
        raise ModelError(f"{path}: no such model directory (and not a known model name: {known})")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory; pass a Hugging Face model directory or one of: {known}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path}: missing config.json; this is not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: malformed JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported LLaMA-family types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelError(f"{path}: no weight files (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return config


def load_model(spec: str, dtype: torch.dtype = torch.float32, log=print) -> LoadedModel:
    path = resolve_model(spec, log=log)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never reach for the hub
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # mismatched shapes reported (and refused below by name) rather than raised as "see the report"
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as exc:  # transformers/safetensors raise many types for a corrupt checkpoint
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: cannot load the checkpoint ({first_line})") from None
    _check_loaded(model, info, path)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, spec=spec)


def _check_loaded(model: torch.nn.Module, info: dict, path: Path) -> None:
    """A checkpoint that lacks tensors would leave them randomly initialised, one with tensors the model
    does not use would be silently truncated, and a non-finite weight poisons every output: all are
    errors naming the tensor, not a model that loads."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", []) if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")
    # transformers drops tensors the config has no place for (e.g. q/k/v biases of a qwen2-style
    # checkpoint whose config lacks attention_bias) and the model silently computes something else.
    # Known-harmless leftovers (rotary inv_freq buffers) are already filtered out by transformers.
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (
            f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        )
        raise ModelError(
            f"{path}: the checkpoint holds {len(unexpected)} tensor(s) the config has no place for "
            f"(config.json disagrees with the weights): {shown}"
        )
    mismatched = sorted(info.get("mismatched_keys", []), key=str)  # (name, stored shape, expected shape)
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelError(
            f"{path}: {len(mismatched)} tensor(s) of the wrong shape in the checkpoint, e.g. {name}: "
            f"stored {tuple(stored)}, the config implies {tuple(expected)}"
        )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{path}: tensor {name} holds non-finite values (inf or NaN)")
