"""Resolve a model argument (a known name or a local HF directory) and load it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trtcompress.errors import ModelError, one_line
from trtcompress.models.gguf_convert import ensure_converted
from trtcompress.models.registry import PACKAGED_MODELS, SUPPORTED_MODEL_TYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# JSON files transformers reads beside config.json; it skips a malformed generation_config.json silently
# (the model would stop at other EOS ids than its authors set) and reports the others without a name.
SIDE_JSON_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
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
    """A known model name -> its converted cache directory; otherwise a validated local directory.
    A model directory of that name wins over the known name (a local `SmolLM2-135M` is the base model,
    not the packaged Instruct one)."""
    key = spec.lower()
    path = Path(spec).expanduser()
    if key in PACKAGED_MODELS and not (path / "config.json").is_file():
        return ensure_converted(PACKAGED_MODELS[key], log=log)
    validate_model_dir(path)
    return path.resolve()


def validate_model_dir(path: Path) -> dict:
    """Check that `path` holds a loadable LLaMA-family HF checkpoint; returns its config dict."""
    try:
        return _validate_model_dir(path)
    except OSError as exc:  # pathlib raises, not answers False, for a name too long for the file system
        raise ModelError(
            f"{exc.filename or path}: cannot read the model directory ({exc.strerror})"
        ) from None


def _validate_model_dir(path: Path) -> dict:
    known = ", ".join(PACKAGED_MODELS)
    if not path.exists():
        raise ModelError(f"{path}: no such model directory (and not a known model name: {known})")
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory; pass a Hugging Face model directory or one of: {known}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{path}: missing config.json; this is not a Hugging Face model directory")
    config = _read_json_object(config_path, finite=True)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{config_path}: model_type {model_type!r} is not supported; "
            f"supported LLaMA-family types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "modelopt":
        # (what `build --export hf` writes: transformers has no modelopt quantizer and reported the
        # packed tensors as weights the config has no place for)
        raise ModelError(
            f"{path}: a ModelOpt-quantized checkpoint (quantization_config.quant_method: modelopt, "
            f"{quantization.get('quant_algo')}), which transformers cannot load: evaluate or serve the "
            "trtcompress artifact it was exported from, or load it with TensorRT-LLM's PyTorch backend"
        )
    if not any(next(path.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelError(f"{path}: no weight files (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path}: no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    for name in SIDE_JSON_FILES:
        if (path / name).is_file():
            _read_json_object(path / name)
    return config


def _read_json_object(file: Path, finite: bool = False) -> dict:
    """`finite`: refuse NaN / Infinity (not JSON, but Python's json reads them): an `rms_norm_eps: NaN`
    loads and makes every output NaN."""

    def non_finite(name: str) -> float:
        if finite:
            raise ModelError(f"{file}: holds a non-finite number ({name}); a config value must be finite")
        return float(name)

    try:
        # UTF-8 whatever the locale: tritonserver's Python backend runs under an ASCII one, and a
        # tokenizer.json holds non-ASCII tokens
        data = json.loads(file.read_text(encoding="utf-8"), parse_constant=non_finite)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file}: malformed JSON ({exc})") from None
    except OSError as exc:  # unreadable (permissions, an I/O error)
        raise ModelError(f"{file}: cannot read it ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: expected a JSON object")
    return data


def load_model(spec: str, dtype: torch.dtype = torch.float32, log=print) -> LoadedModel:
    path = resolve_model(spec, log=log)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never reach for the hub
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # first: the tokenizer and the model both read it, and would each report its errors as theirs
        AutoConfig.from_pretrained(path)
    except Exception as exc:  # values transformers refuses (heads not dividing the width, wrong types)
        raise ModelError(f"{path / 'config.json'}: invalid config ({one_line(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a malformed tokenizer.json / tokenizer_config.json, a missing merges.txt...
        raise ModelError(f"{path}: cannot load the tokenizer ({one_line(exc)})") from None
    try:
        # mismatched shapes reported (and refused below by name) rather than raised as "see the report"
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as exc:  # transformers/safetensors raise many types for a corrupt checkpoint
        raise ModelError(f"{path}: cannot load the checkpoint ({one_line(exc)})") from None
    _check_loaded(model, info, path)
    _fill_special_tokens(tokenizer, model)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, spec=spec)


def _fill_special_tokens(tokenizer, model) -> None:
    """A tokenizer.json without tokenizer_config.json names no EOS or PAD token, while config.json and
    generation_config.json give their ids: take them from there (padding a batch, an exported
    tokenizer's end id), as the GGUF conversion does. Tokens the tokenizer names are kept."""
    for kind in ("eos", "pad"):
        if getattr(tokenizer, f"{kind}_token", None) is not None:
            continue
        for source in (model.config, getattr(model, "generation_config", None)):
            token_id = getattr(source, f"{kind}_token_id", None)
            if isinstance(token_id, (list, tuple)) and token_id:
                token_id = token_id[0]
            if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
                setattr(tokenizer, f"{kind}_token", tokenizer.convert_ids_to_tokens(token_id))
                break


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
