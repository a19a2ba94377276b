"""Clients of the text model (native or TensorRT-LLM LLM-API repositories): gRPC streaming with
`tritonclient`, and Triton's HTTP `generate` / `generate_stream` endpoints.

Both return a `Completion` (text, finish reason, and per-piece arrival times, from which the load
benchmark takes time to first token and inter-token latency). A request the server refuses raises
`ClientError` with the server's message.
"""

from __future__ import annotations

import codecs
import contextlib
import http.client
import ipaddress
import json
import os
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtcompress.errors import TrtcompressError, one_line

NO_SERVER_HINT = "; is a server running there (`trtcompress serve ARTIFACT` prints its endpoints)?"


def _no_server_hint(message: str) -> str:
    return message + NO_SERVER_HINT if "connection refused" in message.lower() else message


class ClientError(TrtcompressError):
    """The server answered the request with an error (its message on one line: a Python model's error
    comes with the lines of its traceback, which the CLI printed as they were)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=1000))


def _address(url: str, schemes: tuple[str, ...]) -> tuple[bool, str]:
    """`url` as (TLS, host:port): `serve` prints its HTTP address as http://HOST:PORT, which the clients
    took for a host named "http"; a trailing slash made the port unreadable (gRPC) or every path a 404
    (HTTP). `schemes`: the plain scheme names, then the TLS ones."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep:
        return False, url.strip().rstrip("/")
    if scheme.lower() not in schemes:
        raise ClientError(f"{url}: unknown scheme {scheme!r}; give HOST:PORT or {schemes[0]}://HOST:PORT")
    return scheme.lower() in schemes[len(schemes) // 2 :], rest.rstrip("/")


def _host(address: str) -> str:
    """The host of HOST:PORT, [IPV6]:PORT or a bare HOST."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    return host if sep and ":" not in host and port.isdigit() else address


def _is_loopback(host: str) -> bool:
    """localhost (and its subdomains, RFC 6761) or a loopback address (127.0.0.0/8, ::1)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


# gRPC's C core (grpcio, tritonclient.grpc) takes its HTTP CONNECT proxy from the first of these that is set
# (lowercase only), and skips it for the hosts in the first of no_grpc_proxy / no_proxy that is set.
GRPC_PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy")
GRPC_NO_PROXY_VARS = ("no_grpc_proxy", "no_proxy")


def _grpc_proxy(host: str) -> tuple[str, str] | None:
    """(variable, proxy) gRPC sends a channel to `host` through, or None (as near as we can tell: the no_proxy
    match here is by name, domain suffix or address range; a loopback host never goes through one, see
    grpc_client)."""
    if _is_loopback(host):
        return None
    proxy = next(((name, os.environ[name]) for name in GRPC_PROXY_VARS if os.environ.get(name)), None)
    skip = next((os.environ[name] for name in GRPC_NO_PROXY_VARS if os.environ.get(name)), "")
    if skip.strip() == "*":
        return None
    for entry in skip.lower().split(","):
        entry = entry.strip().lstrip("*").lstrip(".")
        if entry and (host.lower() == entry or host.lower().endswith("." + entry)):
            return None
        with contextlib.suppress(ValueError):  # an address range (gRPC takes CIDR entries too)
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return None
    return proxy


def grpc_client(url: str) -> Any:
    """A tritonclient gRPC client of `url` (HOST:PORT or grpc[s]://HOST:PORT). gRPC's C core sends every
    channel through the proxy in grpc_proxy / https_proxy / http_proxy unless no_grpc_proxy / no_proxy names
    the host, loopback addresses included, so `http_proxy` set for the outside world made every request to
    the server `trtcompress serve` started on 127.0.0.1 fail ("failed to connect to all addresses", naming
    the proxy's address). A proxy cannot reach this machine's loopback, so loopback hosts are connected to
    directly (as Go's ProxyFromEnvironment and gRPC-Go do); other hosts keep the environment's proxy."""
    import tritonclient.grpc as grpcclient

    tls, address = _address(url, ("grpc", "http", "grpcs", "https"))
    if not _is_loopback(_host(address)):
        return grpcclient.InferenceServerClient(address, ssl=tls)
    # channel_args replaces tritonclient's own channel options: the same ones, plus the proxy switch
    keepalive = grpcclient.KeepAliveOptions()
    args = [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.enable_http_proxy", 0),
    ]
    return grpcclient.InferenceServerClient(address, ssl=tls, channel_args=args)


def _grpc_hint(url: str, message: str) -> str:
    """`message` with what to check where nothing answered: the proxy gRPC went through, if any (its
    refusal named the proxy's address, not the server's), else whether a server runs there."""
    if "connection refused" not in message.lower() and "failed to connect" not in message.lower():
        return message
    with contextlib.suppress(ClientError):
        if proxy := _grpc_proxy(_host(_address(url, ("grpc", "http", "grpcs", "https"))[1])):
            return (
                f"{message}; gRPC connects to that host through the proxy in {proxy[0]}={proxy[1]} (name "
                "the host in no_grpc_proxy or no_proxy to connect directly)"
            )
    return _no_server_hint(message)


def _utf8_decoder() -> Any:
    """Decodes a stream's pieces as one text: a character split across two pieces is whole in the
    second (each piece decoded alone was a UnicodeDecodeError traceback), invalid bytes are U+FFFD."""
    return codecs.getincrementaldecoder("utf-8")("replace")


@dataclass
class Completion:
    text: str = ""
    finish_reason: str = ""
    pieces: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds after the request was sent, per piece
    start: float = 0.0

    @property
    def ttft(self) -> float | None:
        return self.times[0] if self.times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


PARAM_TYPES = {
    "max_tokens": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "temperature": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "top_p": ("FP32", np.float32),
    "seed": ("INT64", np.int64),
    "end_id": ("INT32", np.int32),
    # the same settings under TensorRT-LLM's LLM-API names (the native model takes either)
    "streaming": ("BOOL", np.bool_),
    "sampling_param_max_tokens": ("INT32", np.int32),
    "sampling_param_temperature": ("FP32", np.float32),
    "sampling_param_top_k": ("INT32", np.int32),
    "sampling_param_top_p": ("FP32", np.float32),
    "sampling_param_seed": ("UINT64", np.uint64),
    "return_finish_reason": ("BOOL", np.bool_),
}


def _grpc_inputs(prompt: str | bytes, params: dict[str, Any]) -> list[Any]:
    import tritonclient.grpc as grpcclient

    try:  # (a command-line argument's undecodable bytes come as surrogates: sent as they were)
        raw = prompt if isinstance(prompt, bytes) else prompt.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ClientError(f"the prompt is not UTF-8 text ({exc.reason} at character {exc.start})") from None
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([raw], dtype=np.object_))
    inputs = [text]
    for name, value in params.items():
        if value is None:
            continue
        if name in ("stop", "sampling_param_stop"):
            stops = [value] if isinstance(value, str) else list(value)
            t = grpcclient.InferInput(name, [len(stops)], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in stops], dtype=np.object_))
            inputs.append(t)
            continue
        dtype, np_dtype = PARAM_TYPES.get(name, ("INT32", np.int32))  # unknown names: the server refuses
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([_checked(name, value, dtype, np_dtype)], dtype=np_dtype))
        inputs.append(t)
    return inputs


def _checked(name: str, value: Any, dtype: str, np_dtype: Any) -> Any:
    """`value`, if the input's type holds it exactly. numpy would truncate 1.5 to 1 and wrap 2**32 + 4 to
    4 (the server then generates a different number of tokens than asked), or raise a traceback that
    names no parameter."""
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
        ok = ok and info.min <= int(value) <= info.max
    elif np_dtype is np.bool_:
        ok = isinstance(value, bool | np.bool_)
    else:
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not ok:
        raise ClientError(f"{name}={value!r}: not a value of its {dtype} input")
    return value


def generate_grpc(
    url: str,
    model: str,
    prompt: str | bytes,
    stream: bool = True,
    timeout: float = 600.0,
    on_piece: Callable[[str], None] | None = None,
    client: Any = None,
    **params: Any,
) -> Completion:
    """One request over a gRPC bidirectional stream (the decoupled model's transport)."""
    from tritonclient.utils import InferenceServerException

    # `streaming` (the LLM-API name) replaces `stream`: the model refuses a request with both
    streaming = {} if params.get("streaming") is not None else {"stream": stream}
    inputs = _grpc_inputs(prompt, {**params, **streaming})  # (a bad value fails before any connection)
    own = client is None
    if own:
        client = grpc_client(url)
    decoder = _utf8_decoder()
    results: queue.Queue = queue.Queue()
    done = Completion()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error, time.perf_counter())))
        done.start = time.perf_counter()
        try:  # the final flag ends a request even where the model has no finish_reason output
            client.async_stream_infer(
                model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
            )
        except InferenceServerException as exc:  # no server there, a stream that broke
            message = exc.message()
            with contextlib.suppress(queue.Empty):  # the stream's callback has the reason
                _, error, _ = results.get(timeout=2)
                message = error.message() if hasattr(error, "message") else str(error)
            raise ClientError(f"{url}: {_grpc_hint(url, message)}") from None
        deadline = done.start + timeout
        while True:
            try:
                result, error, t = results.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise ClientError(f"no final response within {timeout:g} s") from None
            if error is not None:  # (also where no server answered: the stream reports it here or above)
                finished = True  # ended by the server: a cancel now kept tritonserver from unloading it
                message = str(error.message() if hasattr(error, "message") else error)
                hinted = _grpc_hint(url, message)
                raise ClientError(message if hinted == message else f"{url}: {hinted}")
            text, reason = result.as_numpy("text_output"), result.as_numpy("finish_reason")
            if text is not None:  # (an empty final response has no outputs)
                piece = decoder.decode(text.reshape(-1)[0])
                done.pieces.append(piece)
                done.times.append(t - done.start)
                if on_piece:
                    on_piece(piece)
            reason = reason.reshape(-1)[0].decode("utf-8") if reason is not None else ""
            done.finish_reason = reason or done.finish_reason
            final = result.get_response().parameters.get("triton_final_response")
            if reason or (final is not None and final.bool_param):
                finished = True
                break
        if tail := decoder.decode(b"", final=True):  # a character the stream left unfinished
            done.pieces.append(tail)
            done.times.append(time.perf_counter() - done.start)
            if on_piece:
                on_piece(tail)
    finally:
        # A request left unfinished (timeout, Ctrl-C) is cancelled: a plain stop_stream() waits until
        # the server has sent every response, however long past the timeout that is.
        client.stop_stream(cancel_requests=not finished)
        if own:
            client.close()
    done.text = "".join(done.pieces)
    return done


def _sse_events(lines: Iterable[bytes]) -> Iterator[bytes]:
    """The data of each server-sent event: its `data:` lines joined by newlines, up to a blank line (or
    the end of the stream); comments (`:` keep-alives) and other fields skipped."""
    data: list[bytes] = []
    for line in lines:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
            data = []
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value.removeprefix(b" "))
    if data:
        yield b"\n".join(data)


def _json(data: bytes) -> dict:
    """A JSON object whose strings may hold raw bytes that are not UTF-8 (Triton writes a BYTES output
    into its JSON as it is): those come back as surrogates, restored by `_raw`."""
    value = json.loads(data.decode("utf-8", "surrogateescape"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def generate_http(
    url: str,
    model: str,
    prompt: str,
    stream: bool = False,
    timeout: float = 600.0,
    on_piece: Callable[[str], None] | None = None,
    **params: Any,
) -> Completion:
    """One request to `/v2/models/MODEL/generate` (or `generate_stream`, server-sent events). `timeout`
    bounds the whole answer (each read waits at most what is left of it), not each read alone: a server
    streaming a piece a second never timed out."""
    body = {"text_input": prompt, **{k: v for k, v in params.items() if v is not None}}
    for name, value in body.items():  # Triton would wrap an INT32 of 2**32 + 4 to 4 without a word
        if name in PARAM_TYPES:
            _checked(name, value, *PARAM_TYPES[name])
    if stream and body.get("streaming") is None:  # `streaming` (the LLM-API name) replaces `stream`:
        body["stream"] = True  # the native model refuses a request with both (as generate_grpc does)
    endpoint = "generate_stream" if stream else "generate"
    tls, host = _address(url, ("http", "https"))
    done = Completion(start=time.perf_counter())
    deadline = done.start + timeout

    def left() -> float:
        if (seconds := deadline - time.perf_counter()) <= 0:
            raise ClientError(f"no final response within {timeout:g} s")
        return seconds

    connection = (http.client.HTTPSConnection if tls else http.client.HTTPConnection)(host, timeout=timeout)
    decoder = _utf8_decoder()
    try:
        connection.request(
            "POST",
            f"/v2/models/{model}/{endpoint}",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        sock = connection.sock  # (the response keeps using it after getresponse() lets it go)
        sock.settimeout(left())
        response = connection.getresponse()
        if response.status >= 400:
            message = response.read().decode(errors="replace").strip()
            with contextlib.suppress(ValueError, KeyError, TypeError):  # JSON, or a server-sent event's
                message = json.loads(message.removeprefix("data:"))["error"]
            raise ClientError(f"HTTP {response.status}: {message}")
        if not stream:
            data = _json(response.read())
            if "error" in data:  # Triton answers some failures with 200 (several responses to generate)
                raise ClientError(data["error"])
            text = decoder.decode(_raw(data.get("text_output", "")), final=True)
            done.pieces, done.times = [text], [time.perf_counter() - done.start]
            done.finish_reason = data.get("finish_reason", "")
        else:

            def lines() -> Iterator[bytes]:
                while line := response.readline():
                    yield line
                    sock.settimeout(left())

            for event in _sse_events(lines()):
                data = _json(event)
                if "error" in data:
                    raise ClientError(data["error"])
                if "text_output" in data:
                    piece = decoder.decode(_raw(data["text_output"]))
                    done.pieces.append(piece)
                    done.times.append(time.perf_counter() - done.start)
                    if on_piece:
                        on_piece(piece)
                done.finish_reason = data.get("finish_reason") or done.finish_reason
            if response.chunked and response.chunk_left is not None:  # (None: its last chunk came)
                raise http.client.IncompleteRead(b"")  # a partial answer read as a whole one
            if tail := decoder.decode(b"", final=True):  # a character the stream left unfinished
                done.pieces.append(tail)
                done.times.append(time.perf_counter() - done.start)
                if on_piece:
                    on_piece(tail)
    except TimeoutError:  # (connecting, or a read that waited for what was left of the timeout)
        raise ClientError(f"{url}: no final response within {timeout:g} s") from None
    except http.client.IncompleteRead:  # the server went away mid-answer
        raise ClientError(f"{url}: the connection closed before the answer was complete") from None
    except (http.client.HTTPException, ValueError) as exc:  # a gRPC port, or not Triton: no HTTP/JSON
        raise ClientError(
            f"{url}: not a Triton HTTP endpoint ({type(exc).__name__}); is it the gRPC port?"
        ) from None
    except OSError as exc:  # no server there, a connection that broke
        hint = NO_SERVER_HINT if isinstance(exc, ConnectionRefusedError) else ""
        raise ClientError(f"{url}: {exc.strerror or exc}{hint}") from None
    finally:
        connection.close()
    done.text = "".join(done.pieces)
    return done
