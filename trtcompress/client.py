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
import json
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
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    # `streaming` (the LLM-API name) replaces `stream`: the model refuses a request with both
    streaming = {} if params.get("streaming") is not None else {"stream": stream}
    inputs = _grpc_inputs(prompt, {**params, **streaming})  # (a bad value fails before any connection)
    own = client is None
    if own:
        tls, address = _address(url, ("grpc", "http", "grpcs", "https"))
        client = grpcclient.InferenceServerClient(address, ssl=tls)
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
            raise ClientError(f"{url}: {_no_server_hint(message)}") from None
        deadline = done.start + timeout
        while True:
            try:
                result, error, t = results.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise ClientError(f"no final response within {timeout:g} s") from None
            if error is not None:  # (also where no server answered: the stream reports it here or above)
                finished = True  # ended by the server: a cancel now kept tritonserver from unloading it
                message = str(error.message() if hasattr(error, "message") else error)
                hinted = _no_server_hint(message)
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
