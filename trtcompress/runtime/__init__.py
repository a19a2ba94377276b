"""Native runtime: a compressed model served with in-flight (continuous) batching.

- `config.py`: `DeployConfig`, the recipe's `deploy:` section (no torch import: the recipe loads it);
- `sampling.py`: sampling parameters, their validation, and the per-request sampler;
- `sequence.py`: a request's token stream, its incremental text and stop conditions;
- `scheduler.py`: which tokens of which sequences run in the next step (token budget, chunked
  prefill, KV admission policy, preemption, cancellation);
- `linear.py`: the linear layers as the runtime runs them (reference path on CPU, plugin ops on CUDA),
  batch-invariant by construction;
- `model.py`: one ragged forward step of many sequences over the paged KV cache of `trtcompress.kv`;
- `engine.py`: `Engine` (add requests, step, stream outputs, offline `generate`) and `EngineLoop` (the
  background thread a server drives).

Imports are lazy so `trtcompress.runtime.config` stays cheap for the recipe and the CLI.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DeployConfig": "trtcompress.runtime.config",
    "SamplingParams": "trtcompress.runtime.sampling",
    "RequestError": "trtcompress.runtime.sampling",
    "Engine": "trtcompress.runtime.engine",
    "EngineLoop": "trtcompress.runtime.engine",
    "RequestOutput": "trtcompress.runtime.sequence",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
