"""`trtcompress serve` / `generate` / `repo` as a user runs them: real processes, real tritonserver."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli


def test_serve_generate_and_sigterm(served_artifact, tmp_path):
    temp = tmp_path / "temp"  # where serve's temporary directories go: gone after a clean stop
    temp.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", TMPDIR=str(temp))
    cmd = [sys.executable, "-m", "trtcompress", "serve", str(served_artifact), "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--deploy", "max_batch_size=4",
           "--deploy", "max_seq_len=256", "--log-file", str(tmp_path / "triton.log")]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, lines = None, []
        deadline = time.monotonic() + 240
        while ready is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("ready:"):
                ready = line.split()
        assert ready is not None, "".join(lines)
        grpc_url, http_url = ready[2], ready[4].removeprefix("http://")
        assert grpc_url.startswith("127.0.0.1:") and http_url.startswith("127.0.0.1:")
        out_grpc = run_cli("generate", "the river flows", "--url", grpc_url, "--max-tokens", "6", "--json")
        out_http = run_cli(
            "generate", "the river flows", "--url", http_url, "--http", "--max-tokens", "6", "--json"
        )
        assert out_grpc.returncode == 0, out_grpc.stderr
        assert out_http.returncode == 0, out_http.stderr
        a, b = json.loads(out_grpc.stdout), json.loads(out_http.stdout)
        assert a["text_output"] == b["text_output"] and a["finish_reason"] == "length"
        bad = run_cli("generate", "the river", "--url", grpc_url, "--max-tokens", "0")
        assert bad.returncode != 0 and "max_tokens must be a positive integer" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, rest
    assert "tritonserver stopped (exit code 0)" in rest
    assert not [p.name for p in temp.iterdir() if p.name.startswith("trtcompress-")]


def test_repo_command_writes_validated_repositories(served_artifact, tiny_model_dir, tmp_path):
    for kind in ("native", "trtllm", "llmapi"):
        source = tiny_model_dir if kind == "llmapi" else served_artifact  # the LLM API loads HF checkpoints
        out = run_cli("repo", str(source), "-o", str(tmp_path / kind), "--kind", kind,
                      "--deploy", "max_batch_size=8")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "tensorrt_llm" in out.stdout
    bad = run_cli("repo", str(served_artifact), "-o", str(tmp_path / "x"), "--deploy", "max_batch_sise=8")
    assert bad.returncode != 0 and "max_batch_sise" in bad.stderr


def test_a_trtllm_repository_without_its_engine_here_is_written_with_a_warning(served_artifact, tmp_path):
    """`repo --kind trtllm` of an artifact built without `--engine` (the README's own serving block)
    silently pointed at a missing ARTIFACT/engine; it still writes the repository (the engine may be
    built elsewhere) but says so, and says nothing once the engine directory holds an engine."""
    out = run_cli("repo", str(served_artifact), "-o", str(tmp_path / "a"), "--kind", "trtllm")
    assert out.returncode == 0, out.stderr
    assert f"warning: {served_artifact / 'engine'} holds no TensorRT-LLM engine" in out.stderr
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text("{}")
    out = run_cli("repo", str(served_artifact), "-o", str(tmp_path / "b"), "--kind", "trtllm",
                  "--engine-dir", str(engine))  # fmt: skip
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr


def test_an_artifact_that_failed_its_gates_is_served_only_when_allowed(tiny_model_dir, tmp_path):
    """`build` exits 3 and keeps the artifact marked failed_gates; `serve` and `repo` served and packaged
    it like any other, so `build ...; serve ...` in a script deployed what the gates rejected."""
    from tests.conftest import TINY_EVAL
    from trtcompress.builders.pipeline import build
    from trtcompress.recipe import load_recipe, with_overrides

    recipe = with_overrides(load_recipe("int3-g128-rtn").model_copy(update={"eval": TINY_EVAL}),
                            [("gates", ["gsm8k_kl <= 0.0000001"])])  # fmt: skip
    artifact = tmp_path / "failed"
    assert not build(str(tiny_model_dir), recipe, artifact).gates_passed
    for command in (
        ["serve", str(artifact), "--timeout", "5"],
        ["repo", str(artifact), "-o", str(tmp_path / "r")],
    ):
        out = run_cli(*command)
        assert out.returncode != 0 and "failed its gates at build time (gsm8k_kl <= 1e-07" in out.stderr
        assert "--allow-failed-gates" in out.stderr and not (tmp_path / "r").exists()
    out = run_cli("repo", str(artifact), "-o", str(tmp_path / "r"), "--allow-failed-gates")
    assert out.returncode == 0, out.stderr


def test_repo_refuses_an_existing_output_and_force_replaces_repositories_only(served_artifact, tmp_path):
    out = tmp_path / "repo"
    assert run_cli("repo", str(served_artifact), "-o", str(out), "--kind", "trtllm").returncode == 0
    again = run_cli("repo", str(served_artifact), "-o", str(out))
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {out} already exists; pass --force to replace it"
    forced = run_cli("repo", str(served_artifact), "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    # the trtllm kind's ensemble and pre/postprocessing models are gone, not mixed with the native model
    assert sorted(p.name for p in out.iterdir()) == ["tensorrt_llm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no partial or old directory left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    refused = run_cli("repo", str(served_artifact), "-o", str(other), "--force")
    assert refused.returncode == 2 and "is not a Triton model repository" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    missing = tmp_path / "nothere"
    cases = [
        (("repo", str(missing), "-o", str(tmp_path / "r")), "artifact or model directory"),
        (("serve", str(missing)), "artifact, model directory or model repository"),
    ]
    for args, what in cases:
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.strip() == f"error: {missing}: no such {what}"


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("max_batch_sise=8", "unknown key deploy.max_batch_sise (did you mean 'max_batch_size'?)"),
        ("max_batch_size=-1", "error: deploy.max_batch_size: Input should be greater than or equal to 1"),
        ("cpu_gemm=mkl", "error: deploy.cpu_gemm: Input should be 'auto', 'onednn' or 'blas'"),
        ("max_batch_size", "expected KEY=VALUE"),
    ],
)
def test_deploy_overrides_fail_in_one_line(served_artifact, tmp_path, assignment, message):
    bad = run_cli("repo", str(served_artifact), "-o", str(tmp_path / "x"), "--deploy", assignment)
    assert bad.returncode == 2 and message in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "x").exists()


def test_deploy_overrides_read_values_as_set_does():
    """`--deploy KEY=VALUE` is `--set deploy.KEY=VALUE` (README): text fields take the text as typed
    (YAML made `model_name=on` a bool and `engine_dir=2024` an int, both refused), numbers are YAML 1.2."""
    from trtcompress.cli_serve import _deploy

    assignments = ("model_name=on", "engine_dir=2024", "max_batch_size=8", "kv_decompressed_cache_mb=1e2")
    deploy = _deploy(None, assignments)
    assert (deploy.model_name, deploy.engine_dir) == ("on", "2024")
    assert (deploy.max_batch_size, deploy.kv_decompressed_cache_mb) == (8, 100.0)
    assert _deploy(None, ("engine_dir=2024", "engine_dir=null")).engine_dir is None


def test_serve_refuses_a_repo_dir_holding_other_models_before_starting(served_artifact, tmp_path):
    """--repo-dir into a directory with other models used to serve them beside the generated one; and a
    refused serve leaves no temporary directory behind."""
    temp = tmp_path / "temp"
    temp.mkdir()
    taken = tmp_path / "taken"
    (taken / "other_model").mkdir(parents=True)
    bad = run_cli("serve", str(served_artifact), "--repo-dir", str(taken), env={"TMPDIR": str(temp)})
    assert bad.returncode == 2 and "exists and is not empty" in bad.stderr, bad.stderr
    assert list(taken.iterdir()) == [taken / "other_model"] and list(temp.iterdir()) == []


def test_a_failed_serve_with_its_own_repo_dir_and_log_leaves_no_empty_temporary_directory(
    served_artifact, tmp_path
):
    """With --repo-dir and --log-file nothing goes to serve's temporary directory, yet it was made, and a
    failed start (here: a log that cannot be written) left it behind, empty (it stays after a failure
    only to keep the default log). A ready repository with --log-file likewise."""
    temp = tmp_path / "temp"
    temp.mkdir()
    log = ["--log-file", str(tmp_path / "missing" / "tritonserver.log")]
    for target in ([str(served_artifact), "--repo-dir", str(tmp_path / "repo")], [str(tmp_path / "repo")]):
        bad = run_cli("serve", *target, *log, env={"TMPDIR": str(temp)})
        assert bad.returncode != 0 and "cannot write tritonserver's log" in bad.stderr, bad.stderr
        assert list(temp.iterdir()) == []
    assert (tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").is_file()


def test_bench_serve_writes_results(served_artifact, tmp_path):
    out = run_cli("bench", "serve", str(served_artifact), "--concurrency", "1,4", "--requests", "8",
                  "--prompt-tokens", "12", "--output-tokens", "6", "--no-hf-baseline",
                  "-o", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "serve_load.json").read_text())
    assert (tmp_path / "serve_load.png").stat().st_size > 0
    one, four = result["levels"]
    assert one["errors"] == four["errors"] == 0 and four["requests"] == 8
    assert one["runtime"]["max_batch_size"] == 1 and four["runtime"]["max_batch_size"] > 1
    assert four["output_tokens_per_s"] > 0 and four["ttft_p50_s"] is not None


def test_serve_warns_about_a_passive_openmp_wait_policy() -> None:
    from trtcompress.cli_serve import _environment_warning

    assert "unset it" in _environment_warning({"OMP_WAIT_POLICY": " passive "})
    assert _environment_warning({"OMP_WAIT_POLICY": "ACTIVE"}) is None
    assert _environment_warning({}) is None


def test_clients_and_server_report_unreachable_and_busy_ports_as_errors(tmp_path):
    """No server on the port: a ClientError (it was a traceback) over gRPC and HTTP. A port another
    server listens on: refused before tritonserver starts (that server answered its readiness probe)."""
    import socket

    from trtcompress.client import ClientError, generate_grpc, generate_http
    from trtcompress.serve import ServeError, Server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClientError):
            generate_grpc("127.0.0.1:1", "m", "hi", timeout=10)
        with pytest.raises(ClientError, match="refused"):
            generate_http("127.0.0.1:1", "m", "hi", timeout=10)
        with pytest.raises(ServeError, match=f"HTTP port {port} is in use"):
            Server(tmp_path, http_port=port).start(timeout=10)


def test_http_client_reports_a_port_that_does_not_speak_http_as_an_error():
    """`generate --http` against the gRPC port (the default URL without --http's own) read an HTTP/2
    frame as a status line: an http.client.BadStatusLine traceback; a non-JSON answer a ValueError one.
    Now a ClientError naming the address."""
    import socket
    import threading

    from trtcompress.client import ClientError, generate_http

    for reply in (
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nnotjson",
    ):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()

            def answer(listener=listener, reply=reply):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

            thread = threading.Thread(target=answer, daemon=True)
            thread.start()
            url = f"127.0.0.1:{listener.getsockname()[1]}"
            with pytest.raises(ClientError, match=re.escape(url)):
                generate_http(url, "m", "hi", timeout=10)
            thread.join(10)


def test_generate_http_defaults_to_the_http_port():
    """`serve` binds HTTP to 8000 and gRPC to 8001; `generate --http` without --url went to 8001."""
    from click.testing import CliRunner

    from trtcompress.cli_serve import generate

    calls = []

    def fake(url, *args, **kwargs):
        calls.append(url)
        raise SystemExit(0)

    import trtcompress.client as client

    for flag, expected in ((["--http"], "127.0.0.1:8000"), ([], "127.0.0.1:8001")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(client, "generate_http", fake)
            mp.setattr(client, "generate_grpc", fake)
            CliRunner().invoke(generate, ["hi", *flag])
        assert calls.pop() == expected


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"max_tokens": 2**32 + 4}, "max_tokens=4294967300: not a value of its INT32 input"),  # was 4
        ({"max_tokens": 1.5}, "max_tokens=1.5"),  # was 1
        ({"top_k": 2**31}, "top_k"),  # was -2**31
        ({"seed": 2**63}, "seed"),  # was an OverflowError traceback
        ({"sampling_param_seed": -1}, "sampling_param_seed"),  # was 2**64 - 1
        ({"stream": "no"}, "stream='no'"),
        ({"temperature": "hot"}, "temperature"),  # was a ValueError traceback
        ({"bogus": "x"}, "bogus"),
    ],
)
def test_the_clients_refuse_values_their_input_types_cannot_hold(params, match):
    """numpy (gRPC) and Triton's JSON parser (HTTP) wrapped or truncated such values without a word, so
    the server generated a different number of tokens than asked; now a ClientError naming the value,
    before any connection (no server listens on port 1)."""
    from trtcompress.client import ClientError, generate_grpc, generate_http

    with pytest.raises(ClientError, match=re.escape(match)):
        generate_grpc("127.0.0.1:1", "m", "hi", timeout=10, **params)
    if "bogus" not in params and "stream" not in params:  # (unknown names: the server refuses them)
        with pytest.raises(ClientError, match=re.escape(match)):
            generate_http("127.0.0.1:1", "m", "hi", timeout=10, **params)


def test_bench_summary_uses_the_concurrency_one_level_and_survives_failed_levels():
    from trtcompress.bench_serve import summarize

    def level(c, tps, errors=0):
        return {"concurrency": c, "output_tokens_per_s": tps, "errors": errors}

    s = summarize([level(4, 1000.0), level(1, 400.0)], [{"batch": 16, "tokens_per_s": 500.0}])
    assert s["vs_one_at_a_time"] == 2.5 and s["best_concurrency"] == 4 and s["vs_hf_batch16"] == 2.0
    failed = summarize([level(1, 0.0, errors=4), level(2, 0.0, errors=4)], [])
    assert (
        failed["best_tokens_per_s"] is None and failed["vs_one_at_a_time"] is None and failed["errors"] == 8
    )


def test_server_start_errors_come_before_anything_runs(tmp_path):
    """An unwritable log fails before tritonserver is located or started; a readiness wait ends when
    Ctrl-C / SIGTERM set its event; a failed load's error lines lead the log excerpt."""
    import threading

    from trtcompress.serve import ServeError, Server

    with pytest.raises(ServeError, match="cannot write tritonserver's log"):
        Server(tmp_path, log_file=tmp_path / "missing" / "x.log").start(timeout=5)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ServeError, match="interrupted before tritonserver was ready"):
        Server(tmp_path).wait_ready(timeout=30, cancel=cancel)
    log = tmp_path / "log"
    log.write_text("E1128 model 'm' failed to load: boom\\n" + "I1128 options\\n" * 40)
    assert "boom" in Server(tmp_path, log_file=log)._log_tail()


def test_a_grpc_client_timeout_cancels_the_request_instead_of_waiting_for_it(tmp_path):
    """The client gave up at its timeout but stop_stream() then waited for the server's last response
    (a 1 s timeout returned after the whole 4 s generation); the unfinished request is now cancelled."""
    from tests.triton_models.conftest import ECHO_CONFIG, ECHO_MODEL, ECHO_MODEL_PY
    from trtcompress.client import ClientError, generate_grpc
    from trtcompress.serve import Server

    slow = tmp_path / "repo" / "slow"
    (slow / "1").mkdir(parents=True)
    (slow / "config.pbtxt").write_text(ECHO_CONFIG.replace(ECHO_MODEL, "slow"))
    model_py = ECHO_MODEL_PY.replace("import numpy", "import time\nimport numpy")
    loop = "for i, word in enumerate(words):\n"
    (slow / "1" / "model.py").write_text(model_py.replace(loop, loop + " " * 16 + "time.sleep(0.5)\n"))
    with Server(tmp_path / "repo", log_file=tmp_path / "tritonserver.log") as server:
        t0 = time.perf_counter()
        with pytest.raises(ClientError, match="no final response within 1 s"):
            generate_grpc(server.endpoints.grpc, "slow", "a b c d e f g h i j k l m n o p", timeout=1)
        assert time.perf_counter() - t0 < 6.0  # the whole generation takes 8 s; wide margin for slow CI
        url = server.endpoints.grpc
        cli = run_cli("generate", "a b", "--url", url, "--model", "slow", "--timeout", "0.2")
        assert cli.returncode == 2 and "no final response within 0.2 s" in cli.stderr, cli.stderr
        assert server.stop() == 0  # the cancelled requests do not keep the model from unloading


@pytest.mark.parametrize("args", [("--concurrency", "1,a"), ("--concurrency", ","), ("--concurrency", "0,4"),
                                  ("--requests", "0"), ("--output-tokens", "0")])  # fmt: skip
def test_bench_serve_refuses_bad_sweep_settings_before_loading_anything(args, tmp_path):
    """`--concurrency 1,a` was a ValueError traceback; an empty list failed at max([]) after the model and
    the HF baselines had run; zero requests / tokens measured nothing (every request refused)."""
    out = run_cli("bench", "serve", str(tmp_path / "missing-model"), *args, "-o", str(tmp_path / "out"))
    assert out.returncode == 2 and f"Invalid value for '{args[0]}'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_a_failed_start_reports_this_runs_errors_not_those_of_a_reused_log(tmp_path):
    """tritonserver appends to its log: the error lines of an earlier run (bench serve's
    OUT/tritonserver.log, a reused --log-file) came first in the excerpt and could hide this run's."""
    from trtcompress.serve import ServeError, Server

    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "m"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text("raise RuntimeError('this run broke')\n")
    log = tmp_path / "tritonserver.log"
    log.write_text("E0101 model 'old' failed to load: an earlier run broke\n" * 20)
    with pytest.raises(ServeError, match="this run broke") as err:
        Server(tmp_path / "repo", log_file=log).start(timeout=120)
    assert "an earlier run broke" not in str(err.value)


def _python_model(repo, name, initialize=None, config_extra=""):
    """The echo model as `name`, its `initialize` running the given statements."""
    from tests.triton_models.conftest import ECHO_CONFIG, ECHO_MODEL, ECHO_MODEL_PY

    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(ECHO_CONFIG.replace(ECHO_MODEL, name) + config_extra)
    model_py = "import os\nimport time\n" + ECHO_MODEL_PY
    if initialize is not None:
        model_py += f"\n    def initialize(self, args):\n        {initialize}\n"
    (repo / name / "1" / "model.py").write_text(model_py)


def _group(pgid):
    """The processes of a process group (tritonserver's: its stubs)."""
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()


def _no_shm_left(server):
    from pathlib import Path

    return not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_a_stub_that_cannot_start_fails_the_start_at_once(tmp_path):
    """The python backend starts its stub with `bash -c "[source <env>/bin/activate &&] exec <stub> ..."`
    and waits for it without a timeout: a stub that never started (a broken execution environment, a
    stub or libpython that cannot load) left tritonserver loading forever and `serve` waiting out its
    whole --timeout (600 s). The exited, unreaped stub is the sign: the error names the model and quotes
    what the shell said."""
    from trtcompress.serve import ServeError, Server

    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "activate").write_text("echo 'activate: cannot set up this environment' >&2; exit 3\n")
    param = f'parameters: {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{env}" }} }}\n'
    _python_model(tmp_path / "repo", "m", config_extra=param)
    server = Server(tmp_path / "repo", log_file=tmp_path / "tritonserver.log")
    t0 = time.monotonic()
    with pytest.raises(ServeError, match="model 'm' can never become ready") as err:
        server.start(timeout=40)
    assert time.monotonic() - t0 < 20, "waited for the timeout"
    assert "activate: cannot set up this environment" in str(err.value)
    assert server.proc.poll() is not None and _no_shm_left(server)


def test_a_failed_model_fails_the_start_without_waiting_for_the_others_to_load(tmp_path):
    """With --exit-on-error tritonserver exits when a model failed to load, but only once every other
    model has loaded (the TensorRT-LLM model: minutes); its "failed to load" line now ends the wait, and
    the other model's stub, still loading, does not outlive tritonserver."""
    from trtcompress.serve import ServeError, Server

    _python_model(tmp_path / "repo", "broken", "raise RuntimeError('this model broke')")
    _python_model(tmp_path / "repo", "slow", "time.sleep(40)")
    server = Server(tmp_path / "repo", log_file=tmp_path / "tritonserver.log")
    t0 = time.monotonic()
    with pytest.raises(ServeError, match="model 'broken' failed to load") as err:
        server.start(timeout=60)
    assert time.monotonic() - t0 < 20, "waited for the slow model"
    assert "this model broke" in str(err.value)
    deadline = time.monotonic() + 10  # killed; gone once reaped
    while (left := _group(server.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left and _no_shm_left(server)


def test_a_slowly_loading_model_is_waited_for(tmp_path):
    """Failing fast must not cut a healthy load short: a model (and a process it starts and reaps)
    taking its time is waited for, and serves."""
    from trtcompress.client import generate_grpc
    from trtcompress.serve import Server

    _python_model(tmp_path / "repo", "slow", "os.system('true'); time.sleep(6)")
    server = Server(tmp_path / "repo", log_file=tmp_path / "tritonserver.log")
    t0 = time.monotonic()
    with server:
        assert time.monotonic() - t0 >= 6
        assert not _no_shm_left(server)  # the stub's regions carry this server's prefix
        out = generate_grpc(server.endpoints.grpc, "slow", "a b", max_tokens=2, timeout=30)
        assert out.text.split() == ["a", "b"]
        assert server.stop() == 0
    assert _no_shm_left(server)


def test_bench_percentiles_interpolate_so_p50_is_the_median():
    """`_pct` rounded the rank to one sample: p50 of 8 or 32 TTFTs was the upper middle value (round-half-
    to-even), of 6 the lower one; numpy's linear interpolation makes p50 the median at any count."""
    import statistics

    import numpy as np

    from trtcompress.bench_serve import _pct

    for n in (1, 2, 4, 6, 8, 31, 32):
        values = [float((7 * i) % 11) + 0.1 * i for i in range(n)]
        assert _pct(values, 50) == pytest.approx(statistics.median(values))
        for q in (0, 25, 90, 99, 100):
            assert _pct(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert _pct([], 50) is None


def test_serve_refuses_bad_ports_and_unbindable_hosts_in_one_line(tmp_path):
    """A port beyond 65535 (or negative) was an OverflowError traceback from the port check; a host
    that cannot be bound (unknown name, an address no interface has) was reported as "the HTTP port
    N is in use", N a port nobody held. Now: click refuses the port, Server names the host."""
    from trtcompress.serve import ServeError, Server

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model directory: serve gets as far as the port check
    (tmp_path / "tmp").mkdir()
    for port in ("70000", "-5"):
        out = run_cli("serve", str(model), "--http-port", port)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        assert "0<=x<=65535" in out.stderr
    with pytest.raises(ServeError, match="HTTP port 70000 is not a port number"):
        Server(tmp_path, http_port=70000).start(timeout=5)
    with pytest.raises(ServeError, match=re.escape("cannot bind to host 'no-such-host.invalid'")):
        Server(tmp_path, host="no-such-host.invalid").start(timeout=5)
    with pytest.raises(ServeError, match=r"cannot bind to '192\.0\.2\.1' port \d+: ") as info:
        Server(tmp_path, host="192.0.2.1").start(timeout=5)  # TEST-NET-1: no interface has it
    assert "in use" not in str(info.value)
    # an IPv6 host was a traceback ("Port could not be cast to integer value as ':1:8000'")
    with pytest.raises(ServeError, match="IPv6 addresses are not supported"):
        Server(tmp_path, host="::1")
    out = run_cli("serve", str(model), "--host", "::1", env={"TMPDIR": str(tmp_path / "tmp")})
    assert out.returncode == 2 and "Traceback" not in out.stderr and "IPv6" in out.stderr, out.stderr
    assert not any((tmp_path / "tmp").iterdir())  # refused before a repository was written


def _tritonservers_over(repo) -> list[int]:
    """Pids of tritonserver processes serving `repo` (read from /proc)."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "tritonserver" in cmdline and f"--model-repository={repo}" in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("command", ["serve", "bench", "serve-killed"])
def test_sighup_and_sigterm_stop_tritonserver_on_the_way_out(served_artifact, tmp_path, command):
    """tritonserver runs in its own session (Ctrl-C on the terminal reaches `serve` only): `serve` killed
    by SIGHUP (the terminal closed) and `bench serve` by SIGTERM (`timeout`, a job scheduler) ended at
    once and left it running, holding the ports. Now both stop it on the way out; and `serve` killed by
    SIGKILL (nothing runs on the way out) takes it along too: the kernel sends it SIGTERM."""
    repo = tmp_path / ("repo" if command.startswith("serve") else "bench") / "repo"
    if command.startswith("serve"):
        args = ["serve", str(served_artifact), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                "--repo-dir", str(repo)]  # fmt: skip
        sig = signal.SIGHUP if command == "serve" else signal.SIGKILL
    else:
        args = ["bench", "serve", str(served_artifact), "--no-hf-baseline", "--concurrency", "1",
                "--requests", "400", "--prompt-tokens", "8", "--output-tokens", "32",
                "-o", str(repo.parent)]  # fmt: skip
        sig = signal.SIGTERM
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "trtcompress", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        if command.startswith("serve"):  # ready
            while proc.poll() is None and not proc.stderr.readline().startswith("ready:"):
                pass
        else:  # the warm-up request has run: the load is starting
            while not (repo.parent / "steps.jsonl").exists() and time.monotonic() < deadline:
                time.sleep(0.25)
            time.sleep(2)
        assert proc.poll() is None and _tritonservers_over(repo), "tritonserver never started"
        proc.send_signal(sig)
        proc.wait(timeout=90)
        deadline = time.monotonic() + 60  # (tritonserver unloads its models before it exits)
        while _tritonservers_over(repo) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _tritonservers_over(repo) == [], proc.stderr.read()
        if command == "serve":
            assert proc.returncode == 0 and "tritonserver stopped (exit code 0)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _tritonservers_over(repo):
            os.kill(pid, signal.SIGKILL)


def test_a_tilde_in_a_path_is_the_home_directory(served_artifact, tmp_path):
    """The shell leaves `--output=~/r` (and a quoted "~/art") as typed: the repository went to ./~/r
    while the CLI said "wrote ~/r", which reads as one in the home directory."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(served_artifact, home / "art")
    out = run_cli("repo", "~/art", "--output=~/r", cwd=tmp_path, env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert (home / "r" / "tensorrt_llm" / "config.pbtxt").is_file() and not (tmp_path / "~").exists()
    assert f"wrote {home / 'r'}" in out.stdout
    shown = run_cli("inspect", "~/art", "--no-verify", cwd=tmp_path, env={"HOME": str(home)})
    assert shown.returncode == 0, shown.stderr


def test_serving_a_trtllm_repository_without_its_backend_says_which_image_has_it(served_artifact, tmp_path):
    """The bundled tritonserver has the python backend only: `serve` of a trtllm repository quoted
    "unable to find backend library for backend 'tensorrtllm'" and left the user to work out the rest."""
    from trtcompress.builders.engine import NGC_IMAGE

    repo = tmp_path / "repo"
    assert run_cli("repo", str(served_artifact), "-o", str(repo), "--kind", "trtllm").returncode == 0
    out = run_cli("serve", str(repo), "--timeout", "120", "--http-port", "0", "--grpc-port", "0",
                  "--metrics-port", "0")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        f"this tritonserver has no tensorrtllm backend: serve a trtllm repository in NGC's {NGC_IMAGE}"
        in (out.stderr)
    )
