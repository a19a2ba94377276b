"""`trtcompress build --engine`: a TensorRT-LLM 1.2.1 engine from the artifact's trtllm checkpoint.

TensorRT-LLM cannot be installed on the development machines (its PyPI release downloads from NVIDIA's
index), so everything here that needs it imports it lazily; `require_trtllm()` runs before a build starts
and refuses with the container to use, so a refused `--engine` build writes nothing. The engine is built
by TensorRT-LLM's own `trtllm-build` (in a subprocess, with the project's TensorRT plugins registered
through `trtcompress.plugins.loader`), into `OUT/engine`; the flags come from the recipe's
`export.engine` section (see `trtllm_build_args`, which is pure and tested here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trtcompress.errors import ArtifactError, MissingDependencyError

TRTLLM_VERSION = "1.2.1"
# The NGC Triton release that ships TensorRT-LLM 1.2.1 (docker/Dockerfile.gpu asserts the version at build).
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
INSTALL_HINT = (
    f"building a TensorRT engine needs TensorRT-LLM {TRTLLM_VERSION} and a CUDA GPU, which are not "
    f"installed here: run the build inside the NGC container {NGC_IMAGE} (or the image from "
    f"docker/Dockerfile.gpu), or `pip install tensorrt_llm=={TRTLLM_VERSION} --extra-index-url "
    "https://pypi.nvidia.com` on a GPU machine; without --engine the trtllm checkpoint is written and "
    "can be built there with trtllm-build"
)
GROUP_SIZES = (64, 128)  # what TensorRT-LLM's weight-only group-wise GEMM kernels implement
# quant_algos the engine path cannot build for dense LLaMA linears: TensorRT-LLM implements W4A16_MXFP4 only
# in its PyTorch backend's fused MoE; the TensorRT path's `quantization/quantize.py: quantize()` has no MXFP4
# branch (and `QuantMode.is_weight_only()` is false for it), so trtllm-build keeps plain fp16 Linear layers
# and fails loading the packed uint8 weights.
ENGINE_UNSUPPORTED_ALGOS = {"W4A16_MXFP4": "the PyTorch backend's fused MoE only"}
# `trtllm-build --gemm_plugin / --gpt_attention_plugin` choices in TensorRT-LLM 1.2.1
# (tensorrt_llm/plugin/plugin.py: PluginConfig's Literal types; add_plugin_argument spells None "disable").
GEMM_PLUGIN_CHOICES = ("auto", "float16", "float32", "bfloat16", "int32", "fp8", "nvfp4", "disable")
ATTENTION_PLUGIN_CHOICES = ("auto", "float16", "float32", "bfloat16", "int32", "disable")


def trtllm_version() -> str | None:
    """The installed TensorRT-LLM version, without importing it (its import initialises CUDA)."""
    from importlib import metadata

    try:
        return metadata.version("tensorrt_llm")
    except metadata.PackageNotFoundError:
        return None


def require_trtllm() -> str:
    """Fail early, before any work or any file, when TensorRT-LLM 1.2.1 is not installed."""
    version = trtllm_version()
    if version is None or shutil.which("trtllm-build") is None:
        raise MissingDependencyError(INSTALL_HINT)
    if version.split("+")[0] != TRTLLM_VERSION:
        raise MissingDependencyError(
            f"TensorRT-LLM {version} is installed; the engine path is pinned to {TRTLLM_VERSION} (the last "
            f"release with trtllm-build and the C++ Triton backend): use {NGC_IMAGE}"
        )
    return version


def check_buildable(config: dict[str, Any]) -> None:
    """Refuse checkpoints stock trtllm-build would build wrongly or not at all, naming why."""
    ours = config.get("trtcompress", {})
    plugins = ours.get("plugins") or {}
    if plugins:
        names = ", ".join(sorted(plugins))
        raise ArtifactError(
            f"this checkpoint needs the trtcompress TensorRT plugins {names}, which stock trtllm-build "
            "cannot insert into TensorRT-LLM's LLaMA graph (LLM-FP4 W4A4 GEMMs, GEAR/KIVI KV caches have no "
            "TensorRT-LLM quant_algo); serve this artifact with the native runtime (`trtcompress serve`), "
            "or rebuild without those passes / with kv_cache.codec fp8 or int8"
        )
    quant = config.get("quantization") or {}
    algo = quant.get("quant_algo")
    if algo in ENGINE_UNSUPPORTED_ALGOS:
        raise ArtifactError(
            f"TensorRT-LLM {TRTLLM_VERSION} implements {algo} in {ENGINE_UNSUPPORTED_ALGOS[algo]}: "
            "trtllm-build's TensorRT path has no such linear layer and cannot load this checkpoint; "
            "serve it natively (`trtcompress serve`), or build the engine from an int4 recipe (w4a16-awq)"
        )
    group = quant.get("group_size")
    if algo in ("W4A16_AWQ", "W4A16_GPTQ") and group not in GROUP_SIZES:
        raise ArtifactError(
            f"TensorRT-LLM's group-wise int4 kernels take group size 64 or 128, this checkpoint has {group}"
        )


def trtllm_build_args(checkpoint: Path, output: Path, engine: Any, config: dict[str, Any]) -> list[str]:
    """The trtllm-build command line for a checkpoint and the recipe's `export.engine` section."""
    world = config["mapping"]["world_size"]
    args = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint),
        "--output_dir", str(output),
        "--max_batch_size", str(engine.max_batch_size),
        "--max_input_len", str(engine.max_input_len),
        "--max_seq_len", str(engine.max_seq_len),
        "--max_num_tokens", str(engine.max_num_tokens),
        "--kv_cache_type", engine.kv_cache_type,
        "--gemm_plugin", engine.gemm_plugin,
        "--gpt_attention_plugin", engine.gpt_attention_plugin,
        "--workers", str(min(engine.workers, world)),
    ]  # fmt: skip
    # Always explicit: trtllm-build 1.2.1 defaults it to enable (plugin.py: PluginConfig), so leaving it out
    # for a continuous / disabled KV cache would build paged context FMHA on a cache that is not paged.
    paged_fmha = engine.kv_cache_type == "paged" and engine.use_paged_context_fmha
    args += ["--use_paged_context_fmha", "enable" if paged_fmha else "disable"]
    return args


def build_engine(checkpoint: Path, output: Path, engine: Any, log=print) -> dict[str, Any]:
    """Run trtllm-build on `checkpoint` into `output`; returns what the manifest records about it."""
    version = require_trtllm()
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    check_buildable(config)
    args = trtllm_build_args(checkpoint, output, engine, config)
    log(" ".join(args))
    # trtllm-build's own entry point, in a Python that first registers the trtcompress TensorRT plugins.
    command = [sys.executable, "-m", "trtcompress.plugins.trtllm_build", *args[1:]]
    proc = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise ArtifactError(f"trtllm-build failed (exit {proc.returncode}):\n{tail}")
    return {"trtllm_version": version, "command": args, "dir": output.name, "python": sys.executable}


def fill_triton_repository(
    artifact: Path, final: Path, deploy: Any = None, log=print, engine: Any = None
) -> Path:
    """Write the `inflight_batcher_llm` Triton repository into `artifact/triton/trtllm` (the serving issue's
    generator), pointing at the engine and the tokenizer where they will live: `final` is the artifact's
    path after the build's atomic rename. `engine` (the recipe's `export.engine`): an engine built without
    paged context FMHA (or without a paged KV cache) gets `enable_chunked_context: false`, since
    TensorRT-LLM's executor refuses chunked context there ("Chunked context requires context FMHA, paged
    kv_cache and paged context FMHA", batch_manager/trtGptModelInflightBatching.cpp) and the model would not
    load."""
    from trtcompress.triton_models.trtllm import fill_trtllm_repository

    chunked = engine is None or (engine.kv_cache_type == "paged" and engine.use_paged_context_fmha)
    if not chunked and deploy is not None and deploy.enable_chunked_context:
        log("the engine has no paged context FMHA: the Triton repository turns chunked context off")
    repo = fill_trtllm_repository(
        artifact / "triton" / "trtllm",
        engine_dir=final / "engine",
        tokenizer_dir=final,
        deploy=deploy,
        chunked_context=chunked,
    )
    log(f"Triton repository for the engine: {final / 'triton' / 'trtllm'}")
    return repo
