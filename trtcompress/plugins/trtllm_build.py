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


def main() -> None:
    registered = register_plugins(required=())
    try:
        from trtcompress.plugins.trtllm_python import register_trtllm_plugins

        registered += sorted(register_trtllm_plugins())
    except MissingDependencyError:
        pass
    print(f"trtcompress plugins registered: {', '.join(registered) or 'none'}", file=sys.stderr)
    from tensorrt_llm.commands.build import main as trtllm_build  # lazily: only inside the NGC container

    sys.argv = ["trtllm-build", *sys.argv[1:]]
    trtllm_build()


if __name__ == "__main__":
    main()
