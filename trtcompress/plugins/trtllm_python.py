"""The trtcompress GEMMs as TensorRT-LLM Python plugins (`tensorrt_llm.python_plugin`), engine-build path.

TensorRT-LLM 1.2.1's `@trtllm_plugin(name)` classes (subclasses of `PluginBase`) are inserted into a
network built with `tensorrt_llm.net_guard` by calling an instance on `tensorrt_llm.Tensor`s; their
`forward` runs in Python at inference time, so engines that use them need the Python runtime
(`tensorrt_llm.runtime`, the LLM API, Triton's python backend), not the C++ Triton backend. For engines
without Python, the same ops are the TensorRT quickly-deployable plugins with AOT PTX (`*/trt.py`).
Here `forward` computes the reference math of CompressedLinearState on the GPU with torch: dequantize,
then one GEMM (and for W4A4 the activation quantization first).

Needs TensorRT-LLM (imported lazily): `register_trtllm_plugins()` defines and registers the classes and
returns them by name. What needs no TensorRT-LLM (the output shape rule, the math) is plain functions.
"""

from __future__ import annotations

from typing import Any

import torch

from trtcompress.errors import MissingDependencyError

PLUGIN_NAMES = {"w4a16": "TrtcompressW4A16Gemm", "w4a4": "TrtcompressW4A4FP4Gemm"}
_classes: dict[str, Any] = {}


def gemm_output_shape(x_shape: Any, qweight_shape: Any) -> Any:
    """(..., K) x (N, K/2) -> (..., N): the shape rule both plugins use.

    Eagerly the shapes are lists of ints (a new list is returned). At build time they are TensorRT-LLM's
    `python_plugin.ShapeExpr`, which must be returned as such (`SymTensor` accepts only a ShapeExpr or
    ints) and cannot be iterated: with unknown dims (dtype inference) its `__getitem__` never raises
    IndexError, so `list()` would never end. Its last dim is set in place, as upstream's
    examples/python_plugin does (each call gets fresh ShapeExprs)."""
    if isinstance(x_shape, (list, tuple)):
        return [*x_shape[:-1], qweight_shape[0]]
    x_shape[len(x_shape) - 1] = qweight_shape[0]  # a no-op when the dims are unknown
    return x_shape


def w4a16_forward(x, qweight, scales, zeros, group_size: int, symmetric: bool) -> torch.Tensor:
    """out = x @ ((codes - zero) * scale)ᵀ for the canonical packed int4 layout (see compressed/state.py)."""
    from trtcompress.compressed.formats import IntFormat
    from trtcompress.compressed.state import QuantizedWeight

    n, k = qweight.shape[0], x.shape[-1]
    fmt = IntFormat(4, group_size, bool(symmetric))
    weight = QuantizedWeight(fmt, n, k, qweight, scales, None if symmetric else zeros)
    return torch.nn.functional.linear(x, weight.dequantize(x.dtype).to(x.device))


def w4a4_forward(
    x, qweight, scales, act_scale, act_shift, formats: tuple[int, int, int, int], group_size: int
):
    """LLM-FP4 W4A4: quantize x (tensor-wise scale, per-channel power-of-two shift), then one FP GEMM."""
    from trtcompress.compressed.formats import FpFormat
    from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight

    n, k = qweight.shape[0], x.shape[-1]
    w_exp, w_man, a_exp, a_man = formats
    weight = QuantizedWeight(FpFormat(w_exp, w_man, group_size), n, k, qweight, scales, None)
    shift = act_shift if act_shift is not None and bool(act_shift.any()) else None
    act = ActQuantizer(a_exp, a_man, act_scale.float().reshape(1), shift)
    return CompressedLinearState(n, k, weight, act_quant=act).forward(x)


def _trtllm():
    try:
        from tensorrt_llm import PluginBase
        from tensorrt_llm.python_plugin import SymTensor, convert_to_torch_tensor, trtllm_plugin
    except ImportError:
        raise MissingDependencyError(
            "the TensorRT-LLM Python plugins need TensorRT-LLM 1.2.1 and a CUDA GPU: `pip install "
            "tensorrt_llm==1.2.1 --extra-index-url https://pypi.nvidia.com`, or run in the "
            "docker/Dockerfile.gpu image (nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3)"
        ) from None
    return PluginBase, SymTensor, convert_to_torch_tensor, trtllm_plugin


def register_trtllm_plugins() -> dict[str, Any]:
    """Define and register the TensorRT-LLM Python plugin classes (idempotent); returns them by short name."""
    if _classes:
        return dict(_classes)
    plugin_base, sym_tensor, to_torch, trtllm_plugin = _trtllm()
    # `trtllm_plugin` reads the output count from `shape_dtype_inference`'s return annotation when that is
    # the SymTensor class, else asserts `plugin_num_outputs` was given (tensorrt_llm/python_plugin.py);
    # annotations here are strings (`from __future__ import annotations`), so it is given.

    @trtllm_plugin(PLUGIN_NAMES["w4a16"], plugin_num_outputs=1)
    class W4A16Gemm(plugin_base):  # type: ignore[misc, valid-type]
        def __init__(self, group_size: int, symmetric: bool):
            super().__init__()
            self.group_size, self.symmetric = group_size, symmetric

        def shape_dtype_inference(self, inputs):
            return sym_tensor(inputs[0].dtype, gemm_output_shape(inputs[0].shape, inputs[1].shape))

        def forward(self, inputs, outputs):
            x, qweight, scales, zeros = (to_torch(t) for t in inputs)
            to_torch(outputs[0]).copy_(
                w4a16_forward(x, qweight, scales, zeros, self.group_size, self.symmetric)
            )

    @trtllm_plugin(PLUGIN_NAMES["w4a4"], plugin_num_outputs=1)
    class W4A4FP4Gemm(plugin_base):  # type: ignore[misc, valid-type]
        def __init__(self, w_exp: int, w_man: int, a_exp: int, a_man: int, group_size: int):
            super().__init__()
            self.formats, self.group_size = (w_exp, w_man, a_exp, a_man), group_size

        def shape_dtype_inference(self, inputs):
            return sym_tensor(inputs[0].dtype, gemm_output_shape(inputs[0].shape, inputs[1].shape))

        def forward(self, inputs, outputs):
            x, qweight, scales, act_scale, act_shift = (to_torch(t) for t in inputs)
            out = w4a4_forward(x, qweight, scales, act_scale, act_shift, self.formats, self.group_size)
            to_torch(outputs[0]).copy_(out)

    _classes.update(w4a16=W4A16Gemm, w4a4=W4A4FP4Gemm)
    return dict(_classes)
