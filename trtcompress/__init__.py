"""trtcompress: compress LLMs, measure the cost, deploy on TensorRT-LLM and Triton."""

__version__ = "0.1.0"
