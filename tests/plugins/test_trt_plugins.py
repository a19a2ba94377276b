"""TensorRT plugin plumbing that needs no TensorRT: PTX for every plugin kernel and configuration (compiled
for sm_90 on CPU), launch parameters, shape inference, the kernel-interface check, the loader's errors,
and the math of the TensorRT-LLM Python plugins."""

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
from trtcompress.plugins.aot import gear_configs
from trtcompress.plugins.trtllm_python import gemm_output_shape, w4a4_forward, w4a16_forward

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _aot(tmp_path_factory, *args: str) -> list[dict]:
    """`python -m trtcompress.plugins.aot` in a fresh interpreter (AOT needs the real jit)."""
    out = tmp_path_factory.mktemp("ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trtcompress.plugins.aot", "--arch", "90", "--ptx-dir", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout)
    for k in kernels:
        if k["name"]:
            stem = f"{k['plugin'].split('::')[1]}-{k['config'].replace('/', '-')}"
            k["ptx"] = (out / f"{stem}.ptx").read_text()
    return kernels


@pytest.fixture(scope="module")
def aot_kernels(tmp_path_factory) -> list[dict]:
    """Every GEAR/KIVI layout and every GEMM configuration with the first tactic (the tactic sweep is
    tested on one configuration below, every configuration x tactic in the slow test)."""
    return _aot(tmp_path_factory, "--tactics", "1")


def test_gear_attention_ptx_for_every_codec(aot_kernels) -> None:
    gear = {k["config"]: k for k in aot_kernels if k["plugin"] == "trtcompress::gear_attention"}
    assert set(gear) == {"kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit/block", "gear-2bit/group",
                         "gear-4bit/block", "gear-4bit/group", "gear-2bit/block/fp8/fp8s",
                         "gear-4bit/block/fp8", "gear-2bit/block/fp8/fp8s/sink1", "gear-2bit/block/fp8/sink1",
                         "gear-2bit/block/int8/fp8s", "kivi-2bit/sink1",
                         "gear-4bit/block/fp8/int4f"}  # fmt: skip
    assert {name for name, _ in gear_configs()} == set(gear)  # each name says what was compiled
    for config, k in gear.items():
        assert k["name"] == "gear_decode_trt_kernel", config
        assert ".target sm_90" in k["ptx"] and f".visible .entry {k['name']}(" in k["ptx"], config
        # 33 inputs + max_blocks + the output + Triton 3.6's two scratch pointers
        assert k["entry_params"] == 37, config
        assert k["num_warps"] >= 1 and 0 < k["shared"] <= 48 * 1024, config  # no opt-in shared memory needed


@pytest.mark.parametrize("plugin", ["trtcompress::w4a16_gemm", "trtcompress::w4a4_fp4_gemm"])
def test_gemm_ptx_for_every_config(aot_kernels, plugin) -> None:
    kernels = [k for k in aot_kernels if k["plugin"] == plugin]
    if kernels and kernels[0]["unavailable"]:
        pytest.skip(
            f"{plugin}: the Triton kernel (issue 6) is not in this tree yet: {kernels[0]['unavailable']}"
        )
    from trtcompress.plugins.aot import W4A4_FORMATS, W4A16_CONFIGS

    configs = W4A16_CONFIGS if plugin.endswith("w4a16_gemm") else W4A4_FORMATS
    assert len(kernels) == len(configs)
    entry = plugin.split("::")[1] + "_trt_kernel"
    for k in kernels:
        assert k["name"] == entry and f".visible .entry {entry}(" in k["ptx"] and ".target sm_90" in k["ptx"]
        inputs = 4 if plugin.endswith("w4a16_gemm") else 5
        assert k["entry_params"] >= inputs + 3 + 1  # inputs, M N K, out (+ Triton's scratch pointers)


def test_gemm_ptx_for_every_tactic(tmp_path_factory) -> None:
    kernels = _aot(tmp_path_factory, "--plugins", "w4a16,w4a4", "--configs", "1", "--tactics", "2,3,4")
    if any(k["unavailable"] for k in kernels):
        pytest.skip("a GEMM Triton kernel (issue 6) is not in this tree yet")
    assert len(kernels) == 2 * 3 and all(k["name"].endswith("_trt_kernel") for k in kernels)
    warps = {k["config"].rsplit("/", 1)[1]: k["num_warps"] for k in kernels}
    assert warps["tactic4"] == gemm_trt.tile_for(4).num_warps == 8


@pytest.mark.slow
def test_ptx_for_every_plugin_config_and_tactic(tmp_path_factory) -> None:
    kernels = _aot(tmp_path_factory)
    assert all(k["name"] and ".target sm_90" in k["ptx"] for k in kernels), [
        k["unavailable"] for k in kernels
    ]
    assert len(kernels) == 14 + 16 + 16


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

    all_names, constexprs = gemm_trt.kernel_parameters(fn)  # JITFunction, or the interpreter's wrapper
    names = [n for n in all_names if n not in constexprs]
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
    # the exact install command, at the TensorRT TensorRT-LLM 1.2.1 pins (a bare `tensorrt` is 11.x now)
    for name in loader.PLUGINS:
        with pytest.raises(
            MissingDependencyError, match=r'TensorRT >= 10\.9.*pip install "tensorrt~=10\.14\.1"'
        ):
            loader.register_plugins([name])
    assert loader.register_plugins(required=()) == []  # best effort: nothing registered, no error
    with pytest.raises(loader.PluginNotRegisteredError, match="unknown plugin"):
        loader.register_plugins(["trtcompress::nope"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_trtllm_python_plugins_need_trtllm() -> None:
    from trtcompress.plugins.trtllm_python import register_trtllm_plugins

    with pytest.raises(MissingDependencyError, match=r"pip install tensorrt_llm==1\.2\.1 "):
        register_trtllm_plugins()


# ------------------------------------------------------------------ tensorrt.plugin signatures, on CPU
# A stand-in for `tensorrt.plugin`'s classes with concrete integers for its symbolic shapes: enough to
# apply TensorRT's registration rules (qdp_schema.py) and to evaluate each aot_impl's launch formulas.


class _Shape(list):
    def numel(self):
        out = 1
        for d in self:
            out *= d
        return out


class _Dim(int):
    is_constant = True  # a property in tensorrt.plugin

    def constant_value(self):  # a method in tensorrt.plugin (_tensor.py: ShapeExpr.constant_value())
        return int(self)


class _Desc:
    def __init__(self, *shape):
        self.shape_expr = _Shape(_Dim(d) for d in shape)

    def like(self):
        return _Desc(*self.shape_expr)


class _Launch:
    grid_x = grid_y = grid_z = block_x = shared_mem = None


class _SymExprs(tuple):
    @classmethod
    def from_tuple(cls, items):
        return cls(items)


class _Combination:
    def __init__(self, io_types=None, layouts=None, tactics=None):
        self.io_types, self.layouts, self.tactics = io_types, layouts, tactics


def _stub_trtp():
    import types

    return types.SimpleNamespace(
        TensorDesc=_Desc, KernelLaunchParams=_Launch, SymExprs=_SymExprs, SymIntExprs=_SymExprs,
        SymInt32=int, AutoTuneCombination=_Combination, cdiv=lambda a, b: -(-a // b),
    )  # fmt: skip


@pytest.mark.parametrize("module", ["w4a16_gemm", "w4a4_fp4_gemm", "gear_attention"])
def test_plugin_functions_pass_tensorrt_registration_rules(module):
    import importlib

    from trtcompress.plugins.qdp_schema import check_plugin_functions

    trt_module = importlib.import_module(f"trtcompress.plugins.{module}.trt")
    trtp = _stub_trtp()
    check_plugin_functions(*trt_module.plugin_functions(trtp), trtp)


def test_registration_rules_catch_what_tensorrt_refuses():
    from trtcompress.plugins.qdp_schema import check_plugin_functions, check_register

    trtp = _stub_trtp()

    def varargs(q: _Desc, *inputs: _Desc, bits: int) -> _Desc: ...

    def strings(x: "_Desc", group_size: "int") -> "_Desc": ...  # as with __future__ annotations

    def register(x: _Desc, group_size: int) -> _Desc: ...

    def autotune(x, group_size: int, outputs) -> list: ...

    def aot(x, group_size: int, outputs, tactic: int): ...

    with pytest.raises(ValueError, match="positional-or-keyword"):
        check_register(varargs, _Desc)
    with pytest.raises(ValueError, match="class"):
        check_register(strings, _Desc)
    with pytest.raises(ValueError, match="AutoTuneCombination"):
        check_plugin_functions(register, autotune, aot, trtp)
    with pytest.raises(ValueError, match="return annotation"):
        check_plugin_functions(register, None, aot, trtp)

    # tensorrt.plugin's own check lets aot_impl take a subset of the attributes, but its AOT plugin calls
    # aot_impl with every attribute, positionally (_plugin_class.py: get_launch_params)
    def register2(x: _Desc, group_size: int, symmetric: int) -> _Desc: ...

    def aot_subset(x, symmetric: int, outputs, tactic: int) -> tuple[str, str, _Launch, _SymExprs]: ...

    def aot_all(
        x, group_size: int, symmetric: int, outputs, tactic: int
    ) -> tuple[str, str, _Launch, _SymExprs]: ...

    with pytest.raises(ValueError, match=r"aot_impl: parameters .* expects \['x', 'group_size', 'symmetric'"):
        check_plugin_functions(register2, None, aot_subset, trtp)
    check_plugin_functions(register2, None, aot_all, trtp)


@pytest.mark.parametrize("module", ["w4a16_gemm", "w4a4_fp4_gemm"])
def test_gemm_aot_impl_launch_is_launch_params(module, monkeypatch):
    import importlib

    trt_module = importlib.import_module(f"trtcompress.plugins.{module}.trt")
    monkeypatch.setattr(trt_module, "compile_ptx", lambda *a, **k: ("entry", "// ptx", 4096))
    register, autotune, aot_impl = trt_module.plugin_functions(_stub_trtp())
    x, w = _Desc(37, 576), _Desc(1536, 288)
    if module == "w4a16_gemm":
        inputs = [x, w, _Desc(1536, 5), _Desc(1, 1)]
    else:
        inputs = [x, w, _Desc(1536, 1), _Desc(1), _Desc(576)]
    attrs = [128, 1] if module == "w4a16_gemm" else [2, 1, 2, 1, 0]
    assert list(register(*inputs, *attrs).shape_expr) == [37, 1536]  # shape inference
    (combo,) = autotune(*inputs, *attrs, outputs=None)
    assert combo.tactics == list(gemm_trt.TACTICS) and len(combo.io_types.split(",")) == len(inputs) + 1
    for tactic in gemm_trt.TACTICS:
        name, ptx, launch, extra = aot_impl(*inputs, *attrs, outputs=None, tactic=tactic)
        want = gemm_trt.launch_params(37, 1536, 576, tactic, 4096)
        assert (name, ptx) == (b"entry", b"// ptx")
        got = (launch.grid_x, launch.grid_y, launch.block_x, launch.shared_mem, tuple(extra))
        assert got == (want.grid_x, want.grid_y, want.block_x, want.shared_mem, want.extra_args)


def test_gear_aot_impl_launch_and_types(monkeypatch):
    from trtcompress.plugins.gear_attention import trt as gear
    from trtcompress.plugins.gear_attention.trt import CompiledPlugin

    seen = {}

    def fake_compile(layout, heads, q_heads, head_dim, sm_scale, arch=90):
        seen.update(layout=layout, shape=(heads, q_heads, head_dim))
        return CompiledPlugin("gear_decode_trt_kernel", "// ptx", 4, 20480, heads)

    monkeypatch.setattr(gear, "compile_gear_attention_ptx", fake_compile)
    _, autotune, aot_impl = gear.plugin_functions(_stub_trtp())
    tails, sinks = [_Desc(4, 3, 64, 64)] * 2, [_Desc(4, 3, 1, 64)] * 2
    inputs = [_Desc(2, 9, 64), _Desc(2, 7), *[_Desc(2)] * 3, *[_Desc(1)] * 24, *tails, *sinks]
    assert len(inputs) == len(gear.INPUT_NAMES) == 33
    attrs = dict(bits=2, block=64, group=64, out_k=41, out_v=41, rank_k=1, rank_v=0, int8_factors=1,
                 int4_factors=0, block_outliers=1, sink=1, outlier_dtype="fp8", scales_fp8=0,
                 sm_scale=0.125)  # fmt: skip
    name, _, launch, extra = aot_impl(*inputs, **attrs, outputs=None, tactic=0)
    assert name == b"gear_decode_trt_kernel" and seen["shape"] == (3, 9, 64)
    assert seen["layout"].outlier_scope == "block" and seen["layout"].rank == (1, 0)
    layout = seen["layout"]
    assert layout.sink == 1 and layout.outlier_dtype == "fp8" and layout.outlier_scaled
    assert (launch.grid_x, launch.grid_y, launch.block_x, launch.shared_mem) == (2, 3, 128, 20480)
    assert tuple(extra) == (7,)  # max blocks per sequence
    tune = {k: v for k, v in attrs.items() if k not in ("bits", "block", "group", "sink", "sm_scale")}
    (combo,) = autotune(*inputs, **tune, outputs=None)
    types = [t.strip() for t in combo.io_types.split(",")]
    assert len(types) == 34 and types[-1] == "FP32" and types[29:33] == ["FP16"] * 4  # tails, sinks
    # keys: fp8 outlier values travel as INT8 bits, their block scales as FP16
    key = ["UINT8", "FP16", "FP16", "INT8", "FP16", "INT8", "FP16", "INT8", "FP16", "FP16", "FP16", "FP16"]
    assert types[5:17] == key
    assert types[17:29] == ["UINT8", "FP16", "FP16", "INT8", *["FP16"] * 8]  # no value rank
    fp16_values = gear.io_types(41, 41, 1, 0, 1, 1, "fp16").split(", ")
    assert fp16_values[8] == "FP16" and fp16_values[20] == "FP16"
    fp8_scales = gear.io_types(41, 41, 1, 0, 1, 1, "fp8", 0, 1).split(", ")
    assert fp8_scales[6:8] == fp8_scales[18:20] == ["INT8", "INT8"]  # fp8 scale / zero bits
    with pytest.raises(ValueError, match="outlier_dtype must be one of"):
        aot_impl(*inputs, **{**attrs, "outlier_dtype": "fp4"}, outputs=None, tactic=0)
    with pytest.raises(ValueError, match="block-scope outliers"):
        aot_impl(*inputs, **{**attrs, "block_outliers": 0}, outputs=None, tactic=0)
    with pytest.raises(ValueError, match="int4 factors are integer codes"):
        aot_impl(*inputs, **{**attrs, "int4_factors": 1, "int8_factors": 0}, outputs=None, tactic=0)
    aot_impl(*inputs, **{**attrs, "int4_factors": 1}, outputs=None, tactic=0)
    assert seen["layout"].int4_factors
    int4 = gear.io_types(41, 41, 1, 0, 1, 1, "fp8", 1).split(", ")
    assert int4[10] == int4[12] == "UINT8" and int4[22] == "FP16"  # key factors packed, no value rank
    group_scope = gear.io_types(41, 41, 1, 0, 1, 0).split(", ")
    assert group_scope[9] == "UINT8"  # group-scope outlier indices are uint8


def _fake_modules(monkeypatch, **modules) -> None:
    import types

    for name, attrs in modules.items():
        module = types.ModuleType(name.replace("__", "."))
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_tensorrt_without_aot_impl_is_refused(monkeypatch):
    """`tensorrt.plugin.aot_impl` first shipped in TensorRT 10.9; 10.8's tensorrt.plugin has only @impl."""
    from trtcompress.plugins.gear_attention import trt as gear

    plugin_10_8 = dict(register=None, autotune=None, impl=None, TensorDesc=_Desc)
    _fake_modules(monkeypatch, tensorrt={"__version__": "10.8.0"}, tensorrt__plugin=plugin_10_8)
    with pytest.raises(
        MissingDependencyError, match=r"TensorRT >= 10\.9.*TensorRT 10\.8\.0 has no .*aot_impl"
    ):
        gemm_trt.import_trt()
    with pytest.raises(MissingDependencyError, match=r"TensorRT 10\.8\.0 has no tensorrt\.plugin\.aot_impl"):
        gear.register_trt_plugin()


@pytest.mark.parametrize("module", ["w4a16_gemm", "w4a4_fp4_gemm"])
def test_gemm_kernel_without_triton_says_what_to_install(module, monkeypatch):
    """triton is the `kernels` extra: without it a GEMM plugin's PTX is a MissingDependencyError naming the
    install command, not "kernel module not available" (which `python -m ...aot` reported with exit 0)."""
    import importlib

    trt_module = importlib.import_module(f"trtcompress.plugins.{module}.trt")
    for name in [m for m in sys.modules if m.endswith("_gemm.kernel") or m.split(".")[0] == "triton"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ModuleNotFoundError
    with pytest.raises(MissingDependencyError, match=r"pip install triton==3\.6\.0"):
        trt_module.kernel()


# TensorRT-LLM's `python_plugin` (not installable here), as far as the plugin classes meet it: `ShapeExpr`
# holds symbolic dims (not ints) at build time and none during dtype inference, where its __getitem__
# never raises IndexError; `SymTensor` takes a ShapeExpr or a list of ints; `trtllm_plugin` needs the
# SymTensor class as return annotation or `plugin_num_outputs`.


class _LlmShapeExpr:
    def __init__(self, dims):
        self._dims, self.reads = (None if dims is None else list(dims)), 0

    def __getitem__(self, index):
        if self._dims is None:
            self.reads += 1
            if self.reads > 64:
                raise RuntimeError("iterating a ShapeExpr without dims never ends")
            return "unknown"
        return self._dims[index]

    def __setitem__(self, index, value):
        if self._dims is not None:
            assert index < len(self._dims)
            self._dims[index] = value

    def __len__(self):
        return 0 if self._dims is None else len(self._dims)


class _SymTensor:
    def __init__(self, dtype, shape):
        assert isinstance(shape, (_LlmShapeExpr, list, tuple))
        assert isinstance(shape, _LlmShapeExpr) or all(isinstance(d, int) for d in shape)
        self.dtype, self.shape = dtype, shape


def _trtllm_plugin(name, *, plugin_num_outputs=None):
    import inspect

    def wrap(cls):
        annotation = inspect.signature(cls.shape_dtype_inference).return_annotation
        assert annotation is _SymTensor or plugin_num_outputs is not None, "Must specify `num_outputs`"
        return cls

    return wrap


def test_trtllm_python_plugins_follow_trtllm_plugin_rules(monkeypatch):
    from trtcompress.plugins import trtllm_python

    _fake_modules(
        monkeypatch,
        tensorrt_llm={"PluginBase": object},
        tensorrt_llm__python_plugin=dict(
            SymTensor=_SymTensor, convert_to_torch_tensor=None, trtllm_plugin=_trtllm_plugin
        ),
    )
    monkeypatch.setattr(trtllm_python, "_classes", {})
    classes = trtllm_python.register_trtllm_plugins()
    assert set(classes) == {"w4a16", "w4a4"}
    for cls in classes.values():
        symbolic = [
            _SymTensor("fp16", _LlmShapeExpr(["B", "T", "K"])),
            _SymTensor("u8", _LlmShapeExpr(["N", "K/2"])),
        ]
        out = cls.shape_dtype_inference(None, symbolic)  # get_output_shapes
        assert out.dtype == "fp16" and out.shape._dims == ["B", "T", "N"]
        unknown = [_SymTensor("fp16", _LlmShapeExpr(None)), _SymTensor("u8", _LlmShapeExpr(None))]
        assert cls.shape_dtype_inference(None, unknown).dtype == "fp16"  # get_output_data_types
        eager = cls.shape_dtype_inference(None, [_SymTensor("fp16", [3, 576]), _SymTensor("u8", [1536, 288])])
        assert eager.shape == [3, 1536]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_trtllm_build_without_trtllm_says_what_to_install():
    from trtcompress.plugins.trtllm_build import main

    with pytest.raises(MissingDependencyError, match=r"tensorrt_llm==1\.2\.1.*Dockerfile\.gpu"):
        main()
