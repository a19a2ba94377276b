"""A real tritonserver (the one bundled in nvidia-pytriton) serving the native repository of a tiny
int4 artifact, started once per session."""

from __future__ import annotations

import pytest

from tests.runtime.conftest import write_artifact

DEPLOY = dict(
    max_batch_size=8, max_num_tokens=40, context_chunk_size=16, max_seq_len=128,
    max_tokens_in_paged_kv_cache=1024,
)  # fmt: skip


@pytest.fixture(scope="session")
def served_artifact(tiny_model_dir, tmp_path_factory):
    return write_artifact(tiny_model_dir, tmp_path_factory.mktemp("served") / "int4", "int4-g64-rtn")


@pytest.fixture(scope="session")
def server(served_artifact, tmp_path_factory):
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    work = tmp_path_factory.mktemp("triton")
    steps = work / "steps.jsonl"
    repo = write_native_repository(work / "repo", served_artifact, DeployConfig(**DEPLOY), step_log=steps)
    srv = Server(repo, log_file=work / "tritonserver.log")
    srv.start(timeout=240)
    srv.step_log = steps
    yield srv
    assert srv.stop() == 0  # a clean shutdown (SIGTERM unloads the model, exit code 0)
