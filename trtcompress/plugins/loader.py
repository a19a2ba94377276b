"""Register the trtcompress TensorRT plugins, and say clearly when an engine needs one that is missing.

TensorRT's own failure for an unregistered plugin is "getPluginCreator could not find plugin ..." deep
in engine deserialization. Engines and checkpoints written by trtcompress list the plugins they need
(`config.json`: `trtcompress.plugins`, or `pretrained_config.trtcompress.plugins` in an engine dir), so
`check_plugins` names the missing plugin, where it comes from and how to register it before TensorRT
gets there. Each plugin's `trt.py` exposes `register_trt_plugin()` (TensorRT imported lazily).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from pathlib import Path

from trtcompress.errors import MissingDependencyError, TrtcompressError

# plugin id -> the module whose register_trt_plugin() registers it
PLUGINS: dict[str, str] = {
    "trtcompress::gear_attention": "trtcompress.plugins.gear_attention.trt",
    "trtcompress::w4a16_gemm": "trtcompress.plugins.w4a16_gemm.trt",
    "trtcompress::w4a4_fp4_gemm": "trtcompress.plugins.w4a4_fp4_gemm.trt",
}
_registered: set[str] = set()


class PluginNotRegisteredError(TrtcompressError):
    """An engine or checkpoint needs a TensorRT plugin that is not (or cannot be) registered."""


def required_plugins(model_dir: Path) -> list[str]:
    """Plugins a trtllm checkpoint or engine directory declares in its config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PluginNotRegisteredError(
            f"{path}: no config.json; not a TensorRT-LLM checkpoint or engine directory"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    section = config.get("trtcompress") or (config.get("pretrained_config") or {}).get("trtcompress") or {}
    return sorted(section.get("plugins") or {})


def _register_one(name: str) -> None:
    module_name = PLUGINS.get(name)
    if module_name is None:
        raise PluginNotRegisteredError(
            f"unknown plugin {name!r}; trtcompress provides {', '.join(sorted(PLUGINS))}"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginNotRegisteredError(
            f"plugin {name} is not available: {module_name} cannot be imported ({exc.msg}); install a "
            "trtcompress with that plugin"
        ) from None
    module.register_trt_plugin()  # raises MissingDependencyError (naming TensorRT) when TensorRT is absent
    _registered.add(name)


def register_plugins(names: Iterable[str] | None = None, required: Iterable[str] | None = None) -> list[str]:
    """Register `names` (default: all); plugins in `required` must succeed, others are skipped if unavailable.

    Returns the plugins now registered. `required=None` means every requested plugin is required.
    """
    names = list(PLUGINS if names is None else names)
    must = set(names if required is None else required)
    for name in names:
        try:
            _register_one(name)
        except (PluginNotRegisteredError, MissingDependencyError):
            if name in must:
                raise
    return sorted(_registered)


def tensorrt_registered() -> set[str] | None:
    """Plugin ids in TensorRT's registry (`namespace::name`), or None when TensorRT is not importable."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    registry = trt.get_plugin_registry()
    creators = getattr(registry, "all_creators", None) or registry.plugin_creator_list
    return {f"{c.plugin_namespace}::{c.name}" if c.plugin_namespace else c.name for c in creators}


def check_plugins(model_dir: Path, registered: Iterable[str] | None = None) -> list[str]:
    """Raise PluginNotRegisteredError naming every plugin `model_dir` needs that is not registered."""
    needed = required_plugins(model_dir)
    have = set(registered) if registered is not None else (tensorrt_registered() or set()) | _registered
    missing = [name for name in needed if name not in have]
    if missing:
        raise PluginNotRegisteredError(
            f"{model_dir} needs the TensorRT plugin(s) {', '.join(missing)}, which are not registered in "
            "this process (TensorRT would fail with 'getPluginCreator could not find plugin'): call "
            "trtcompress.plugins.loader.register_plugins() before deserializing the engine, in a Python with "
            "TensorRT >= 10.9 (e.g. the docker/Dockerfile.gpu image)"
        )
    return needed
