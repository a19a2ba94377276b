"""The clients' handling of what a server sends: text split inside a character, server-sent events as the
spec writes them, errors with several lines, a whole-answer timeout, the address forms `serve` prints.
A real tritonserver where it can send it; a socket server where only a misbehaving one would (it stands
in for the network only: the parsing under test is the client's)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import run_cli
from trtcompress.client import ClientError, generate_grpc, generate_http

from .conftest import BYTES_MODEL, ECHO_MODEL

TEXT = "café 中 😀 ok"


@contextmanager
def raw_http_server(writes: list[tuple[float, bytes]]) -> Iterator[str]:
    """Answers one request with `writes`, each after its delay (separate writes arrive as separate reads),
    then closes the connection. Yields its HOST:PORT."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:  # the whole request read: a close with unread bytes would reset the connection
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(head.lower().partition(b"content-length:")[2].split()[0])
                while len(body) < length:
                    body += conn.recv(65536)
                for delay, data in writes:
                    time.sleep(delay)
                    try:
                        conn.sendall(data)
                    except OSError:  # the client gave up
                        return

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        thread.join(10)


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
EVENT = b'data: {"text_output": "a"}\n\n'


def test_http_stream_reads_server_sent_events_as_the_spec_writes_them():
    """A comment (keep-alive), CRLF line ends, `data:` without its space, `event:` / `id:` fields, one
    event's JSON over two `data:` lines (was a ValueError: "not a Triton HTTP endpoint"), an event
    split across reads, a character split across events (was a UnicodeDecodeError: "not a Triton
    endpoint"), and a last event with no blank line after it."""
    writes = [
        (0, SSE_HEAD + b": keep-alive\r\n\r\n"),
        (0.05, b'data:{"text_output": "caf\xc3"}\r\n\r\n'),
        (0.05, b'event: message\nid: 2\ndata: {"text_output":\ndata:  "\xa9 \xe4"}\n\n'),
        (0.05, b'data: {"text_output": "\xb8\xad \xf0\x9f'),
        (0.05, b'"}\n\n: ping\n\ndata: {"text_output": "\x98\x80 ok", "finish_reason": "stop"}'),
    ]
    with raw_http_server(writes) as url:
        pieces = []
        out = generate_http(url, "m", "hi", stream=True, timeout=10, on_piece=pieces.append)
    assert out.text == TEXT and "".join(pieces) == TEXT and out.finish_reason == "stop"
    assert len(out.pieces) == len(out.times) == 4


@pytest.mark.parametrize(
    ("writes", "match"),
    [
        # the server went away mid-answer: the chunked body ends without its last chunk (the part
        # that came was returned as the whole answer)
        ([(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(EVENT), EVENT))],
         "closed before the answer was complete"),
        # an error event after some output, whose message has several lines: one line
        ([(0, SSE_HEAD + b'data: {"text_output": "a"}\n\ndata: {"error": "it broke\\nAt:\\n  x"}\n\n')],
         r"^it broke At: x$"),
    ],
)  # fmt: skip
def test_http_stream_errors_are_one_line_client_errors(writes, match):
    with raw_http_server(writes) as url, pytest.raises(ClientError, match=match):
        generate_http(url, "m", "hi", stream=True, timeout=10)


def test_http_timeout_bounds_the_whole_answer():
    """`--timeout` is the whole answer's: a server that keeps the stream alive with a comment every
    0.1 s (or a piece) was never timed out over HTTP (the socket's timeout is per read)."""
    writes = [(0, SSE_HEAD)] + [(0.1, b": keep-alive\n\n")] * 40
    with raw_http_server(writes) as url:
        t0 = time.perf_counter()
        with pytest.raises(ClientError, match=r"no final response within 0\.5 s"):
            generate_http(url, "m", "hi", stream=True, timeout=0.5)
        assert time.perf_counter() - t0 < 2.0


def test_http_urls_with_a_scheme_and_a_trailing_slash():
    """`serve` prints its HTTP address as http://HOST:PORT: `--url http://...` was a lookup of a host
    named "http" ("Name or service not known"), a trailing slash a 404."""
    body = b'{"text_output": "ok", "finish_reason": "length"}'
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for form in ("http://{}", "http://{}/", "HTTP://{}/", "{}/"):
        with raw_http_server([(0, reply)]) as url:
            assert generate_http(form.format(url), "m", "hi", timeout=10).text == "ok"
    with pytest.raises(ClientError, match="unknown scheme 'ftp'"):
        generate_http("ftp://127.0.0.1:1", "m", "hi", timeout=10)


def test_no_server_at_the_address_says_to_start_one():
    """`generate` with no server running printed gRPC's "Connection refused" and nothing about what to
    do; both clients now ask whether a server runs there and name `trtcompress serve`."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
    # gRPC reports it from the call or through the stream's callback, whichever comes first: both paths
    for fn in [generate_grpc] * 20 + [generate_http]:
        with pytest.raises(ClientError, match=r"(?i)connection refused; is a server running there .*serve"):
            fn(url, "m", "hi", timeout=10)


def test_streams_that_split_characters_or_send_invalid_bytes_decode_as_text(server):
    """A real tritonserver relaying a model that streams one byte per response: each gRPC piece was
    decoded alone (a UnicodeDecodeError traceback at the first split character); over HTTP, Triton
    writes the raw bytes into the events' JSON (the same, reported as "not a Triton HTTP endpoint")."""
    e = server.endpoints
    for out in (
        generate_grpc(e.grpc, BYTES_MODEL, TEXT, timeout=60),
        generate_http(e.http, BYTES_MODEL, TEXT, stream=True, timeout=60),
    ):
        assert out.text == TEXT and len(out.pieces) == len(TEXT.encode())
    assert generate_grpc(e.grpc, BYTES_MODEL, b"ok \xff\xc3", timeout=60).text == "ok \ufffd\ufffd"


def test_the_cli_against_a_real_server_url_forms_and_one_line_errors(server):
    """The addresses `serve` prints, with scheme and trailing slash, work for both transports; an error
    after streamed output (a Python model's error has several lines) is one line on stderr, exit 2,
    after the output's own line."""
    e = server.endpoints
    ok = run_cli("generate", TEXT, "--url", f"http://{e.http}/", "--http", "--model", BYTES_MODEL)
    assert ok.returncode == 0 and ok.stdout == TEXT + "\n", ok.stderr
    ok = run_cli("generate", TEXT, "--url", f"grpc://{e.grpc}/", "--model", BYTES_MODEL)
    assert ok.returncode == 0 and ok.stdout == TEXT + "\n", ok.stderr
    for transport in ([], ["--http", "--url", e.http]):
        url = [] if transport else ["--url", e.grpc]
        bad = run_cli("generate", "ab\nfail", *url, *transport, "--model", BYTES_MODEL)
        assert bad.returncode == 2 and bad.stdout == "ab\n", bad.stderr
        assert bad.stderr.splitlines() == ["error: it broke At: model.py(12): execute"], bad.stderr


def test_a_prompt_with_undecodable_bytes_is_refused_by_the_server_not_a_traceback(server):
    """A command-line argument's invalid UTF-8 reaches Python as surrogates: encoding it for gRPC was a
    UnicodeEncodeError traceback; now its bytes go as given and the server refuses them (as over HTTP)."""
    with pytest.raises(ClientError, match="not valid UTF-8"):
        generate_grpc(server.endpoints.grpc, "tensorrt_llm", "caf\udcff", max_tokens=2, timeout=60)
    with pytest.raises(ClientError, match="the prompt is not UTF-8 text"):
        generate_grpc(server.endpoints.grpc, "tensorrt_llm", "a\ud800", max_tokens=2, timeout=60)


DEAD_PROXY = "http://127.0.0.1:9"  # nothing listens on the discard port: a proxy that refuses everything
PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy")


@pytest.fixture
def dead_proxy(monkeypatch):
    """The environment of a user whose proxy serves the outside world (here one that refuses everything),
    with no no_proxy exception for this machine."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return lambda name, value=DEAD_PROXY: monkeypatch.setenv(name, value)


@pytest.mark.parametrize("variable", ["http_proxy", "https_proxy", "grpc_proxy"])
def test_grpc_reaches_a_loopback_server_past_the_environments_proxy(server, dead_proxy, variable):
    """gRPC's C core sends every channel through the proxy in grpc_proxy / https_proxy / http_proxy unless
    no_proxy names the host, loopback included: with http_proxy set, `generate` against the server `serve`
    started on 127.0.0.1 failed with "failed to connect to all addresses ... ipv4:127.0.0.1:9" and asked
    whether a server ran there. A proxy cannot reach this machine's loopback: those hosts go direct. HTTP
    (http.client) never used the environment's proxy."""
    dead_proxy(variable)
    port = server.endpoints.grpc_port
    for url in (f"127.0.0.1:{port}", f"localhost:{port}", f"grpc://127.0.0.1:{port}/"):
        out = generate_grpc(url, ECHO_MODEL, "a b c", max_tokens=3, timeout=60)
        assert out.text == "a b c ", url
    assert generate_http(server.endpoints.http, ECHO_MODEL, "a b", stream=True, timeout=60).text == "a b "
    ok = run_cli("generate", "a b", "--url", server.endpoints.grpc, "--model", ECHO_MODEL)
    assert ok.returncode == 0 and ok.stdout == "a b \n", ok.stderr


def test_load_workers_reach_a_loopback_server_past_the_environments_proxy(server, dead_proxy):
    """`bench serve`'s load workers made their own gRPC clients: every request an error under http_proxy."""
    from trtcompress.bench_serve import load_level

    dead_proxy("http_proxy")
    level = load_level(server.endpoints.grpc, "tensorrt_llm", ["a b"], 2, 2, output_tokens=2)
    assert level["requests"] == 2 and level["errors"] == 0, level


def test_other_hosts_keep_the_proxy_and_its_refusal_names_it(dead_proxy):
    """A non-loopback host still goes through the environment's proxy (gRPC's own rule); where the proxy
    refuses, the error names it instead of asking whether a server runs at the host (whose address the
    message did not even hold: gRPC reported the proxy's)."""
    from trtcompress.client import _grpc_proxy

    dead_proxy("https_proxy")
    with pytest.raises(ClientError, match=r"through the proxy in https_proxy=http://127\.0\.0\.1:9 "):
        generate_grpc("192.0.2.1:8001", "m", "hi", timeout=20)  # (TEST-NET-1: never reached)
    assert _grpc_proxy("192.0.2.1") == ("https_proxy", DEAD_PROXY)
    assert all(_grpc_proxy(host) is None for host in ("::1", "127.0.0.2", "LocalHost", "a.localhost"))
    dead_proxy("no_proxy", ".example.org,10.1.2.3,192.168.0.0/16")
    assert all(_grpc_proxy(host) is None for host in ("a.example.org", "10.1.2.3", "192.168.7.1"))
    assert _grpc_proxy("example.com") == ("https_proxy", DEAD_PROXY)
