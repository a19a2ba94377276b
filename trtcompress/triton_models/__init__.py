"""Triton model repositories generated from an artifact and its recipe's `deploy:` section.

- `native` (`native.py`): one decoupled python-backend model running the native runtime;
- `trtllm` (`trtllm.py`): TensorRT-LLM's inflight_batcher_llm layout (preprocessing, tensorrt_llm,
  postprocessing, ensemble) pointing at an engine directory;
- `llmapi` (`llmapi.py`): TensorRT-LLM's PyTorch-backend LLM-API model (`model.yaml`).

Every `config.pbtxt` is rendered strictly (a leftover placeholder is an error) and parsed back with
tritonclient's `model_config_pb2` before it is written (`pbtxt.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KINDS = ("native", "trtllm", "llmapi")


def trtllm_engine_dir(artifact: Path, deploy: Any, engine_dir: Path | None = None) -> Path:
    """The engine a trtllm repository points at: `--engine-dir`, else the recipe's deploy.engine_dir,
    else ARTIFACT/engine (where `build --engine` writes it)."""
    return Path(engine_dir or deploy.engine_dir or Path(artifact) / "engine")


def generate_repository(
    kind: str, artifact: Path, out: Path, deploy: Any = None, engine_dir: Path | None = None
) -> Path:
    from trtcompress.checkpoints import native as artifacts
    from trtcompress.triton_models.native import deploy_from_artifact
    from trtcompress.triton_models.pbtxt import RepositoryError

    if (Path(artifact) / artifacts.MANIFEST).exists():  # nothing loads it here: check it as `inspect` does
        artifacts.verify_files(Path(artifact), artifacts.read_manifest(Path(artifact)))
    deploy = deploy or deploy_from_artifact(Path(artifact))
    if kind == "native":
        from trtcompress.triton_models.native import write_native_repository

        return write_native_repository(out, artifact, deploy)
    if kind == "trtllm":
        from trtcompress.triton_models.trtllm import engine_can_chunk, fill_trtllm_repository

        engine = trtllm_engine_dir(artifact, deploy, engine_dir)
        chunked = engine_can_chunk(engine) is not False  # an engine without paged context FMHA refuses it
        return fill_trtllm_repository(
            out, engine_dir=engine, tokenizer_dir=Path(artifact), deploy=deploy, chunked_context=chunked
        )
    if kind == "llmapi":
        from trtcompress.triton_models.llmapi import write_llmapi_repository

        return write_llmapi_repository(out, artifact, deploy)
    raise RepositoryError(f"unknown repository kind {kind!r}; known: {', '.join(KINDS)}")
