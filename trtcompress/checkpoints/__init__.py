"""Artifact writers and readers: native (here); TensorRT-LLM and HF quantized exports come later."""
