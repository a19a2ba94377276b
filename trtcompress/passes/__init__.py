"""Compression passes. Importing this package registers every built-in pass."""

from trtcompress.passes import gsq  # noqa: F401  (registers the pass)
from trtcompress.passes.base import PASS_REGISTRY, Pass, PassConfig, PassContext, build_pass, register_pass

__all__ = ["PASS_REGISTRY", "Pass", "PassConfig", "PassContext", "build_pass", "register_pass"]
