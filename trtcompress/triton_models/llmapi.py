"""The `llmapi` repository: TensorRT-LLM's PyTorch-backend LLM-API Triton model.

`tensorrt_llm/config.pbtxt` (python backend, decoupled) and `tensorrt_llm/1/model.yaml` (what the
LLM-API `model.py` of TensorRT-LLM's `triton_backend/all_models/llmapi` reads: the model to load, the
PyTorch backend, parallelism, the KV-cache and scheduler settings of the recipe's deploy section). That
`model.py` ships with TensorRT-LLM; copy it into `tensorrt_llm/1/` in the NGC container together with the
`helpers.py` beside it, which it imports (`from helpers import ...`; neither is installable here). The
request names (`text_input`, `sampling_param_max_tokens`, `streaming`, `text_output`, ...) are ones the
native model accepts too, so clients are the same.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from trtcompress.runtime.config import DeployConfig
from trtcompress.triton_models.pbtxt import RepositoryError, check_no_placeholders, render, write_config


def model_yaml(model: Path, deploy: DeployConfig) -> dict:
    return {
        "model": str(model),
        "backend": "pytorch",
        "tensor_parallel_size": deploy.tensor_parallel_size,
        "pipeline_parallel_size": deploy.pipeline_parallel_size,
        "max_batch_size": deploy.max_batch_size,
        "max_num_tokens": deploy.max_num_tokens,
        "max_seq_len": deploy.max_seq_len,
        "enable_chunked_prefill": deploy.enable_chunked_context,
        "kv_cache_config": {
            "free_gpu_memory_fraction": deploy.kv_cache_free_gpu_mem_fraction,
            "max_tokens": deploy.max_tokens_in_paged_kv_cache,
            "enable_block_reuse": deploy.enable_kv_cache_reuse,
        },
        "scheduler_config": {
            "capacity_scheduler_policy": deploy.batch_scheduler_policy.upper(),
        },
        "triton_config": {"max_batch_size": 0, "decoupled": deploy.decoupled},
    }


# The request names of TensorRT-LLM's LLM-API python model (its model.py reads sampling_param_*,
# `streaming`, `return_finish_reason`); the native model declares them too, as aliases of its own.
LLM_API_INPUTS = """  { name: "streaming" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "sampling_param_max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "sampling_param_temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "sampling_param_top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "sampling_param_top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "sampling_param_seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true },
  { name: "sampling_param_stop" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "return_finish_reason" data_type: TYPE_BOOL dims: [ 1 ] optional: true }"""

# The LLM-API model's config: those inputs, plus `stop` as a BOOL that cancels the request. The batch
# size and the transaction policy are not set here: model.yaml's triton_config sets them.
CONFIG_TEMPLATE = f"""name: "${{name}}"
backend: "python"
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ -1 ] }},
{LLM_API_INPUTS},
  {{ name: "sampling_param_exclude_input_from_output" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "stop" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "finish_reason" data_type: TYPE_STRING dims: [ -1 ] }}
]
"""


def write_llmapi_repository(repo: Path, artifact: Path, deploy: DeployConfig | None = None) -> Path:
    """The HF checkpoint the LLM API loads: ARTIFACT/hf when the build exported one, else ARTIFACT."""
    deploy = deploy or DeployConfig()
    artifact = Path(artifact).resolve()
    model = artifact / "hf" if (artifact / "hf" / "config.json").is_file() else artifact
    if not (model / "config.json").is_file():  # a native artifact alone: nothing the LLM API can load
        raise RepositoryError(
            f"{artifact}: the llmapi model loads a Hugging Face checkpoint; build with export formats "
            "including hf (written to ARTIFACT/hf), or pass a model directory"
        )
    text = render(CONFIG_TEMPLATE, {"name": "tensorrt_llm"})
    model_dir = Path(repo) / "tensorrt_llm"
    write_config(model_dir, text)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(model_yaml(model, deploy), sort_keys=False)
    check_no_placeholders(body, "model.yaml")
    (model_dir / "1" / "model.yaml").write_text(body, encoding="utf-8")
    return Path(repo)
