"""How the runtime wires its linears to the 4-bit ops on CUDA (the routing runs here with the ops on the
CPU: TRTCOMPRESS_GEMM_TRITON=1 runs their kernels interpreted): INT4 projections sharing an input
become one fused group-major op, other layers one op each, and no dequantized copy of a plugin layer's
weight is kept."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are first imported

from trtcompress.compressed.formats import IntFormat
from trtcompress.compressed.linear import CompressedLinear
from trtcompress.compressed.state import CompressedLinearState, QuantizedWeight
from trtcompress.plugins.w4a16_gemm import op
from trtcompress.runtime import linear, plugins

CUDA = torch.device("cuda")  # only routed on: every tensor stays on the CPU


def _layer(n: int, k: int = 256, group: int = 64, seed: int = 0) -> CompressedLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q = QuantizedWeight.round_to_nearest(w, IntFormat(4, group, False))
    return CompressedLinear(CompressedLinearState(n, k, q, bias=torch.randn(n)))


def _on_cpu(monkeypatch) -> None:
    monkeypatch.setenv("TRTCOMPRESS_GEMM_TRITON", "1")
    monkeypatch.setattr(plugins, "plugin_for", lambda state, device: op.w4a16_linear(state, "cpu"))
    monkeypatch.setattr(
        plugins, "fused_plugin_for", lambda states, device: op.w4a16_fused_linear(states, "cpu")
    )


def test_int4_projections_sharing_an_input_run_as_one_fused_op(monkeypatch):
    _on_cpu(monkeypatch)
    layers = [_layer(40, seed=1), _layer(16, seed=2), _layer(16, seed=3)]
    (fused,) = linear.build_group(layers, 0, CUDA)
    assert fused.plugin is not None and fused.weight is None and fused.splits == [40, 16, 16]
    x = torch.randn(3, 256)
    for part, layer in zip(fused.split(fused(x)), layers, strict=True):
        torch.testing.assert_close(part, layer.state.forward(x), rtol=3e-3, atol=3e-2)


def test_layers_that_cannot_be_fused_run_one_op_each(monkeypatch):
    _on_cpu(monkeypatch)
    layers = [_layer(16, group=64, seed=1), _layer(16, group=32, seed=2)]  # two group sizes
    runs = linear.build_group(layers, 0, CUDA)
    assert len(runs) == 2 and all(r.plugin is not None and r.weight is None for r in runs)
    x = torch.randn(2, 256)
    for run, layer in zip(runs, layers, strict=True):
        torch.testing.assert_close(run(x), layer.state.forward(x), rtol=3e-3, atol=3e-2)
    assert linear.build_group(layers, 0, torch.device("cpu"))[0].plugin is None  # CPU: the reference path
