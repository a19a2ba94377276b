"""End to end: real tritonserver, real tritonclient gRPC streaming and HTTP generate/generate_stream."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from trtcompress.client import ClientError, generate_grpc, generate_http

from .conftest import DEPLOY, ECHO_MODEL

MODEL = "tensorrt_llm"
PROMPTS = [
    "the river flows",
    "in the year",
    "the president of the",
    "water is",
    "a small village near the mountains",
    "the first",
]


@pytest.fixture(scope="module")
def offline(served_artifact):
    """The runtime's own offline generation for the same prompts (the expected answers)."""
    from trtcompress.runtime import Engine, SamplingParams
    from trtcompress.runtime.config import DeployConfig

    engine = Engine.from_path(served_artifact, DeployConfig(**DEPLOY))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    return {p: o.text for p, o in zip(PROMPTS, outs, strict=True)}


def test_concurrent_grpc_and_http_match_offline_and_join_the_running_batch(server, offline):
    e = server.endpoints
    before = len(server.step_log.read_text().splitlines()) if server.step_log.exists() else 0
    results, errors = {}, []
    first_piece = threading.Event()
    start = threading.Barrier(len(PROMPTS))  # the requests leave together, not as their threads start

    def run(i: int, prompt: str) -> None:
        try:
            start.wait(30)
            if i % 3 == 2:  # every third request over HTTP (generate, then generate_stream)
                out = generate_http(e.http, MODEL, prompt, stream=i == 5, max_tokens=12)
            else:
                out = generate_grpc(e.grpc, MODEL, prompt, max_tokens=12)
            results[prompt] = out
        except Exception as exc:  # reported below
            errors.append(exc)

    # a long request is generating when the others arrive
    long = threading.Thread(
        target=lambda: results.__setitem__(
            "long",
            generate_grpc(
                e.grpc, MODEL, "once upon", max_tokens=60, end_id=-1, on_piece=lambda p: first_piece.set()
            ),
        )
    )
    long.start()
    assert first_piece.wait(60)
    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in [*threads, long]:
        t.join(120)
    assert not errors, errors
    for prompt in PROMPTS:
        assert results[prompt].text == offline[prompt], prompt
        assert results[prompt].finish_reason in ("length", "stop")
    assert results["long"].finish_reason == "length" and len(results["long"].pieces) > 10
    # the runtime's per-step record: requests joined while another one was already generating
    steps = [json.loads(line) for line in server.step_log.read_text().splitlines()[before:]]
    joined_running = [s for s in steps if s["joined"] and set(s["running"]) - set(s["joined"])]
    assert joined_running, "no request joined a running batch"
    # batches beyond the long request and one other (>= 4 on an idle machine; a loaded one may admit
    # simultaneous arrivals a step apart)
    assert max(s["batch_size"] for s in steps) >= 3


def test_http_generate_stream_pieces_add_up(server, offline):
    out = generate_http(server.endpoints.http, MODEL, PROMPTS[0], stream=True, max_tokens=12)
    assert len(out.pieces) > 1 and out.text == offline[PROMPTS[0]]


@pytest.mark.parametrize(
    ("transport", "prompt", "params", "match"),
    [
        ("http", "", {"max_tokens": 4}, "empty"),
        ("http", "hello", {"max_tokens": 0}, "max_tokens must be a positive"),
        ("http", "hello", {"max_tokens": 500}, "exceeds the context"),
        ("http", "hello", {"max_tokens": 4, "bogus": 1}, "unknown parameter"),
        ("http", "word " * 200, {"max_tokens": 4}, "context holds"),
        ("grpc", b"caf\xc3(", {"max_tokens": 4}, "not valid UTF-8"),
        ("grpc", "hello", {"max_tokens": 4, "temperature": -2.0}, "temperature"),
        ("grpc", "hello", {"max_tokens": 4, "bogus": 1}, "bogus"),
    ],
)
def test_invalid_requests_get_an_error_and_the_server_keeps_serving(server, transport, prompt, params, match):
    e = server.endpoints
    call = generate_http if transport == "http" else generate_grpc
    url = e.http if transport == "http" else e.grpc
    with pytest.raises(ClientError, match=match):
        call(url, MODEL, prompt, **params)
    assert generate_grpc(e.grpc, MODEL, "the river", max_tokens=3).finish_reason in ("length", "stop")


def test_endpoints_bind_to_localhost(server):
    assert server.endpoints.host == "127.0.0.1" and "--http-address=127.0.0.1" in server.command()
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.endpoints.http)
    try:
        assert client.is_model_ready(MODEL)
        t0 = time.perf_counter()
        assert client.is_server_live() and time.perf_counter() - t0 < 5
    finally:
        client.close()


def test_a_non_decoupled_model_refuses_streaming_and_serves_the_rest(served_artifact, tmp_path):
    """`deploy.decoupled: false` sends one response per request: a streamed request gets a clear error
    (it used to hang, its second response refused, and kept the server from stopping), a plain one an
    answer; the server still stops cleanly."""
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    deploy = DeployConfig(**{**DEPLOY, "decoupled": False})
    srv = Server(
        write_native_repository(tmp_path / "repo", served_artifact, deploy), log_file=tmp_path / "log"
    )
    srv.start(timeout=240)
    try:
        with pytest.raises(ClientError, match="stream needs the decoupled model"):
            generate_http(srv.endpoints.http, MODEL, "the river flows", max_tokens=4, stream=True, timeout=60)
        out = generate_http(srv.endpoints.http, MODEL, "the river flows", max_tokens=4, timeout=60)
        assert out.finish_reason == "length" and out.text
    finally:
        assert srv.stop() == 0


def test_the_llm_api_request_names_work_too(server, offline):
    """A client written for TensorRT-LLM's LLM-API model (sampling_param_*, `streaming`) gets the same
    answers from the native model; giving both names of one setting is refused."""
    e = server.endpoints
    prompt = PROMPTS[0]
    out = generate_http(e.http, MODEL, prompt, sampling_param_max_tokens=12, return_finish_reason=True)
    assert out.text == offline[prompt] and out.finish_reason in ("length", "stop")
    streamed = generate_grpc(e.grpc, MODEL, prompt, sampling_param_max_tokens=12, sampling_param_seed=3)
    assert streamed.text == offline[prompt]  # greedy: the seed changes nothing
    with pytest.raises(ClientError, match="give max_tokens or sampling_param_max_tokens, not both"):
        generate_http(e.http, MODEL, prompt, max_tokens=4, sampling_param_max_tokens=4)
    # `streaming` alone: the gRPC client sent `stream` beside it, which the model refused as both names
    streamed = generate_grpc(e.grpc, MODEL, prompt, sampling_param_max_tokens=12, streaming=True)
    assert streamed.text == offline[prompt] and len(streamed.pieces) > 1
    # sampling_param_seed is a UINT64: a seed above 2**63 samples (it was refused as out of range)
    kw = dict(sampling_param_max_tokens=6, sampling_param_temperature=1.0, end_id=-1)
    top = generate_grpc(e.grpc, MODEL, prompt, sampling_param_seed=2**64 - 1, **kw)
    again = generate_http(e.http, MODEL, prompt, sampling_param_seed=2**64 - 1, **kw)
    assert top.finish_reason == "length" and top.text == again.text


def test_http_generate_of_a_streaming_request_is_a_client_error_and_one_stream_name_is_sent(server, offline):
    """`streaming` (the LLM-API name) on plain `generate`: the model sends several responses, which
    Triton answers with status 200 and {"error": ...}; the client read `text_output` from it (a KeyError
    traceback). And `stream=True` with `streaming=True` sent both names, which the model refuses."""
    e = server.endpoints
    prompt = PROMPTS[0]
    with pytest.raises(ClientError, match="response"):
        generate_http(e.http, MODEL, prompt, sampling_param_max_tokens=12, streaming=True)
    out = generate_http(e.http, MODEL, prompt, stream=True, streaming=True, sampling_param_max_tokens=12)
    assert out.text == offline[prompt] and len(out.pieces) > 1


@pytest.mark.parametrize("final_on_last", [True, False], ids=["flag-on-last-piece", "empty-final-response"])
def test_the_grpc_client_ends_on_the_final_flag_of_a_model_without_finish_reason(server, final_on_last):
    """TensorRT-LLM's ensemble has no `finish_reason` output: the client must end each request on
    Triton's final-response flag, whether it rides on the last piece or comes as an empty response
    (it used to crash reading the missing output), and a second request on the same server works."""
    params = {"max_tokens": 8} if final_on_last else {}
    for _ in range(2):
        out = generate_grpc(server.endpoints.grpc, ECHO_MODEL, "the river flows", timeout=60, **params)
        assert out.text == "the river flows " and out.pieces == ["the ", "river ", "flows "]
        assert out.finish_reason == ""


def test_a_request_cancelled_while_queued_never_runs(served_artifact, tmp_path):
    """A client that cancels (gRPC stop_stream) while its request waits for a batch slot: the model
    noticed only at the request's first output, so it was admitted and prefilled first; now it leaves
    the queue and never runs, and the server still stops cleanly."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    deploy = DeployConfig(**{**DEPLOY, "max_batch_size": 1, "max_seq_len": 1024})
    steps = tmp_path / "steps.jsonl"
    repo = write_native_repository(tmp_path / "repo", served_artifact, deploy, step_log=steps)
    srv = Server(repo, log_file=tmp_path / "log")
    srv.start(timeout=240)

    def stream(prompt: str, max_tokens: int) -> tuple[Any, queue.Queue]:
        values = {"text_input": np.array([prompt.encode()], dtype=np.object_),
                  "max_tokens": np.array([max_tokens], dtype=np.int32), "stream": np.array([True]),
                  "end_id": np.array([-1], dtype=np.int32)}  # fmt: skip
        inputs = []
        for name, value in values.items():
            inputs.append(
                grpcclient.InferInput(name, [1], {"O": "BYTES", "i": "INT32", "b": "BOOL"}[value.dtype.kind])
            )
            inputs[-1].set_data_from_numpy(value)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(srv.endpoints.grpc)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        return client, responses

    try:
        first, first_out = stream("once upon", 1000)  # holds the one batch slot for a while
        first_out.get(timeout=60)
        queued, _ = stream("in the year", 8)
        time.sleep(0.5)
        queued.stop_stream(cancel_requests=True)
        queued.close()
        time.sleep(0.5)
        first.stop_stream(cancel_requests=True)
        first.close()
        time.sleep(1.0)
        records = [json.loads(line) for line in steps.read_text().splitlines()]
        assert len({rid for r in records for rid in r["joined"]}) == 1, "the cancelled request ran"
    finally:
        assert srv.stop() == 0


def test_an_artifact_and_repository_under_awkward_paths_are_served(
    served_artifact, offline, tmp_path, monkeypatch
):
    """The python backend starts its stub with `bash -c "exec <stub> <repository>/<model>/1/model.py ..."`,
    unquoted: a space, quote or `#` in the repository's path (or TMPDIR's, where the backends were copied)
    broke the command line and tritonserver waited, never ready. The stub's interpreter is isolated in the
    C locale, its file-system encoding ASCII: an artifact under a directory named with é / 中 was "no such
    model directory" and its step log could not be written."""
    import os
    import shutil
    import tempfile

    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    root = tmp_path / "a b\"c'd\\e #f $g ${h} é中"
    (root / "tmp").mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(root / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    artifact, steps = shutil.copytree(served_artifact, root / "int4"), root / "steps é.jsonl"
    repo = write_native_repository(root / "repo", artifact, DeployConfig(**DEPLOY), step_log=steps)
    srv = Server(repo, log_file=root / "tritonserver.log")
    srv.start(timeout=90)
    try:
        out = generate_grpc(srv.endpoints.grpc, MODEL, PROMPTS[0], max_tokens=12, stream=True, timeout=60)
        assert out.text == offline[PROMPTS[0]] and out.finish_reason == "length"
        assert steps.read_text(encoding="utf-8").strip()
    finally:
        assert srv.stop() == 0
    links = [link for p in Path("/tmp").glob("trtcompress-paths-*") for link in p.iterdir()]
    assert not [p for p in links if str(artifact) in os.readlink(p)], "links left behind"


def test_clients_that_go_away_mid_stream_free_their_kv_blocks(server, offline):
    """Streams abandoned mid-generation (gRPC stop_stream with cancel, an HTTP generate_stream whose
    connection is dropped) while each holds a KV block: the model is told, their blocks and batch slots
    come back, and later requests get their whole answers (measured: 800 such abandons left the cache
    and the model's request tables empty and the stub's RSS flat)."""
    import queue
    import socket

    import tritonclient.grpc as grpcclient

    from trtcompress.client import _grpc_inputs

    e = server.endpoints
    prompt = "a small village near the mountains, " * 3  # 55 tokens: past 64 after a few pieces
    params = dict(max_tokens=DEPLOY["max_seq_len"] - 55, end_id=-1, stream=True)
    total_blocks = DEPLOY["max_tokens_in_paged_kv_cache"] // 64
    before = len(server.step_log.read_text().splitlines()) if server.step_log.exists() else 0

    def grpc_abandon() -> None:
        pieces: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(e.grpc)
        client.start_stream(callback=lambda result, error: pieces.put(error))
        client.async_stream_infer(MODEL, _grpc_inputs(prompt, params))
        for _ in range(15):
            assert pieces.get(timeout=120) is None
        client.stop_stream(cancel_requests=True)
        client.close()

    def http_abandon() -> None:
        host, port = e.http.rsplit(":", 1)
        body = json.dumps({"text_input": prompt, **params}).encode()
        head = (
            f"POST /v2/models/{MODEL}/generate_stream HTTP/1.1\r\nHost: {e.http}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=120) as s:
            s.sendall(head.encode() + body)
            received = b""
            while received.count(b"data:") < 15:  # then the connection is dropped
                chunk = s.recv(65536)
                assert chunk, received
                received += chunk

    errors = []

    def run(fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in [grpc_abandon, http_abandon] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    # one request at a time from here: once the abandoned ones are gone, a request runs alone over the
    # whole pool (a leaked sequence would still run beside it, or hold its blocks)
    deadline = time.monotonic() + 120
    while True:
        start = len(server.step_log.read_text().splitlines())
        out = generate_grpc(e.grpc, MODEL, PROMPTS[0], max_tokens=12, timeout=120)
        assert out.text == offline[PROMPTS[0]] and out.finish_reason in ("length", "stop")
        steps = [json.loads(line) for line in server.step_log.read_text().splitlines()[start:]]
        if all(s["batch_size"] == 1 and s["free_blocks"] == total_blocks for s in steps):
            break
        assert time.monotonic() < deadline, steps[-1]
        time.sleep(0.5)
    abandoned = [json.loads(line) for line in server.step_log.read_text().splitlines()[before:start]]
    assert min(s["free_blocks"] for s in abandoned) < total_blocks  # they did hold blocks
    assert generate_http(e.http, MODEL, PROMPTS[1], max_tokens=12, timeout=120).text == offline[PROMPTS[1]]


def test_stopping_the_server_ends_the_streams_in_flight_and_unloads_cleanly(served_artifact, tmp_path):
    """SIGTERM / Ctrl-C to `serve` with streams in flight: tritonserver does not unload a model while one
    of its streams is open, so it gave up after its exit timeout (10 s), nothing unloaded, and crashed
    (exit code -11, HTTP streams) or hung until `serve` killed it after 30 s (-9, gRPC streams, as
    here), and the clients saw only a closed socket. Now the model ends them first: each client gets an
    error naming the stop, and tritonserver unloads the model and exits with code 0."""
    from trtcompress.runtime.config import DeployConfig
    from trtcompress.serve import Server
    from trtcompress.triton_models.native import write_native_repository

    # one batch slot: the requests behind the first wait their turn (in flight, whatever the speed)
    deploy = DeployConfig(**{**DEPLOY, "max_batch_size": 1, "max_seq_len": 1024})
    repo = write_native_repository(tmp_path / "repo", served_artifact, deploy)
    srv = Server(repo, log_file=tmp_path / "log")
    srv.start(timeout=240)
    e = srv.endpoints
    started = threading.Semaphore(0)
    outcomes: dict[str, Any] = {}

    def client(name: str) -> None:
        pieces: list[str] = []

        def on_piece(piece: str) -> None:
            if not pieces:
                started.release()
            pieces.append(piece)

        try:
            out = generate_grpc(e.grpc, MODEL, "once upon", stream=True, timeout=300, on_piece=on_piece,
                                max_tokens=1000, end_id=-1)  # fmt: skip
            outcomes[name] = out.finish_reason
        except BaseException as exc:
            outcomes[name] = exc

    names = ["grpc-1", "grpc-2", "grpc-3"]
    threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in names]
    try:
        for thread in threads:
            thread.start()
        assert started.acquire(timeout=120), f"no request streamed: {outcomes}"
    finally:
        code = srv.stop()
    for thread in threads:
        thread.join(timeout=60)
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert "successfully unloaded 'tensorrt_llm'" in (tmp_path / "log").read_text()
    assert sorted(outcomes) == names
    stopped = [o for o in outcomes.values() if isinstance(o, ClientError) and "server is stopping" in str(o)]
    assert stopped and all(o in stopped or o == "length" for o in outcomes.values()), outcomes
