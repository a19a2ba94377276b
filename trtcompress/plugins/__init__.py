"""Kernels: one folder per kernel (reference.py, kernel.py, op.py, trt.py); the README describes them."""
