"""A real tritonserver (the one bundled in nvidia-pytriton) serving the native repository of a tiny
int4 artifact, started once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.conftest import write_artifact

DEPLOY = dict(
    max_batch_size=8, max_num_tokens=40, context_chunk_size=16, max_seq_len=128,
    max_tokens_in_paged_kv_cache=1024,
)  # fmt: skip


@pytest.fixture(scope="session")
def served_artifact(tiny_loud_dir, tmp_path_factory):
    return write_artifact(tiny_loud_dir, tmp_path_factory.mktemp("served") / "int4", "int4-g64-rtn")


# A decoupled model without a `finish_reason` output, as TensorRT-LLM's ensemble has none: it streams
# the prompt's words back; the last word carries Triton's final flag when `max_tokens` is given, else an
# empty response after it does (both forms end a request on the client).
ECHO_MODEL = "echo_no_finish_reason"
ECHO_CONFIG = f"""name: "{ECHO_MODEL}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
ECHO_MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            words = [w + b" " for w in text.split()]
            final_on_last = pb_utils.get_input_tensor_by_name(request, "max_tokens") is not None
            for i, word in enumerate(words):
                out = pb_utils.Tensor("text_output", np.array([word], dtype=np.object_))
                last = final_on_last and i == len(words) - 1
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=flags)
            if not final_on_last:
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


# The prompt's bytes streamed back one response each: a multi-byte character arrives split across
# responses (and invalid bytes as they are). A prompt with a line "fail" ends in an error response
# whose message has several lines, as a Python model's traceback has.
BYTES_MODEL = "echo_bytes"
BYTES_MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            text, fail = text.partition(b"\\nfail")[0], b"\\nfail" in text
            for i in range(len(text)):
                out = pb_utils.Tensor("text_output", np.array([text[i : i + 1]], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            if fail:
                error = pb_utils.TritonError("it broke\\nAt:\\n  model.py(12): execute")
                sender.send(pb_utils.InferenceResponse(error=error))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def write_echo_model(repo: Path) -> None:
    (repo / ECHO_MODEL / "1").mkdir(parents=True)
    (repo / ECHO_MODEL / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / ECHO_MODEL / "1" / "model.py").write_text(ECHO_MODEL_PY)
    (repo / BYTES_MODEL / "1").mkdir(parents=True)
    (repo / BYTES_MODEL / "config.pbtxt").write_text(ECHO_CONFIG.replace(ECHO_MODEL, BYTES_MODEL))
    (repo / BYTES_MODEL / "1" / "model.py").write_text(BYTES_MODEL_PY)


@pytest.fixture(scope="session")
def server(served_artifact, tmp_path_factory):
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    work = tmp_path_factory.mktemp("triton")
    steps = work / "steps.jsonl"
    repo = write_native_repository(work / "repo", served_artifact, DeployConfig(**DEPLOY), step_log=steps)
    write_echo_model(repo)
    srv = Server(repo, log_file=work / "tritonserver.log")
    srv.start(timeout=240)
    srv.step_log = steps
    yield srv
    assert srv.stop() == 0  # a clean shutdown (SIGTERM unloads the model, exit code 0)
