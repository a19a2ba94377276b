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
        "fp8 = layout_for_codec(get_codec('gear-2bit', outlier_dtype='fp8'))\n"
        "try:\n"  # one-byte outlier values: the plugin reads fp16 ones, and says so
        "    compile_gear_attention_ptx(fp8, 3, 9, 64, 0.1)\n"
        "except ValueError as exc:\n"
        "    assert 'outlier_dtype: fp16' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a one-byte outlier layout compiled for the plugin')\n"
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
        # 25 input pointers + 1 int32 extra arg + 1 output (+ Triton's scratch pointers)
        assert entry.count(".param") >= 27
        assert out["warps"] >= 1


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_register_without_tensorrt_names_what_to_install() -> None:
    from trtcompress.plugins.gear_attention.trt import register_trt_plugin

    with pytest.raises(MissingDependencyError, match=r"TensorRT >= 10\.8"):
        register_trt_plugin()
