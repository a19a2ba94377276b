"""The Triton python-backend model of the `native` repository (imported by the generated `1/model.py`).

`initialize` loads the artifact into an `Engine` and starts its `EngineLoop` (the background thread that
runs in-flight batching); `execute` validates each request and submits it, and the engine's outputs are
sent back through the request's response sender as they are produced: one response per text delta
when `stream` is true, one response with the whole text otherwise, the last one flagged final. A
request the runtime refuses gets a Triton error response; the model keeps serving the others.

Only importable inside tritonserver's python stub (`triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np

from trtcompress.runtime.config import DeployConfig
from trtcompress.runtime.sampling import RequestError, SamplingParams
from trtcompress.runtime.sequence import RequestOutput
from trtcompress.serve import STOP_FILE_ENV
from trtcompress.triton_models.stub_paths import StubPaths

# TensorRT-LLM's LLM-API model names the same inputs sampling_param_* and `streaming`; the native model
# takes either name (not both), so a client written for that model works here unchanged
UPSTREAM_NAMES = {
    "max_tokens": "sampling_param_max_tokens",
    "temperature": "sampling_param_temperature",
    "top_k": "sampling_param_top_k",
    "top_p": "sampling_param_top_p",
    "seed": "sampling_param_seed",
    "stop": "sampling_param_stop",
    "stream": "streaming",
}
INPUTS = (
    "text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "stop", "end_id",
    *UPSTREAM_NAMES.values(), "return_finish_reason",
)  # fmt: skip


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # provided by the python backend stub

    return pb_utils


def _scalar(request: Any, name: str) -> Any:
    tensor = _pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {array.size}")
    return array[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return str(value)


def resolve_sampling(
    temperature: float | None, top_k: int | None, top_p: float | None
) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) for SamplingParams from a request's optional inputs, by TensorRT-LLM's
    rule (LLM-API `SamplingParams.params_imply_greedy_decoding`; its C++ executor's temperature defaults
    to 1 too): greedy when none is given, or temperature == 0, top_k == 1 or top_p == 0; otherwise a
    missing temperature is 1. (A request of top_k = 50 alone was decoded greedily, and top_p = 0, greedy
    there, was refused.) Out-of-range values stay as given, for SamplingParams.check to refuse."""
    greedy = (
        (temperature is None and top_k is None and top_p is None) or 0 in (temperature, top_p) or top_k == 1
    )
    if greedy:  # (a negative or NaN temperature is kept: refused, not silently greedy)
        temperature = 0.0 if temperature is None or temperature >= 0 else temperature
        top_p = 1.0 if top_p is None or top_p == 0 else top_p
    elif temperature is None:
        temperature = 1.0
    return temperature, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p


def parse_request(
    request: Any, default_max_tokens: int, decoupled: bool = True
) -> tuple[str, SamplingParams, bool]:
    """(prompt, sampling parameters, stream) from a Triton request; RequestError names what is wrong.
    Streaming needs the decoupled transaction policy (a non-decoupled model sends one response)."""
    params_json = request.parameters() if hasattr(request, "parameters") else "{}"
    extra = set(json.loads(params_json or "{}"))
    if extra:  # HTTP generate turns JSON keys that are not inputs into request parameters
        raise RequestError(f"unknown parameter(s) {sorted(extra)}; the model accepts {', '.join(INPUTS)}")
    raw = _scalar(request, "text_input")
    if raw is None:
        raise RequestError("text_input is required")
    prompt = _text(raw, "text_input")
    if not prompt:
        raise RequestError("text_input (the prompt) is empty")

    def name_of(name: str) -> str:
        """`name`, or its LLM-API name where the request used that one (both: an error)."""
        upstream = UPSTREAM_NAMES.get(name)
        if upstream is None or _pb().get_input_tensor_by_name(request, upstream) is None:
            return name
        if _pb().get_input_tensor_by_name(request, name) is not None:
            raise RequestError(f"give {name} or {upstream}, not both")
        return upstream

    def get(name: str, cast: Any, default: Any) -> Any:
        value = _scalar(request, name_of(name))
        return default if value is None else cast(value)

    stop_name = name_of("stop")
    stop_tensor = _pb().get_input_tensor_by_name(request, stop_name)
    stop = (
        () if stop_tensor is None else tuple(_text(s, stop_name) for s in stop_tensor.as_numpy().reshape(-1))
    )
    temperature, top_k, top_p = resolve_sampling(
        get("temperature", float, None), get("top_k", int, None), get("top_p", float, None)
    )
    params = SamplingParams(
        max_tokens=get("max_tokens", int, default_max_tokens),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=get("seed", int, None),
        stop=stop,
        end_id=get("end_id", int, None),
    )
    params.check()
    stream = bool(get("stream", bool, False))
    if stream and not decoupled:
        raise RequestError(
            "stream needs the decoupled model (deploy.decoupled: true); this one sends one response "
            "per request"
        )
    return prompt, params, stream


class _Responder:
    """The engine-loop callback of one request: turns RequestOutputs into Triton responses."""

    def __init__(
        self, sender: Any, stream: bool, prefix: str, stopping: threading.Event | None = None
    ) -> None:
        self.sender, self.stream, self.prefix = sender, stream, prefix
        self.stopping = stopping
        self.lock = threading.Lock()

    def __call__(self, out: RequestOutput) -> None:
        pb = _pb()
        with self.lock:
            reason = out.finish_reason or ""
            message = reason if reason.startswith("error") else None
            if out.finish_reason == "cancelled" and self.stopping is not None and self.stopping.is_set():
                message = f"the server is stopping: request cancelled after {len(out.token_ids)} tokens"
            if message is not None:
                error = pb.InferenceResponse(error=pb.TritonError(message))
                self.sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            if self.stream:
                if not out.delta_text and not out.finished:
                    return
                text = out.delta_text
            elif out.finished:
                text = self.prefix + out.text
            else:
                return
            response = pb.InferenceResponse(
                output_tensors=[
                    pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                    pb.Tensor(
                        "finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_)
                    ),
                ]
            )
            self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.finished else 0)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        from trtcompress.runtime.engine import Engine, EngineLoop

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.deploy = DeployConfig.model_validate_json(params["deploy"])
        self.default_max_tokens = int(params.get("default_max_tokens") or 16)
        self.logger = _pb().Logger
        self.paths = StubPaths()  # the stub's file-system encoding is ASCII: é / 中 go through links
        artifact, step_log = self.paths(params["artifact"]), self.paths(params.get("step_log", "")) or None
        try:
            self.loop = EngineLoop(  # built on the loop's thread: the one thread that runs torch (EngineLoop)
                lambda: Engine.from_path(artifact, self.deploy, step_log=step_log, step_history=1000),
                on_error=lambda exc: self.logger.log_error(f"engine: {self.paths.restore(exc)!r}"),
            )
        except Exception as exc:  # (its message names the artifact as given, not as linked)
            self.paths.restore(exc)
            self.paths.close()
            raise
        # `trtcompress serve` creates this file before it stops tritonserver: the requests in flight then
        # end (an error response each), since tritonserver does not unload a model while one of its
        # streams is open: it gave up after its exit timeout with a crash or a hang, nothing unloaded
        self.stopping, self._closed = threading.Event(), threading.Event()
        stop_file = os.environ.get(STOP_FILE_ENV)
        if stop_file:
            threading.Thread(
                target=self._watch_stop_file, args=(stop_file,), name="trtcompress-stop-file", daemon=True
            ).start()
        engine = self.loop.engine
        self.logger.log_info(
            f"trtcompress native runtime: {params['artifact']} (max_batch_size {self.deploy.max_batch_size}, "
            f"max_num_tokens {self.deploy.max_num_tokens}, policy {self.deploy.batch_scheduler_policy}, "
            f"GEMMs {engine.model.gemm_backend} tile {engine.model.gemm_tile})"
        )

    def _watch_stop_file(self, path: str) -> None:
        while not self._closed.wait(0.2):
            if os.path.exists(path):
                self.stopping.set()
                return

    def execute(self, requests: list[Any]) -> None:
        pb = _pb()
        for request in requests:
            sender = request.get_response_sender()
            if self.stopping.is_set():
                error = pb.InferenceResponse(error=pb.TritonError("the server is stopping"))
                sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            try:
                prompt, params, stream = parse_request(
                    request, self.default_max_tokens, self.deploy.decoupled
                )
                prefix = "" if self.deploy.exclude_input_in_output else prompt
                responder = _Responder(sender, stream, prefix, self.stopping)
                # the loop polls the client's cancellation (a request still queued or prefilling
                # included) and stops generating for a client that went away, or once the server stops
                client_gone = getattr(sender, "is_cancelled", None)
                self.loop.submit(
                    prompt, params, responder,
                    is_cancelled=lambda gone=client_gone: self.stopping.is_set() or bool(gone and gone()),
                )  # fmt: skip
            except (RequestError, ValueError, TypeError, OverflowError) as exc:
                error = pb.InferenceResponse(error=pb.TritonError(f"invalid request: {exc}"))
                sender.send(error, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def finalize(self) -> None:
        self._closed.set()
        self.loop.shutdown()
        self.paths.close()
