"""W4A16 GEMM: 4-bit weights (INT4 group-wise, or FP4 ExMy with group scales) x fp16/bf16 activations.

`reference.py` (plain torch, the definition), `kernel.py` (OpenAI Triton: a GEMV path for decode and
a `tl.dot` GEMM path for prefill, weights dequantized in registers), `op.py`
(`torch.ops.trtcompress.w4a16_gemm`, what the runtime calls), `trt.py` (the TensorRT plugin).
`reference.py` and `kernel.py` import only torch and triton, so `benchmarks/gemm_gpu.py` runs them on
a GPU box without the rest of trtcompress's dependencies.
"""
