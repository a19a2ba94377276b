"""Repository generation: every config.pbtxt parses with tritonclient's ModelConfig; placeholders left
unfilled, unknown fields and bad values are errors."""

from __future__ import annotations

import pytest
import yaml

from trtcompress.runtime.config import DeployConfig
from trtcompress.triton_models import generate_repository
from trtcompress.triton_models.pbtxt import RepositoryError, parse_config, render, validate_repository


def _params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def test_native_repository(served_artifact, tmp_path):
    deploy = DeployConfig(max_batch_size=4, max_num_tokens=200, batch_scheduler_policy="max_utilization")
    repo = generate_repository("native", served_artifact, tmp_path / "r", deploy)
    configs = validate_repository(repo)
    config = configs["tensorrt_llm"]
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert [i.name for i in config.input][:3] == ["text_input", "max_tokens", "stream"]
    assert {o.name for o in config.output} == {"text_output", "finish_reason"}
    assert DeployConfig.model_validate_json(_params(config)["deploy"]) == deploy
    assert (repo / "tensorrt_llm" / "1" / "model.py").read_text().count("import TritonPythonModel") == 1


def test_trtllm_repository(served_artifact, tmp_path):
    deploy = DeployConfig(max_batch_size=16, max_num_tokens=512, enable_kv_cache_reuse=True)
    repo = generate_repository(
        "trtllm", served_artifact, tmp_path / "r", deploy, engine_dir=tmp_path / "engine"
    )
    configs = validate_repository(repo)
    assert set(configs) == {"preprocessing", "tensorrt_llm", "postprocessing", "ensemble"}
    trt = configs["tensorrt_llm"]
    params = _params(trt)
    assert (
        trt.backend == "tensorrtllm" and trt.max_batch_size == 16 and trt.model_transaction_policy.decoupled
    )
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str((tmp_path / "engine").resolve())
    assert (
        params["batch_scheduler_policy"] == "guaranteed_no_evict"
        and params["enable_kv_cache_reuse"] == "true"
    )
    steps = [s.model_name for s in configs["ensemble"].ensemble_scheduling.step]
    assert steps == ["preprocessing", "tensorrt_llm", "postprocessing"]
    assert _params(configs["preprocessing"])["tokenizer_dir"] == str(served_artifact.resolve())


def test_llmapi_repository(served_artifact, tiny_model_dir, tmp_path):
    """The LLM API loads a Hugging Face checkpoint: a model directory (or an artifact's hf/ export),
    never a native artifact alone."""
    with pytest.raises(RepositoryError, match="loads a Hugging Face checkpoint"):
        generate_repository("llmapi", served_artifact, tmp_path / "n", DeployConfig())
    repo = generate_repository("llmapi", tiny_model_dir, tmp_path / "r", DeployConfig(tensor_parallel_size=2))
    configs = validate_repository(repo)
    config = configs["tensorrt_llm"]
    inputs = {i.name for i in config.input}
    # upstream's request names (its model.py reads these), the policy left to model.yaml's triton_config
    assert {"text_input", "streaming", "sampling_param_max_tokens", "sampling_param_seed", "stop"} <= inputs
    assert "max_tokens" not in inputs and not config.HasField("model_transaction_policy")
    model = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model["backend"] == "pytorch" and model["tensor_parallel_size"] == 2
    assert model["triton_config"] == {"max_batch_size": 0, "decoupled": True}


def test_placeholders_and_schema_errors(tmp_path):
    with pytest.raises(RepositoryError, match="without a value: engine"):
        render('name: "x"\nparameters { key: "p" value: { string_value: "${engine}" } }', {})
    with pytest.raises(RepositoryError, match="unfilled"):
        parse_config('name: "x"\nbackend: "${backend}"')
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        parse_config('name: "x"\nmax_batch_sise: 4')
    with pytest.raises(RepositoryError, match="not a valid Triton model config"):
        parse_config('name: "x"\nmax_batch_size: "four"')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    (tmp_path / "m" / "model.yaml").write_text("model: ${MODEL}\n")
    with pytest.raises(RepositoryError, match=r"model\.yaml"):
        validate_repository(tmp_path)
    with pytest.raises(RepositoryError, match="unknown repository kind"):
        generate_repository("vllm", tmp_path, tmp_path / "out", DeployConfig())


# Input names the TensorRT-LLM backend reads (InputFieldsNames in NVIDIA/TensorRT-LLM
# triton_backend/inflight_batcher_llm/src/utils.h, with "streaming" and "stop"): Triton loads a config
# declaring any other name and the backend silently ignores that input.
TRTLLM_BACKEND_INPUTS = {
    "input_ids", "input_lengths", "request_output_len", "num_return_sequences", "end_id", "pad_id",
    "bad_words_list", "stop_words_list", "embedding_bias", "exclude_input_in_output", "return_log_probs",
    "return_context_logits", "return_generation_logits", "return_perf_metrics", "beam_width",
    "runtime_top_k", "runtime_top_p", "runtime_top_p_decay", "runtime_top_p_reset_ids", "temperature",
    "len_penalty", "early_stopping", "repetition_penalty", "min_tokens", "beam_search_diversity_rate",
    "presence_penalty", "frequency_penalty", "seed", "streaming", "stop",
}  # fmt: skip
TRTLLM_BACKEND_OUTPUTS = {"output_ids", "sequence_length", "cum_log_probs", "output_log_probs", "batch_index"}


def _ensemble_flow_errors(configs: dict) -> list[str]:
    """Every step input is an input of its model fed by the ensemble's inputs or an earlier step's
    outputs, every required model input is fed, every output key is an output of its model, and the
    ensemble's outputs are produced."""
    ensemble = configs["ensemble"]
    available = {i.name for i in ensemble.input}
    errors = []
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs, outputs = {i.name for i in model.input}, {o.name for o in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                errors.append(f"{step.model_name}: {key} is not one of its inputs")
            if value not in available:
                errors.append(f"{step.model_name}.{key} <- {value}: no earlier step or ensemble input")
        for name in {i.name for i in model.input if not i.optional} - set(step.input_map):
            errors.append(f"{step.model_name}: required input {name} not fed")
        for key, value in step.output_map.items():
            if key not in outputs:
                errors.append(f"{step.model_name}: {key} is not one of its outputs")
            available.add(value)
    errors += [f"ensemble output {o.name} never produced" for o in ensemble.output if o.name not in available]
    return errors


def test_trtllm_ensemble_connects_and_uses_backend_names(served_artifact, tmp_path):
    repo = generate_repository("trtllm", served_artifact, tmp_path / "r", DeployConfig(), tmp_path / "e")
    configs = validate_repository(repo)
    assert _ensemble_flow_errors(configs) == []
    trt = configs["tensorrt_llm"]
    assert {i.name for i in trt.input} <= TRTLLM_BACKEND_INPUTS  # `seed`, not the pre-2025 `random_seed`
    assert {o.name for o in trt.output} <= TRTLLM_BACKEND_OUTPUTS
    step = configs["ensemble"].ensemble_scheduling.step[1]
    assert step.model_name == "tensorrt_llm" and step.input_map["seed"] == "seed"
    # the check itself: a step fed by a tensor nobody produces, and a key the model does not have
    step.input_map["input_ids"] = "_NOWHERE"
    step.input_map["random_seed"] = "seed"
    errors = _ensemble_flow_errors(configs)
    assert any("_NOWHERE" in e for e in errors) and any("random_seed is not" in e for e in errors)


def test_trtllm_ensemble_returns_the_row_of_each_response(served_artifact, tmp_path):
    """The backend answers a request of B > 1 rows with B responses of batch 1, in completion order, and
    names the row of each in its `batch_index` output (model_instance_state.cc, fillTritonResponse): an
    ensemble without that output (as upstream's has) left a batched client unable to match texts to
    prompts."""
    from tritonclient.grpc import model_config_pb2

    repo = generate_repository("trtllm", served_artifact, tmp_path / "r", DeployConfig(), tmp_path / "e")
    configs = validate_repository(repo)
    trt_out = {o.name: o for o in configs["tensorrt_llm"].output}
    assert trt_out["batch_index"].data_type == model_config_pb2.TYPE_INT32
    assert list(trt_out["batch_index"].dims) == [1]
    ensemble = configs["ensemble"]
    ens_out = {o.name: o for o in ensemble.output}["batch_index"]
    assert ens_out.data_type == model_config_pb2.TYPE_INT32 and list(ens_out.dims) == [1]
    step = ensemble.ensemble_scheduling.step[1]
    assert step.model_name == "tensorrt_llm" and step.output_map["batch_index"] == "batch_index"
    assert _ensemble_flow_errors(configs) == []


# Parameters TensorRT-LLM's backend reads with no default: ModelInstanceState::getBatchingTypeFromParams and
# getGuidedDecodingConfigFromParams (triton_backend/inflight_batcher_llm/src/model_instance_state.cc) call
# ModelState::GetParameter<std::string> outside any try, which throws "Cannot find parameter with name: X"
# for a missing key, so the tensorrt_llm model fails to load.
TRTLLM_BACKEND_REQUIRED_PARAMETERS = {
    "gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend",
}  # fmt: skip


def test_trtllm_declares_the_parameters_the_backend_requires(served_artifact, tmp_path):
    repo = generate_repository("trtllm", served_artifact, tmp_path / "r", DeployConfig(), tmp_path / "e")
    params = _params(validate_repository(repo)["tensorrt_llm"])
    assert set(params) >= TRTLLM_BACKEND_REQUIRED_PARAMETERS
    # empty: no guided decoding (a backend name without a tokenizer info file would fail the load)
    assert params["guided_decoding_backend"] == "" and params["xgrammar_tokenizer_info_path"] == ""
    assert params["tokenizer_dir"] == str(served_artifact.resolve())


@pytest.mark.parametrize(
    ("build_config", "chunked"),
    [
        (None, "true"),  # no engine there yet: the deploy section decides
        ({"kv_cache_type": "PAGED", "plugin_config": {"use_paged_context_fmha": True}}, "true"),
        ({"kv_cache_type": "PAGED", "plugin_config": {"use_paged_context_fmha": False}}, "false"),
        ({"kv_cache_type": "CONTINUOUS", "plugin_config": {"use_paged_context_fmha": True}}, "false"),
    ],
)
def test_repo_over_an_engine_dir_reads_whether_the_engine_can_chunk(
    served_artifact, tmp_path, build_config, chunked
):
    """`repo --kind trtllm --engine-dir DIR` asked for chunked context whatever the engine: TensorRT-LLM's
    executor refuses it at load for an engine without paged context FMHA or a paged KV cache."""
    import json

    engine = tmp_path / "engine"
    engine.mkdir()
    if build_config is not None:
        (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "build_config": build_config}))
    deploy = DeployConfig(enable_chunked_context=True)
    repo = generate_repository("trtllm", served_artifact, tmp_path / "r", deploy, engine)
    assert _params(validate_repository(repo)["tensorrt_llm"])["enable_chunked_context"] == chunked


@pytest.mark.parametrize("name", ["$USER", "${date} b"])
def test_a_dollar_inside_a_path_is_no_placeholder(served_artifact, tiny_model_dir, tmp_path, name):
    """Artifacts under /data/$USER/... or "/runs/${date} b/..." (legal directory names) were refused as
    "unfilled template placeholders" by repo, serve and validate_repository; a `${name}` that makes up a
    whole value (a quoted string, a YAML value, or outside strings) is still an unfilled placeholder."""
    import shutil

    root = tmp_path / "runs" / name
    artifact, model = root / "int4", root / "hf"
    shutil.copytree(served_artifact, artifact)
    shutil.copytree(tiny_model_dir, model)
    for kind, source in (("native", artifact), ("trtllm", artifact), ("llmapi", model)):
        repo = generate_repository(kind, source, tmp_path / kind, DeployConfig())
        configs = validate_repository(repo)
        paths = [v for c in configs.values() for v in _params(c).values() if v.startswith(str(root))]
        if kind == "llmapi":
            paths = [yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())["model"]]
        assert paths and all(p.startswith(str(root.resolve())) for p in paths), (kind, paths)
    for text in ('backend: "${backend}"', 'backend: "${a} ${b}"', "max_batch_size: ${n}"):
        with pytest.raises(RepositoryError, match="unfilled"):
            parse_config(f'name: "x"\n{text}')
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    (tmp_path / "m" / "1" / "model.yaml").write_text("model: '${MODEL}'\n")
    with pytest.raises(RepositoryError, match=r"model\.yaml"):
        validate_repository(tmp_path)
