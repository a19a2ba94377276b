"""Reported byte counts (weight_stats, layer meta, manifest) equal what the artifact actually stores."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints import native
from trtcompress.compressed import intgrid
from trtcompress.compressed.accounting import weight_stats
from trtcompress.compressed.formats import MXFP4, NVFP4, FpFormat, IntFormat
from trtcompress.compressed.linear import CompressedLinear, set_module
from trtcompress.compressed.sparsity import SparsityMask, nm_mask, row_mask
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.recipe import load_recipe, with_overrides


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write(model, tokenizer, out):
    out.mkdir()
    content = native.write_weights(model, tokenizer, out, shard_size_bytes=1 << 16)  # several shards
    manifest = native.new_manifest(
        recipe={"name": "test"}, source={}, model_config=model.config.to_dict(), content=content
    )
    native.write_manifest(out, manifest)
    return content


def _stored(out) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor read back from the safetensors files, and their data bytes (file size - header)."""
    tensors: dict[str, torch.Tensor] = {}
    data_bytes = 0
    for file in sorted(out.glob("*.safetensors")):
        raw = file.read_bytes()
        data_bytes += len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return tensors, data_bytes


def _fused(model, names, fmt: IntFormat) -> None:
    """Quantize layers sharing an input as one stacked weight whose scales/zeros are handed out as row
    slices, as GPTQ does for q/k/v and gate/up: each layer's scales are a view of one fused tensor."""
    weights = [model.get_submodule(n).weight.detach().float() for n in names]
    codes, scales, zeros = intgrid.quantize_groups(torch.cat(weights), fmt.bits, fmt.group_size, False)
    scales, zeros = scales.to(intgrid.SCALE_DTYPE), zeros.to(torch.uint8)
    row = 0
    for name, w in zip(names, weights, strict=True):
        rows = slice(row, row + w.shape[0])
        q = QuantizedWeight.from_codes(codes[rows], scales[rows], zeros[rows], fmt)
        set_module(model, name, CompressedLinear(CompressedLinearState(*w.shape, quantized=q)))
        row += w.shape[0]


def test_weight_bytes_count_row_slices_of_one_fused_tensor_once_each(tiny_model, tmp_path):
    model, tok = tiny_model.model, tiny_model.tokenizer
    fmt = IntFormat(4, 32, False)
    for i in range(2):
        _fused(model, [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"], fmt)
        _fused(model, [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")], fmt)
    attn = model.model.layers[0].self_attn
    # The precondition that made the bug: k's scales live in q's storage, at another offset.
    assert attn.k_proj.scales.untyped_storage().data_ptr() == attn.q_proj.scales.untyped_storage().data_ptr()
    content = _write(model, tok, tmp_path / "art")
    tensors, data_bytes = _stored(tmp_path / "art")
    stored = sum(_nbytes(t) for t in tensors.values())
    assert stored == data_bytes == content["bytes"]["tensors"]
    stats = weight_stats(model)
    assert stats.weight_bytes == stored  # was short by every k/v/up scales and zeros tensor
    reloaded = weight_stats(native.load_artifact(tmp_path / "art").model)
    assert reloaded == stats  # `build` (in-memory model) and `eval ARTIFACT` (reloaded) report the same


def _every_format(model) -> set[str]:
    """Give each decoder linear another stored form: INT2-8 sym/asym/per-channel, FP4 (NVFP4, MXFP4,
    fp16-scaled), W4A4 act scale + shifts, 2:4 / 4:8 / unstructured masks alone and with quantization,
    low-rank factors, AWQ pre-quant scales, biases."""
    fmts = [IntFormat(b, g, s) for b in (2, 3, 4, 8) for g, s in ((0, True), (32, False), (64, True))]
    fmts += [NVFP4, MXFP4, FpFormat(2, 1, 0), FpFormat(1, 2, 32)]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    gen = torch.Generator().manual_seed(0)
    formats = set()
    for i, name in enumerate(names * 2):  # the second round re-compresses with other combinations
        layer = model.get_submodule(name)
        w = (layer.state.weight() if isinstance(layer, CompressedLinear) else layer.weight).detach().float()
        out_f, in_f = w.shape
        fmt, kind = fmts[i % len(fmts)], i % 6
        q = QuantizedWeight.round_to_nearest(w, fmt)
        extra: dict = {}
        if kind == 0:
            extra["bias"] = torch.randn(out_f, generator=gen).half()
            extra["mask"] = SparsityMask.from_bool(nm_mask(w.abs(), 2, 4), "2:4")
        elif kind == 1:
            extra["lowrank_a"] = torch.randn(out_f, 4, generator=gen).half()
            extra["lowrank_b"] = torch.randn(4, in_f, generator=gen).half()
        elif kind == 2:
            extra["pre_quant_scale"] = (torch.rand(in_f, generator=gen) + 0.5).half()
        elif kind == 3:
            shift = torch.randint(0, 4, (in_f,), generator=gen, dtype=torch.uint8)
            extra["act_quant"] = ActQuantizer(2, 1, torch.tensor([0.25]), shift)
            extra["bias"] = torch.randn(out_f, generator=gen)
        elif kind == 4:
            extra["mask"] = SparsityMask.from_bool(row_mask(w.abs(), 0.4))
            extra["lowrank_a"], extra["lowrank_b"] = torch.randn(out_f, 2), torch.randn(2, in_f)
        if kind == 5:
            mask = SparsityMask.from_bool(nm_mask(w.abs(), 4, 8), "4:8")
            state = CompressedLinearState(out_f, in_f, dense_weight=w.half(), mask=mask)
        else:
            state = CompressedLinearState(out_f, in_f, quantized=q, **extra)
        set_module(model, name, CompressedLinear(state))
        formats.add(state.format_name)
    return formats


def test_every_layer_format_reports_exactly_the_bytes_it_stores(tiny_model, tmp_path):
    model, tok = tiny_model.model, tiny_model.tokenizer
    formats = _every_format(model)
    assert len(formats) >= 20
    _write(model, tok, tmp_path / "art")
    tensors, data_bytes = _stored(tmp_path / "art")
    stored = sum(_nbytes(t) for t in tensors.values())
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["bytes"]["tensors"] == stored == data_bytes
    assert "lm_head.weight" not in tensors  # tied: stored (and counted) once
    layer_total = 0
    for name, meta in manifest["layers"].items():
        own = {k.rpartition(".")[2]: t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        assert sorted(own) == meta["tensors"]
        assert meta["bytes"] == sum(_nbytes(t) for t in own.values()), name
        weight_only = {k: t for k, t in own.items() if k not in ("bias", "pre_quant_scale")}
        weight_only = {k: t for k, t in weight_only.items() if not k.startswith("act_")}
        assert meta["weight_bytes"] == sum(_nbytes(t) for t in weight_only.values()), name
        layer_total += meta["bytes"]
    assert manifest["bytes"]["compressed_linears"] == layer_total
    assert manifest["bytes"]["other"] == stored - layer_total
    stats = weight_stats(model)
    assert stats.weight_bytes == stored
    linears = [n for n in manifest["layers"] if n != "lm_head"]
    assert stats.linear_weight_bytes == sum(manifest["layers"][n]["weight_bytes"] for n in linears)
    assert stats.linear_params == sum(o * i for o, i in (manifest["layers"][n]["shape"] for n in linears))
    assert weight_stats(native.load_artifact(tmp_path / "art").model) == stats


@pytest.mark.parametrize("preset", ["w4a16-gptq", "sparse24-sparsegpt-w4a16"])
def test_a_calibrated_builds_weight_bytes_equal_its_artifacts_tensors(tiny_model, tmp_path, preset):
    """End to end through the passes that hand out fused-tensor slices (the eval report of `build`
    reads weight_stats of this in-memory model; `eval ARTIFACT` reads it of the reloaded one)."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    small = [("calibration.num_samples", 2), ("calibration.seq_len", 32), ("eval.context", 128)]
    recipe = with_overrides(load_recipe(preset), [*small, ("eval.ppl_tokens", 256)])
    compress_model(model, tok, recipe)
    content = _write(model, tok, tmp_path / "art")
    _, data_bytes = _stored(tmp_path / "art")
    assert weight_stats(model).weight_bytes == content["bytes"]["tensors"] == data_bytes
    assert weight_stats(model) == weight_stats(native.load_artifact(tmp_path / "art").model)
