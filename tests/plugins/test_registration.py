from trtcompress.plugins.registration import register_once


class RecordingRegistry:
    """Stands in for `tensorrt.plugin` (not installable here): records what would be registered."""

    def __init__(self):
        self.calls = []

    def _decorator(self, kind, plugin_id):
        return lambda fn: self.calls.append((kind, plugin_id, fn.__name__))

    def register(self, plugin_id):
        return self._decorator("register", plugin_id)

    def autotune(self, plugin_id):
        return self._decorator("autotune", plugin_id)

    def aot_impl(self, plugin_id):
        return self._decorator("aot_impl", plugin_id)


def _functions(trtp):
    def shapes(): ...
    def tactics(): ...
    def ptx(): ...

    return shapes, tactics, ptx


def test_a_plugin_is_registered_once_with_all_three_functions():
    trtp = RecordingRegistry()
    register_once("trtcompress::test_only", _functions, trtp)
    register_once("trtcompress::test_only", _functions, trtp)
    assert trtp.calls == [
        ("register", "trtcompress::test_only", "shapes"),
        ("autotune", "trtcompress::test_only", "tactics"),
        ("aot_impl", "trtcompress::test_only", "ptx"),
    ]
