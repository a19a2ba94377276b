"""FP4 states (NVFP4, MXFP4, LLM-FP4 W4A4 with its activation quantizer) through the native artifact."""

import json

import pytest
import torch

from trtcompress.builders.compress import compress_model
from trtcompress.checkpoints import native
from trtcompress.compressed import compressed_linears
from trtcompress.recipe import load_recipe


def _small(name: str):
    data = load_recipe(name).model_dump()
    data["calibration"].update(num_samples=2, seq_len=32)
    if name == "w4a4-llmfp4":
        data["passes"][0].update(rounds=1, grid=8, stride=2, sample_tokens=64)
    return type(load_recipe(name)).model_validate(data)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: 1 thread avoids OpenMP's spinning barriers on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "w4a4-llmfp4"])
def test_fp4_artifact_saves_and_loads_exactly(tiny_model, tmp_path, preset):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    recipe = _small(preset)
    compress_model(model, tokenizer, recipe)
    with native.atomic_directory(tmp_path / "art") as tmp:
        content = native.write_weights(model, tokenizer, tmp, 1 << 30)
        manifest = native.new_manifest(
            recipe=recipe.model_dump(mode="json"),
            source={"model": "tiny"},
            model_config=model.config.to_dict(),
            content=content,
        )
        native.write_manifest(tmp, manifest)
    loaded = native.load_artifact(tmp_path / "art")
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    layer = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["quant"]["kind"] == "fp" and layer["shape"] == [96, 160]
    for name, module in compressed_linears(loaded.model):
        original = model.get_submodule(name).state
        again = module.state
        assert again.format_name == original.format_name
        assert set(again.tensors()) == set(original.tensors())
        for key, tensor in original.tensors().items():  # dtypes survive: float8 scales, uint8 E8M0 / shifts
            assert again.tensors()[key].dtype == tensor.dtype and torch.equal(again.tensors()[key], tensor)
    if preset == "nvfp4":
        assert layer["format"] == "nvfp4" and layer["weight_bytes"] == 96 * 80 + 96 * 10 + 4
    if preset == "mxfp4":
        assert layer["format"] == "mxfp4" and layer["weight_bytes"] == 96 * 80 + 96 * 5
    if preset == "w4a4-llmfp4":
        assert layer["act"]["kind"] == "fp" and "act_shift" in layer["tensors"]
        assert layer["bytes"] == layer["weight_bytes"] + 4 + 160  # + act scale (fp32) + 160 shifts
