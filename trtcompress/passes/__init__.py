"""Compression passes. Importing this package registers every built-in pass."""

from trtcompress.passes import (  # noqa: F401  (registers the passes)
    awq,
    eora,
    fp4,
    gptq,
    gsq,
    kd,
    llmfp4,
    magnitude,
    regional,
    sparsegpt,
    structured,
    wanda,
)
from trtcompress.passes.base import PASS_REGISTRY, Pass, PassConfig, PassContext, build_pass, register_pass

__all__ = ["PASS_REGISTRY", "Pass", "PassConfig", "PassContext", "build_pass", "register_pass"]
