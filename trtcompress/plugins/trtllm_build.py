"""`python -m trtcompress.plugins.trtllm_build ARGS`: TensorRT-LLM's trtllm-build with our plugins registered.

TensorRT plugins live in the process that builds the network, so the engine build runs TensorRT-LLM's
own `trtllm-build` main here (`tensorrt_llm.commands.build.main`, the console script's entry point),
after every importable trtcompress plugin was registered: the quickly-deployable TensorRT plugins
(`loader.register_plugins`) and the TensorRT-LLM Python plugins (`trtllm_python`). Best effort: stock
LLaMA checkpoints need none of them (builders/engine.py refuses checkpoints that do).
"""

from __future__ import annotations

import sys

from trtcompress.errors import MissingDependencyError
from trtcompress.plugins.loader import register_plugins

TRTLLM_HINT = (
    "python -m trtcompress.plugins.trtllm_build runs TensorRT-LLM 1.2.1's trtllm-build: install "
    "tensorrt_llm==1.2.1 with its TensorRT (pip install tensorrt_llm==1.2.1 --extra-index-url "
    "https://pypi.nvidia.com, on a CUDA machine), or run inside docker/Dockerfile.gpu "
    "(nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3)"
)


def main() -> None:
    try:  # before registering anything: say what to install, not a bare ModuleNotFoundError
        from tensorrt_llm.commands.build import main as trtllm_build
    except ImportError as exc:
        raise MissingDependencyError(f"{TRTLLM_HINT} ({exc})") from None
    registered = register_plugins(required=())
    try:
        from trtcompress.plugins.trtllm_python import register_trtllm_plugins

        registered += sorted(register_trtllm_plugins())
    except MissingDependencyError:
        pass
    print(f"trtcompress plugins registered: {', '.join(registered) or 'none'}", file=sys.stderr)
    sys.argv = ["trtllm-build", *sys.argv[1:]]
    trtllm_build()


if __name__ == "__main__":
    main()
