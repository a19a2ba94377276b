"""The TensorRT plugin: PTX compiled ahead of time from the Triton kernel (on CPU), and a clear error
where TensorRT is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from trtcompress.errors import MissingDependencyError


def test_aot_ptx_for_sm90() -> None:
    # A fresh interpreter: AOT compilation needs the real (not interpreted) triton.jit kernel.
    code = (
        "import json\n"
        "from trtcompress.kv import get_codec\n"
        "from trtcompress.plugins.gear_attention import layout_for_codec\n"
        "from trtcompress.plugins.gear_attention.trt import compile_gear_attention_ptx\n"
        "out = []\n"
        "for scope in ('block', 'group'):\n"
        "    layout = layout_for_codec(get_codec('gear-2bit', outlier_scope=scope))\n"
        "    c = compile_gear_attention_ptx(layout, 3, 9, 64, 0.125)\n"
        "    out.append({'name': c.name, 'ptx': c.ptx, 'warps': c.num_warps})\n"
        "fp8 = layout_for_codec(get_codec('gear-2bit', outlier_dtype='fp8'), 64, 1)\n"
        "c = compile_gear_attention_ptx(fp8, 3, 9, 64, 0.125)\n"  # one-byte outliers + a sink token
        "out.append({'name': c.name, 'ptx': c.ptx, 'warps': c.num_warps, 'fp8': True})\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for out in json.loads(proc.stdout):  # block-scope and group-scope outliers
        assert out["name"] == "gear_decode_trt_kernel"
        assert ".target sm_90" in out["ptx"]
        assert ".visible .entry gear_decode_trt_kernel(" in out["ptx"]
        entry = out["ptx"][out["ptx"].index(".entry") :]
        entry = entry[: entry.index(")")]
        # 33 input pointers + 1 int32 extra arg + 1 output (+ Triton's scratch pointers)
        assert entry.count(".param") >= 35
        assert out["warps"] >= 1
        if out.get("fp8"):  # the outlier values are read as E4M3 and converted in the kernel
            assert "e4m3" in out["ptx"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_register_without_tensorrt_names_what_to_install() -> None:
    from trtcompress.plugins.gear_attention.trt import register_trt_plugin

    with pytest.raises(MissingDependencyError, match=r"TensorRT >= 10\.9"):
        register_trt_plugin()
