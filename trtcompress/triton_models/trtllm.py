"""The `trtllm` repository: TensorRT-LLM's inflight_batcher_llm layout over an engine directory.

`preprocessing` (python: tokenize) -> `tensorrt_llm` (backend `tensorrtllm`, in-flight fused batching,
paged KV cache, the recipe's scheduler policy) -> `postprocessing` (python: detokenize), chained by
`ensemble`, whose inputs are `text_input`, `max_tokens`, `stream`, ... and outputs `text_output` (and
`batch_index`, the row each response answers, for a request of several rows). The
python models' code is ours (`trtllm_models.py`, tokenizer from the artifact); the `tensorrt_llm` model
needs the TensorRT-LLM Triton backend (NGC `tritonserver:*-trtllm-python-py3`), which cannot run here,
so this repository is generated and validated here and served there.
"""

from __future__ import annotations

import json
from pathlib import Path

from trtcompress.runtime.config import DeployConfig
from trtcompress.triton_models.pbtxt import parameters, render, write_config

PREPROCESSING = """name: "preprocessing"
backend: "python"
max_batch_size: ${max_batch_size}
input [
  { name: "QUERY" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "END_ID" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "PAD_ID" data_type: TYPE_INT32 dims: [ 1 ] optional: true }
]
output [
  { name: "INPUT_ID" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "REQUEST_INPUT_LEN" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "OUT_END_ID" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "OUT_PAD_ID" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
${parameters}
"""

# Input names are the ones the TensorRT-LLM backend reads (InputFieldsNames in
# triton_backend/inflight_batcher_llm/src/utils.h); an input it does not know is accepted by Triton and
# silently ignored (the sampling seed is `seed` since the backend renamed `random_seed`, May 2025).
# A request of B > 1 rows becomes B executor requests answered separately, each response of batch 1 in
# completion order, with `batch_index` (sent only when B > 1) naming its row (ModelInstanceState::
# fillTritonResponse in NVIDIA/TensorRT-LLM triton_backend/inflight_batcher_llm/src/model_instance_state.cc);
# the ensemble passes it on, as upstream's all_models/inflight_batcher_llm/ensemble/config.pbtxt does.
TENSORRT_LLM = """name: "tensorrt_llm"
backend: "tensorrtllm"
max_batch_size: ${max_batch_size}
model_transaction_policy { decoupled: ${decoupled} }
dynamic_batching { }
input [
  { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] allow_ragged_batch: true },
  { name: "input_lengths" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "request_output_len" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "end_id" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "pad_id" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "streaming" data_type: TYPE_BOOL dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "runtime_top_k" data_type: TYPE_INT32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "runtime_top_p" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } optional: true },
  { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] reshape: { shape: [ ] } optional: true }
]
output [
  { name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] },
  { name: "sequence_length" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "batch_index" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
${parameters}
"""

POSTPROCESSING = """name: "postprocessing"
backend: "python"
max_batch_size: ${max_batch_size}
input [
  { name: "TOKENS_BATCH" data_type: TYPE_INT32 dims: [ -1, -1 ] },
  { name: "SEQUENCE_LENGTH" data_type: TYPE_INT32 dims: [ -1 ] }
]
output [ { name: "OUTPUT" data_type: TYPE_STRING dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
${parameters}
"""

ENSEMBLE = """name: "ensemble"
platform: "ensemble"
max_batch_size: ${max_batch_size}
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "end_id" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "pad_id" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true },
  { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "batch_index" data_type: TYPE_INT32 dims: [ 1 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "preprocessing" model_version: -1
      input_map { key: "QUERY" value: "text_input" }
      input_map { key: "REQUEST_OUTPUT_LEN" value: "max_tokens" }
      input_map { key: "END_ID" value: "end_id" }
      input_map { key: "PAD_ID" value: "pad_id" }
      output_map { key: "INPUT_ID" value: "_INPUT_ID" }
      output_map { key: "REQUEST_INPUT_LEN" value: "_REQUEST_INPUT_LEN" }
      output_map { key: "REQUEST_OUTPUT_LEN" value: "_REQUEST_OUTPUT_LEN" }
      output_map { key: "OUT_END_ID" value: "_END_ID" }
      output_map { key: "OUT_PAD_ID" value: "_PAD_ID" }
    },
    {
      model_name: "tensorrt_llm" model_version: -1
      input_map { key: "input_ids" value: "_INPUT_ID" }
      input_map { key: "input_lengths" value: "_REQUEST_INPUT_LEN" }
      input_map { key: "request_output_len" value: "_REQUEST_OUTPUT_LEN" }
      input_map { key: "end_id" value: "_END_ID" }
      input_map { key: "pad_id" value: "_PAD_ID" }
      input_map { key: "streaming" value: "stream" }
      input_map { key: "runtime_top_k" value: "top_k" }
      input_map { key: "runtime_top_p" value: "top_p" }
      input_map { key: "temperature" value: "temperature" }
      input_map { key: "seed" value: "seed" }
      output_map { key: "output_ids" value: "_TOKENS_BATCH" }
      output_map { key: "sequence_length" value: "_SEQUENCE_LENGTH" }
      output_map { key: "batch_index" value: "batch_index" }
    },
    {
      model_name: "postprocessing" model_version: -1
      input_map { key: "TOKENS_BATCH" value: "_TOKENS_BATCH" }
      input_map { key: "SEQUENCE_LENGTH" value: "_SEQUENCE_LENGTH" }
      output_map { key: "OUTPUT" value: "text_output" }
    }
  ]
}
"""

PRE_PY = '''"""Generated by trtcompress: tokenizer model of the inflight_batcher_llm ensemble."""

from trtcompress.triton_models.trtllm_models import Preprocessing as TritonPythonModel  # noqa: F401
'''
POST_PY = '''"""Generated by trtcompress: detokenizer model of the inflight_batcher_llm ensemble."""

from trtcompress.triton_models.trtllm_models import Postprocessing as TritonPythonModel  # noqa: F401
'''


def tensorrt_llm_parameters(
    engine_dir: Path, deploy: DeployConfig, tokenizer_dir: Path | None = None, chunked_context: bool = True
) -> dict[str, object]:
    """The `tensorrt_llm` model's parameters (names and values as the TensorRT-LLM backend reads them).

    The backend reads `tokenizer_dir`, `xgrammar_tokenizer_info_path` and `guided_decoding_backend` with
    no default (ModelInstanceState::getGuidedDecodingConfigFromParams in triton_backend/inflight_batcher_llm/
    src/model_instance_state.cc): a config without them fails to load with "Cannot find parameter with
    name: tokenizer_dir". Empty values mean no guided decoding. `chunked_context` false: the engine was built
    without paged context FMHA, with which the executor refuses enable_chunked_context (at load)."""
    return {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": str(engine_dir),
        "batch_scheduler_policy": deploy.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": deploy.kv_cache_free_gpu_mem_fraction,
        "max_tokens_in_paged_kv_cache": deploy.max_tokens_in_paged_kv_cache,
        "enable_chunked_context": deploy.enable_chunked_context and chunked_context,
        "enable_kv_cache_reuse": deploy.enable_kv_cache_reuse,
        "exclude_input_in_output": deploy.exclude_input_in_output,
        "max_beam_width": 1,
        "tokenizer_dir": str(tokenizer_dir or ""),
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
    }


def engine_can_chunk(engine_dir: Path) -> bool | None:
    """Whether a built engine can take chunked context (paged KV cache and paged context FMHA, as the
    executor requires), from its `config.json` (`build_config.kv_cache_type`,
    `build_config.plugin_config.use_paged_context_fmha`); None when the directory does not say (not built
    yet, or an unknown layout)."""
    try:
        build = (
            json.loads((Path(engine_dir) / "config.json").read_text(encoding="utf-8")).get("build_config")
            or {}
        )
    except (OSError, ValueError, AttributeError):
        return None
    plugins = build.get("plugin_config") or {}
    kv, fmha = build.get("kv_cache_type"), plugins.get("use_paged_context_fmha")
    if kv is None and fmha is None:
        return None
    return str(kv or "PAGED").upper() == "PAGED" and fmha is not False


def fill_trtllm_repository(
    repo: Path,
    engine_dir: Path,
    tokenizer_dir: Path,
    deploy: DeployConfig | None = None,
    chunked_context: bool = True,
) -> Path:
    """Write the four models into `repo`; the engine directory need not exist yet (built elsewhere).
    `chunked_context` false: the engine cannot chunk prompts (no paged context FMHA), whatever `deploy`
    says."""
    deploy = deploy or DeployConfig()
    repo = Path(repo)
    tokenizer_dir = Path(tokenizer_dir).resolve()
    tokenizer = {"tokenizer_dir": str(tokenizer_dir)}
    backend = tensorrt_llm_parameters(Path(engine_dir).resolve(), deploy, tokenizer_dir, chunked_context)
    common = {"max_batch_size": deploy.max_batch_size}
    models = {
        "preprocessing": (PREPROCESSING, {**common, "parameters": parameters(tokenizer)}, PRE_PY),
        "tensorrt_llm": (
            TENSORRT_LLM,
            {
                **common,
                "decoupled": "true" if deploy.decoupled else "false",
                "parameters": parameters(backend),
            },
            None,
        ),
        "postprocessing": (POSTPROCESSING, {**common, "parameters": parameters(tokenizer)}, POST_PY),
        "ensemble": (ENSEMBLE, common, None),
    }
    for name, (template, values, code) in models.items():
        write_config(repo / name, render(template, values))
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        if code:
            (repo / name / "1" / "model.py").write_text(code, encoding="utf-8")
    return repo
