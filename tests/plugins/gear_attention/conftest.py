"""Run the Triton kernels with the interpreter on CPU. `triton.jit` reads TRITON_INTERPRET when a
kernel is decorated, so this must happen before the kernel module is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
