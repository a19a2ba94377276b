"""The native model's request parsing, without a server: a stand-in for `triton_python_backend_utils`
hands `parse_request` the input tensors a client sent (fast; test_serving.py drives the real server)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from trtcompress.runtime.sampling import RequestError

PROMPT = {"text_input": np.array([b"hello"], dtype=np.object_)}


class _Tensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Request:
    def __init__(self, inputs: dict[str, np.ndarray]) -> None:
        self.inputs = inputs

    def parameters(self) -> str:
        return "{}"


@pytest.fixture()
def parse(monkeypatch):
    pb = types.ModuleType("triton_python_backend_utils")
    pb.get_input_tensor_by_name = lambda request, name: (
        _Tensor(request.inputs[name]) if name in request.inputs else None
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    from trtcompress.triton_models.native_model import parse_request

    return lambda **inputs: parse_request(_Request({**PROMPT, **inputs}), 16)[1]


def _f32(v: float) -> np.ndarray:
    return np.array([v], dtype=np.float32)


def _i32(v: int) -> np.ndarray:
    return np.array([v], dtype=np.int32)


@pytest.mark.parametrize("prefix", ["", "sampling_param_"])
def test_top_k_or_top_p_without_a_temperature_samples_at_1_as_tensorrt_llm_does(parse, prefix):
    """TensorRT-LLM samples at temperature 1 when a request sets top_k or top_p alone (LLM-API
    `params_imply_greedy_decoding`; the C++ executor's temperature defaults to 1): the native model
    decoded such a request greedily, ignoring what it asked for."""
    assert parse(**{f"{prefix}top_k": _i32(50)}).temperature == 1.0
    params = parse(**{f"{prefix}top_p": _f32(0.9)})
    assert params.temperature == 1.0 and params.top_p == pytest.approx(0.9)
    params = parse(**{f"{prefix}temperature": _f32(0.5), f"{prefix}top_k": _i32(5)})
    assert (params.temperature, params.top_k) == (0.5, 5)
    assert parse().greedy and parse(**{f"{prefix}temperature": _f32(0.0), f"{prefix}top_k": _i32(50)}).greedy


@pytest.mark.parametrize("prefix", ["", "sampling_param_"])
def test_top_p_0_and_top_k_1_are_greedy_as_in_tensorrt_llm(parse, prefix):
    """top_p = 0 is greedy to TensorRT-LLM's LLM API (it was refused: "top_p must be in (0, 1]");
    top_k = 1 is greedy there too (sampling among tied top tokens here)."""
    for inputs in ({"top_p": _f32(0.0)}, {"top_k": _i32(1)}, {"temperature": _f32(0.8), "top_p": _f32(0.0)}):
        params = parse(**{prefix + k: v for k, v in inputs.items()})
        assert params.greedy and params.top_p == 1.0, inputs


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"top_k": _i32(-1)}, "top_k must be an integer >= 0"),
        ({"sampling_param_top_k": _i32(-5), "sampling_param_temperature": _f32(1.0)}, "top_k must be"),
        ({"top_p": _f32(1.5)}, "top_p must be in"),
        ({"top_p": _f32(-0.1)}, "top_p must be in"),
        ({"temperature": _f32(1.0), "top_p": _f32(1.0000001)}, "top_p must be in"),
        ({"temperature": _f32(-0.5)}, "temperature must be >= 0"),
        ({"temperature": _f32(-0.5), "top_p": _f32(0.0)}, "temperature must be >= 0"),  # not made greedy
        ({"temperature": _f32(-1.0), "top_k": _i32(1)}, "temperature must be >= 0"),
        ({"temperature": _f32(float("nan"))}, "temperature must be a number"),
        ({"temperature": _f32(float("inf"))}, "temperature must be a number"),
        ({"seed": np.array([-1], dtype=np.int64)}, r"seed must be an integer in \[0, 2\*\*64\)"),
        ({"end_id": _i32(-2)}, "end_id must be a token id"),
        ({"max_tokens": _i32(0)}, "max_tokens must be a positive integer"),
        ({"stop": np.array([b"ok", b""], dtype=np.object_)}, "stop strings must be non-empty"),
        ({"top_k": _i32(5), "sampling_param_top_k": _i32(5)}, "give top_k or sampling_param_top_k"),
    ],
)
def test_out_of_range_values_are_refused_by_name(parse, inputs, match):
    with pytest.raises(RequestError, match=match):
        parse(**inputs)


def test_seeds_over_the_whole_uint64_range_are_kept_exactly(parse):
    for seed in (0, 2**63 - 1, 2**63, 2**64 - 1):
        params = parse(sampling_param_seed=np.array([seed], dtype=np.uint64), temperature=_f32(1.0))
        assert params.seed == seed and isinstance(params.seed, int)
    assert parse(seed=np.array([2**63 - 1], dtype=np.int64)).seed == 2**63 - 1
