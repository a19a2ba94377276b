"""Registration of a quickly-deployable plugin with TensorRT's registry, once per process."""

from collections.abc import Callable

_REGISTERED: set[str] = set()


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
