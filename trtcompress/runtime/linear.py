"""Linear layers as the runtime runs them.

CPU (the reference path): the weight a `CompressedLinearState` stores is dequantized once at load and
the layer computes exactly what `CompressedLinearState.forward` computes (run-time activation
quantization for W4A4, the low-rank branch on the unquantized input), without re-dequantizing every
step. Projections that read the same input and carry no activation quantizer or low-rank branch
(q|k|v, gate|up) are fused into one GEMM.

CPU GEMM library (`deploy.cpu_gemm`). PyTorch's `F.linear` calls MKL's sgemm, which on AMD CPUs runs
its AVX2 code even where the CPU has AVX-512, and repacks the weight at every call. oneDNN's linear with
the weight reordered once at load (`onednn`, the same primitive PyTorch's own CPU inductor uses for
frozen fp32 linears) runs the CPU's widest vector units: 2.4x MKL for SmolLM2's GEMMs at 32 rows, 3.6x
at 4, 2.3x at 1,024 on this project's 2-core AMD EPYC (benchmarks/cpu_gemm.py). `auto` takes oneDNN
where this torch has it; the reordered weight replaces the plain one (no second copy).

CUDA: 4-bit weights run the plugin ops (`trtcompress::w4a16_gemm`, `trtcompress::w4a4_fp4_gemm`),
which dequantize in registers; other formats fall back to the dequantized weight.

Batch invariance. A CPU BLAS GEMM's result for one row can depend on how many rows it is given (with
oneDNN/MKL, M < 4 takes GEMV-like kernels that sum in another order), so a token's logits would
change with the batch it runs in, and greedy outputs with the server's load. Two modes (`tile`):
- `tile = 0` (default, fast): one GEMM per call with at least `MIN_ROWS` rows (zero-padded); valid
  where the BLAS sums every row the same way for any M >= MIN_ROWS, which `probe_batch_invariance`
  checks on the model's own weights when the runtime starts (falling back to fixed tiles if not);
- `tile = T`: fixed tiles of T rows (the last zero-padded): a row's result then depends only on the row
  whatever the BLAS does, at the cost of up to T - 1 padded rows per call.
Both are checked token for token in tests/runtime (batched == one at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trtcompress.compressed.linear import CompressedLinear
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState

MIN_ROWS = 4
FALLBACK_TILE = 16

CpuGemm = Literal["auto", "onednn", "blas"]
Linear = Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight.T + bias


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's reordered-weight linear (x86-64 and aarch64 CPU wheels do)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def onednn_pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`weight` (N, K) float32 reordered into oneDNN's blocked layout (an opaque mkldnn tensor) for GEMMs of
    about `rows_hint` rows (the hint picks the layout; any row count runs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous(), rows_hint)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with a weight from `onednn_pack`."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int, linear: Linear = F.linear
) -> torch.Tensor:
    """linear(x (T, K)) -> (T, N) computed so that a row's result never depends on T."""
    rows = x.shape[0]
    if tile == 0:
        if rows >= MIN_ROWS:
            return linear(x, weight, bias)
        return linear(torch.cat([x, x.new_zeros(MIN_ROWS - rows, x.shape[1])]), weight, bias)[:rows]
    pad = (-rows) % tile if rows else tile  # no rows: one padded tile (torch.cat needs a tensor)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    out = torch.cat([linear(x[i : i + tile], weight, bias) for i in range(0, rows + pad, tile)])
    return out[:rows]


def rows_invariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sizes: list[int]) -> bool:
    """Whether `fn` gives every row of `x[:m]` the bits it has in `fn(x)`, for each m in `sizes` (rows in
    an M-tail kernel too), and at a shifted position in the batch."""
    ref = fn(x)
    if not torch.equal(fn(x.roll(5, 0)), ref.roll(5, 0)):
        return False
    return all(torch.equal(fn(x[:m]), ref[:m]) for m in sizes)


def probe_batch_invariance(
    weights: list[torch.Tensor], max_rows: int, seed: int = 0, linear: Linear = F.linear
) -> bool:
    """Whether `linear` gives every row the same bits for any M >= MIN_ROWS (sampled M up to max_rows) and
    at any position in the batch."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sorted(
        {m for m in (MIN_ROWS + 1, 7, 8, 16, 17, 33, 64, 100, max_rows) if MIN_ROWS < m <= max_rows}
    )
    rows = max(sizes, default=MIN_ROWS)
    seen = set()
    for weight in weights:
        if tuple(weight.shape) in seen:
            continue
        seen.add(tuple(weight.shape))
        x = torch.randn(rows, weight.shape[1], generator=gen, dtype=weight.dtype).to(weight.device)
        if not rows_invariant(lambda x, w=weight: linear(x, w), x, [MIN_ROWS, *sizes]):
            return False
    return True


def _plugin_kind(layer: RuntimeLinear) -> tuple:
    """Layers of one kind run the same kernels at every row count (the probe tries one of each): same
    shape, op, weight formats (one op covers INT4 groups, NVFP4, MXFP4...) and tile."""
    op = getattr(layer.plugin, "__qualname__", "")
    return (layer.in_features, sum(layer.splits), op, layer.plugin_formats, layer.tile)


def varying_plugin_kinds(layers: list[RuntimeLinear], max_rows: int, seed: int = 0) -> set[tuple]:
    """The kinds of plugin layers (`_plugin_kind`) that do not give every row the same bits whatever the
    number of rows they are called with. Their ops pick a kernel by row count (W4A16: a GEMV up to 2
    rows, a tensor-core GEMV up to 16, 128-row tiles beyond), and those kernels need not sum in one
    order; plugin layers are not padded to MIN_ROWS, so every switch point is sampled."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sorted({m for m in (1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 129, max_rows) if m <= max_rows})
    seen, varying = set(), set()
    for layer in layers:
        kind = _plugin_kind(layer)
        if layer.plugin is None or kind in seen:
            continue
        seen.add(kind)
        x = torch.randn(max(sizes), layer.in_features, generator=gen).to(layer.device)
        if not rows_invariant(layer, x, sizes):
            varying.add(kind)
    return varying


def plugins_batch_invariant(layers: list[RuntimeLinear], max_rows: int) -> bool | None:
    """Make the plugin layers batch-invariant where the probe says they are not, and say whether they
    now are (None: no plugin layer). A kind of layer called whole (`tile` 0) that fails the probe runs
    in fixed FALLBACK_TILE-row tiles instead, as the dense path does: every call then has the same row
    count, so one kernel computes every row, at the cost of padded rows (a one-row decode step of
    those layers runs a 16-row kernel). Kinds that pass stay whole."""
    layers = [lin for lin in layers if lin.plugin is not None]
    if not layers:
        return None
    varying = varying_plugin_kinds(layers, max_rows)
    retile = [lin for lin in layers if _plugin_kind(lin) in varying and lin.tile == 0]
    tiled_already = len(varying) > len({_plugin_kind(lin) for lin in retile})  # (gemm_tile > 0)
    for lin in retile:
        lin.tile = FALLBACK_TILE
    return not tiled_already and not varying_plugin_kinds(retile, max_rows)


class RuntimeLinear:
    """One or more fused linear layers reading the same input, computed on fixed row tiles."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        tile: int,
        act_quant: ActQuantizer | None = None,
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
        splits: list[int] | None = None,
        plugin: Callable[[torch.Tensor], torch.Tensor] | None = None,
        pre_scale: torch.Tensor | None = None,
        in_features: int | None = None,
        device: torch.device | None = None,
        plugin_formats: tuple[str, ...] = (),
    ) -> None:
        self.weight, self.bias, self.tile = weight, bias, tile
        self.in_features = in_features if weight is None else weight.shape[1]
        self.device = device if weight is None else weight.device
        self.plugin_formats = plugin_formats  # what the op computes (its batch-invariance probe's kind)
        self.act_quant, self.lowrank, self.pre_scale = act_quant, lowrank, pre_scale
        self.splits = splits or [weight.shape[0]]  # type: ignore[union-attr]
        self.plugin = plugin  # a CUDA kernel callable (then no `weight`), or None for the reference path
        self.linear: Linear = F.linear  # the main GEMM; see use_onednn

    def use_onednn(self, rows_hint: int) -> None:
        """Run the GEMMs (the low-rank branch's too) through oneDNN with the weights reordered once
        (replacing the plain ones)."""
        if self.plugin is None and self.linear is F.linear:
            self.weight, self.linear = onednn_pack(self.weight, rows_hint), onednn_linear
            if self.lowrank is not None:
                a, b = self.lowrank
                self.lowrank = (onednn_pack(a, rows_hint), onednn_pack(b, rows_hint))

    @property
    def gemm_weights(self) -> list[torch.Tensor]:
        """Every weight this layer multiplies by (for the batch-invariance probe)."""
        return [w for w in (self.weight, *(self.lowrank or ())) if w is not None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plugin is not None:  # the 4-bit kernels take fp16 / bf16 activations
            x16, plugin = x.to(torch.float16), self.plugin
            if self.tile == 0:  # unpadded: one row takes the ops' 1-row GEMV
                return plugin(x16).to(x.dtype)
            return tiled_linear(x16, None, None, self.tile, lambda t, _w, _b: plugin(t)).to(x.dtype)
        delta = None
        if self.lowrank is not None:
            a, b = self.lowrank
            delta = tiled_linear(
                tiled_linear(x, b, None, self.tile, self.linear), a, None, self.tile, self.linear
            )
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.act_quant is not None:
            x = self.act_quant.gemm_operand(x)
        out = tiled_linear(x, self.weight, self.bias, self.tile, self.linear)
        return out if delta is None else out + delta

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(y, self.splits, dim=-1)


def _state(module: nn.Module) -> CompressedLinearState:
    if isinstance(module, CompressedLinear):
        return module.state
    if isinstance(module, nn.Linear):
        bias = None if module.bias is None else module.bias.detach()
        return CompressedLinearState(
            module.out_features, module.in_features, dense_weight=module.weight.detach(), bias=bias
        )
    raise TypeError(f"expected a linear layer, got {type(module).__name__}")


def _plain(state: CompressedLinearState) -> bool:
    return state.act_quant is None and state.lowrank_a is None and state.pre_quant_scale is None


def _plugin_linear(
    states: list[CompressedLinearState], plugin: Callable, tile: int, device: torch.device
) -> RuntimeLinear:
    """A RuntimeLinear computed by an op (the op holds the weight: a dequantized copy would be dead)."""
    splits = [s.out_features for s in states]
    formats = tuple(f"{s.quantized.format}{'+act' if s.act_quant else ''}" for s in states)  # type: ignore[union-attr]
    return RuntimeLinear(
        None, None, tile, splits=splits, plugin=plugin, in_features=states[0].in_features, device=device,
        plugin_formats=formats,
    )  # fmt: skip


def build_linear(modules: list[nn.Module], tile: int, device: torch.device) -> RuntimeLinear:
    """A RuntimeLinear for `modules` (fused when they can be), float32 on `device`; on CUDA a single
    4-bit linear runs through its plugin op instead (fp16 activations)."""
    states = [_state(m) for m in modules]
    if device.type == "cuda" and len(states) == 1:
        from trtcompress.runtime.plugins import plugin_for

        plugin = plugin_for(states[0], device)
        if plugin is not None:
            return _plugin_linear(states, plugin, tile, device)
    if len(states) > 1 and not all(_plain(s) for s in states):
        raise ValueError("only plain linears (no activation quantizer or low-rank branch) are fused")
    dtype = torch.float32
    weight = torch.cat([s.stored_weight(dtype) for s in states]).to(device).contiguous()
    biases = [s.bias for s in states]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.to(dtype) if b is not None else torch.zeros(s.out_features)
                for b, s in zip(biases, states, strict=True)
            ]
        ).to(device)
    state = states[0]
    lowrank = None
    if state.lowrank_a is not None:
        lowrank = (state.lowrank_a.to(device, dtype), state.lowrank_b.to(device, dtype))  # type: ignore[union-attr]
    pre_scale = None if state.pre_quant_scale is None else state.pre_quant_scale.to(device, dtype)
    return RuntimeLinear(
        weight,
        bias,
        tile,
        act_quant=state.act_quant,
        lowrank=lowrank,
        splits=[s.out_features for s in states],
        pre_scale=pre_scale,
    )


def build_group(modules: list[nn.Module], tile: int, device: torch.device) -> list[RuntimeLinear]:
    """Fuse a group of projections sharing an input when all are plain; otherwise one each."""
    states = [_state(m) for m in modules]
    if device.type != "cuda" and all(_plain(s) for s in states):
        return [build_linear(modules, tile, device)]
    if device.type == "cuda":  # INT4 layers of one format: one group-major GEMV for all of them
        from trtcompress.runtime.plugins import fused_plugin_for

        plugin = fused_plugin_for(states, device)
        if plugin is not None:
            return [_plugin_linear(states, plugin, tile, device)]
    return [build_linear([m], tile, device) for m in modules]
