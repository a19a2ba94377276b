"""LLM-FP4 W4A4 GEMM: FP4 weights x activations quantized to FP4 in the kernel (tensor-wise scale and
per-channel power-of-two pre-shift), one FP GEMM. Hopper has no FP4 tensor cores: both operands are
dequantized in registers and multiplied in fp16 with fp32 accumulation (exact for 4-bit operands).

`reference.py` (plain torch), `kernel.py` (OpenAI Triton), `op.py` (`torch.ops.trtcompress.w4a4_fp4_gemm`),
`trt.py` (the TensorRT plugin).
"""
