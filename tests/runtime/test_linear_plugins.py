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


def _on_this_cpu(layer: linear.RuntimeLinear) -> linear.RuntimeLinear:
    layer.device = torch.device("cpu")  # built routed to CUDA; the probe's inputs go where the op runs
    return layer


def test_the_plugin_probe_samples_every_kernel_switch_and_finds_an_order_change(monkeypatch):
    """`varying_plugin_kinds` (what the runtime reports as `plugin_batch_invariant` on CUDA) passes
    the interpreted W4A16 kernels, whose rows here keep their bits across the op's switches (GEMV at <= 2
    rows, tensor-core GEMV at <= 16, tiles beyond), and fails an op whose sum order changes with the
    row count, at any of those switch points; a layer's plugin layers have their K and device."""
    _on_cpu(monkeypatch)
    (fused,) = linear.build_group([_layer(40, seed=1), _layer(16, seed=2)], 0, CUDA)
    single = linear.build_linear([_layer(24, k=128, seed=3)], 0, CUDA)
    assert (fused.in_features, single.in_features, fused.device) == (256, 128, CUDA)
    layers = [_on_this_cpu(fused), _on_this_cpu(single)]
    assert not linear.varying_plugin_kinds(layers, max_rows=20)

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4)).half()  # the ops take fp16

    def order_changes_above(rows: int):
        def op(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] <= rows:
                return x @ w.T
            return (x[:, :64] @ w[:, :64].T) + (x[:, 64:] @ w[:, 64:].T)  # another summation order

        return op

    for switch in (1, 2, 16):
        odd = linear.RuntimeLinear(None, None, 0, splits=[16], plugin=order_changes_above(switch))
        odd.in_features, odd.device = 128, torch.device("cpu")
        assert linear.varying_plugin_kinds([odd], max_rows=20), switch
    assert not linear.varying_plugin_kinds([], max_rows=20)


def test_plugin_layers_that_change_bits_with_the_row_count_run_in_fixed_tiles(monkeypatch):
    """NVFP4 runs the row-layout op, whose kernels (interpreted here) sum in another order past 8 rows:
    `plugins_batch_invariant` finds that, runs the layer in 16-row tiles and then the probe passes;
    layers that pass whole stay whole (a one-row decode keeps its 1-row GEMV)."""
    from trtcompress.compressed.formats import NVFP4

    _on_cpu(monkeypatch)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    fp4 = CompressedLinear(CompressedLinearState(48, 128, QuantizedWeight.round_to_nearest(w, NVFP4)))
    fp4_layer = _on_this_cpu(linear.build_linear([fp4], 0, CUDA))
    int4_layer = _on_this_cpu(linear.build_linear([_layer(32, k=128, seed=6)], 0, CUDA))
    assert linear.varying_plugin_kinds([fp4_layer, int4_layer], max_rows=20) == {
        linear._plugin_kind(fp4_layer)
    }
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(7))
    whole = fp4_layer(x)
    assert linear.plugins_batch_invariant([fp4_layer, int4_layer], max_rows=20) is True
    assert (fp4_layer.tile, int4_layer.tile) == (linear.FALLBACK_TILE, 0)
    torch.testing.assert_close(fp4_layer(x), whole, rtol=1e-2, atol=1e-2)  # the same layer (fp16 outputs)
    assert linear.plugins_batch_invariant([], max_rows=20) is None
    # one op computes NVFP4 and INT4 of other groups: same shape and op, but not one kind for the probe
    int4_rows = _on_this_cpu(linear.build_linear([_layer(48, k=128, group=16, seed=8)], 0, CUDA))
    fp4_again = _on_this_cpu(linear.build_linear([fp4], 0, CUDA))
    assert int4_rows.plugin.__qualname__ == fp4_again.plugin.__qualname__
    assert linear._plugin_kind(int4_rows) != linear._plugin_kind(fp4_again)
