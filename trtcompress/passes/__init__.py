"""Compression passes. Importing this package registers every built-in pass."""

from trtcompress.passes import awq, gptq, gsq  # noqa: F401  (registers the passes)
from trtcompress.passes.base import PASS_REGISTRY, Pass, PassConfig, PassContext, build_pass, register_pass

__all__ = ["PASS_REGISTRY", "Pass", "PassConfig", "PassContext", "build_pass", "register_pass"]
