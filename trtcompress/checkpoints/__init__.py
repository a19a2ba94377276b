"""Artifact writers and readers: native (native.py), TensorRT-LLM checkpoint (trtllm.py, trtllm_layout.py),
HF quantized checkpoint (hf_quant.py), ModelOpt import (modelopt_import.py)."""
