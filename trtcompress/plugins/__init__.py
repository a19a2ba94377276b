"""Kernels: one folder per kernel (reference.py, kernel.py, op.py, trt.py); see DESIGN.md."""
