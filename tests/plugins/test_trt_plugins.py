"""TensorRT plugin plumbing that needs no TensorRT: PTX for every plugin kernel and configuration (compiled
for sm_90 on CPU), launch parameters, shape inference, the kernel-interface check, the loader's errors,
and the math of the TensorRT-LLM Python plugins."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from trtcompress.compressed.formats import FpFormat, IntFormat
from trtcompress.compressed.state import ActQuantizer, CompressedLinearState, QuantizedWeight
from trtcompress.errors import MissingDependencyError
from trtcompress.plugins import gemm_trt, loader
from trtcompress.plugins.trtllm_python import gemm_output_shape, w4a4_forward, w4a16_forward

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def aot_kernels(tmp_path_factory) -> list[dict]:
    """`python -m trtcompress.plugins.aot` in a fresh interpreter (AOT needs the real jit)."""
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trtcompress.plugins.aot", "--arch", "90", "--ptx-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout)
    for k in kernels:
        if k["name"]:
            stem = f"{k['plugin'].split('::')[1]}-{k['config'].replace('/', '-')}"
            k["ptx"] = (out / f"{stem}.ptx").read_text()
    return kernels


def test_gear_attention_ptx_for_every_codec(aot_kernels) -> None:
    gear = {k["config"]: k for k in aot_kernels if k["plugin"] == "trtcompress::gear_attention"}
    assert set(gear) == {"kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit/block", "gear-2bit/group",
                         "gear-4bit/block", "gear-4bit/group"}  # fmt: skip
    for config, k in gear.items():
        assert k["name"] == "gear_decode_trt_kernel", config
        assert ".target sm_90" in k["ptx"] and f".visible .entry {k['name']}(" in k["ptx"], config
        # 25 inputs + max_blocks + the output + Triton 3.6's two scratch pointers
        assert k["entry_params"] == 29, config
        assert k["num_warps"] >= 1 and 0 < k["shared"] <= 48 * 1024, config  # no opt-in shared memory needed


@pytest.mark.parametrize("plugin", ["trtcompress::w4a16_gemm", "trtcompress::w4a4_fp4_gemm"])
def test_gemm_ptx_for_every_config_and_tactic(aot_kernels, plugin) -> None:
    kernels = [k for k in aot_kernels if k["plugin"] == plugin]
    if kernels and kernels[0]["unavailable"]:
        pytest.skip(
            f"{plugin}: the Triton kernel (issue 6) is not in this tree yet: {kernels[0]['unavailable']}"
        )
    from trtcompress.plugins.aot import W4A4_FORMATS, W4A16_CONFIGS

    configs = W4A16_CONFIGS if plugin.endswith("w4a16_gemm") else W4A4_FORMATS
    assert len(kernels) == len(configs) * len(gemm_trt.TACTICS)
    entry = plugin.split("::")[1] + "_trt_kernel"
    for k in kernels:
        assert k["name"] == entry and f".visible .entry {entry}(" in k["ptx"] and ".target sm_90" in k["ptx"]
        inputs = 4 if plugin.endswith("w4a16_gemm") else 5
        assert k["entry_params"] >= inputs + 3 + 1  # inputs, M N K, out (+ Triton's scratch pointers)


def test_tactics_tiles_and_launch_parameters() -> None:
    assert gemm_trt.TACTICS == (1, 2, 3, 4)  # QDP tactics are positive integers
    assert gemm_trt.tile_for(0) == gemm_trt.TILES[0]  # before autotuning TensorRT asks for the default
    with pytest.raises(ValueError, match="tactic 5"):
        gemm_trt.tile_for(5)
    # SmolLM2 down_proj at decode (M=1) and prefill (M=300) with each tile
    p = gemm_trt.launch_params(1, 576, 1536, 1, shared_mem=4096)
    assert (p.grid_x, p.grid_y, p.grid_z, p.block_x, p.shared_mem) == (1, 9, 1, 128, 4096)
    assert p.extra_args == (1, 576, 1536)
    p = gemm_trt.launch_params(300, 1536, 576, 4)
    assert (p.grid_x, p.grid_y, p.block_x) == (3, 12, 256)  # ceil(300/128), 1536/128, 8 warps
    for tactic in gemm_trt.TACTICS:
        tile = gemm_trt.tile_for(tactic)
        p = gemm_trt.launch_params(tile.block_m + 1, tile.block_n, 64, tactic)
        assert (p.grid_x, p.grid_y) == (2, 1)


def test_gemm_shape_inference() -> None:
    assert gemm_trt.infer_gemm_shape((7, 576), (1536, 288)) == (7, 1536)
    assert gemm_trt.infer_gemm_shape((2, 5, 575), (64, 288)) == (2, 5, 64)  # odd K: last byte half used
    assert gemm_trt.infer_gemm_shape((1, 96), (32, 96), bits=8) == (1, 32)
    with pytest.raises(ValueError, match="K=576"):
        gemm_trt.infer_gemm_shape((7, 576), (1536, 576))
    assert gemm_output_shape([3, 576], [1536, 288]) == [3, 1536]


def test_kernel_interface_check_against_tensorrt_argument_order() -> None:
    from trtcompress.plugins.gear_attention.kernel import gear_decode_trt_kernel as fn

    names = [n for i, n in enumerate(fn.arg_names) if i not in fn.constexprs]
    inputs, extra, outputs = names[:-2], ["max_blocks"], ["out_ptr"]
    constants = {"H": 3, "D": 64}
    gemm_trt.check_kernel_interface(fn, inputs, extra, outputs, constants)
    with pytest.raises(ValueError, match="inputs, then the int32 extras, then outputs"):
        gemm_trt.check_kernel_interface(fn, inputs, [], ["out_ptr", "max_blocks"], constants)
    with pytest.raises(ValueError, match="constexprs"):
        gemm_trt.check_kernel_interface(fn, inputs, extra, outputs, {"NOT_A_CONSTEXPR": 1})


def test_trtllm_python_plugin_math_is_the_state_forward() -> None:
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 160, generator=gen), torch.randn(5, 160, generator=gen)
    for fmt in (IntFormat(4, 64, True), IntFormat(4, 32, False)):
        q = QuantizedWeight.round_to_nearest(w, fmt)
        zeros = q.zeros if q.zeros is not None else torch.zeros(1, dtype=torch.uint8)
        got = w4a16_forward(x, q.qweight, q.scales, zeros, fmt.group_size, fmt.symmetric)
        torch.testing.assert_close(got, CompressedLinearState(48, 160, q).forward(x), rtol=0, atol=0)
    q = QuantizedWeight.round_to_nearest(w, FpFormat(2, 1, 0))
    act = ActQuantizer(
        2, 1, torch.tensor([0.5]), torch.randint(0, 4, (160,), generator=gen, dtype=torch.uint8)
    )
    want = CompressedLinearState(48, 160, q, act_quant=act).forward(x)
    got = w4a4_forward(x, q.qweight, q.scales, act.scale, act.shift, (2, 1, 2, 1), 0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ loader


def _config_dir(tmp_path, plugins: dict, engine: bool = False):
    section = {"plugins": plugins, "stock_trtllm_build": not plugins}
    config = {"pretrained_config": {"trtcompress": section}} if engine else {"trtcompress": section}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("engine", [False, True])
def test_missing_plugin_is_named_before_tensorrt_fails(tmp_path, engine) -> None:
    model_dir = _config_dir(tmp_path, {"trtcompress::gear_attention": {"codec": "gear-2bit"}}, engine)
    assert loader.required_plugins(model_dir) == ["trtcompress::gear_attention"]
    with pytest.raises(loader.PluginNotRegisteredError, match=r"gear_attention.*getPluginCreator"):
        loader.check_plugins(model_dir, registered=set())
    assert loader.check_plugins(model_dir, registered={"trtcompress::gear_attention"}) == [
        "trtcompress::gear_attention"
    ]
    assert loader.check_plugins(_config_dir(tmp_path, {}), registered=set()) == []
    with pytest.raises(loader.PluginNotRegisteredError, match=r"no config\.json"):
        loader.required_plugins(tmp_path / "nowhere")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_registering_without_tensorrt_says_what_to_install() -> None:
    for name in loader.PLUGINS:
        with pytest.raises(MissingDependencyError, match=r"TensorRT >= 10\.8"):
            loader.register_plugins([name])
    assert loader.register_plugins(required=()) == []  # best effort: nothing registered, no error
    with pytest.raises(loader.PluginNotRegisteredError, match="unknown plugin"):
        loader.register_plugins(["trtcompress::nope"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_trtllm_python_plugins_need_trtllm() -> None:
    from trtcompress.plugins.trtllm_python import register_trtllm_plugins

    with pytest.raises(MissingDependencyError, match=r"TensorRT-LLM 1\.2\.1"):
        register_trtllm_plugins()
