"""Run the Triton kernels with the interpreter on CPU. `triton.jit` reads TRITON_INTERPRET when a
kernel is decorated, so this must happen before the kernel module is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


@pytest.fixture
def emulated_ptx(monkeypatch):
    """The kernels' PTX paths (DEQ_ASM) under TRITON_INTERPRET: inline assembly run by the CPU PTX
    emulator (tests/plugins/ptx_emulation.py) instead of the integer twins the interpreter takes."""
    from tests.plugins.ptx_emulation import interpreted_inline_asm
    from trtcompress.plugins.w4a16_gemm import kernel

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a CUDA machine runs the PTX itself")
    monkeypatch.setattr(kernel, "_interpreting", lambda: False)  # only picks DEQ_ASM and the bf16 dots
    with interpreted_inline_asm():
        yield
