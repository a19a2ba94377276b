"""Registration of a quickly-deployable plugin with TensorRT's registry, once per process."""

from collections.abc import Callable
from types import ModuleType

from trtcompress.errors import MissingDependencyError

_REGISTERED: set[str] = set()
# TensorRT-LLM 1.2.1 pins tensorrt~=10.14.1 (its requirements.txt): the plugins register in that process, and
# a bare `pip install tensorrt` now brings TensorRT 11, which that TensorRT-LLM was not built against.
TRT_HINT = (
    "the TensorRT plugins need TensorRT >= 10.9 (`tensorrt.plugin.aot_impl`) and a CUDA GPU: "
    '`pip install "tensorrt~=10.14.1"` (the version TensorRT-LLM 1.2.1 pins), or run in the '
    "docker/Dockerfile.gpu image (nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3)"
)


def import_trtp(hint: str) -> ModuleType:
    """`tensorrt.plugin` with `aot_impl`, else MissingDependencyError(`hint`).

    `aot_impl` (and KernelLaunchParams) first shipped in TensorRT 10.9: 10.8's `tensorrt.plugin` has the
    JIT `@impl` only (NVIDIA/TensorRT, python/packaging/bindings_wheel/tensorrt/plugin/_lib.py)."""
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        raise MissingDependencyError(hint) from None
    if not hasattr(trtp, "aot_impl"):
        import tensorrt

        version = getattr(tensorrt, "__version__", "?")
        raise MissingDependencyError(f"{hint}; TensorRT {version} has no tensorrt.plugin.aot_impl")
    return trtp


def register_once(plugin_id: str, plugin_functions: Callable, trtp) -> None:
    """Register `plugin_functions(trtp)` = (register, autotune, aot_impl) under `plugin_id`.

    TensorRT refuses a second registration of the same id, so a process registers each plugin once.
    """
    if plugin_id in _REGISTERED:
        return
    register, autotune, aot_impl = plugin_functions(trtp)
    trtp.register(plugin_id)(register)
    trtp.autotune(plugin_id)(autotune)
    trtp.aot_impl(plugin_id)(aot_impl)
    _REGISTERED.add(plugin_id)
