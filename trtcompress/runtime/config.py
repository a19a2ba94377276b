"""The recipe's `deploy:` section: how the native runtime batches, and what the generated Triton model
repositories say (`native`, `trtllm`, `llmapi`). Names follow TensorRT-LLM's Triton parameters where one
exists (`max_batch_size`, `max_num_tokens`, `batch_scheduler_policy`, `kv_cache_free_gpu_mem_fraction`,
`max_tokens_in_paged_kv_cache`, `enable_chunked_context`, `exclude_input_in_output`), so a recipe means
the same thing whichever engine serves it. No torch import here: `recipe.py` loads this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SchedulerPolicy = Literal["guaranteed_no_evict", "max_utilization"]


class DeployConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(
        "tensorrt_llm",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Triton model name (tensorrt_llm = the name TensorRT-LLM's LLM-API model uses)",
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="sequences in flight (the running batch)")
    max_num_tokens: int = Field(
        512, ge=2, description="token budget of one forward step (decode tokens + prefill chunks)"
    )
    max_seq_len: int = Field(1024, ge=2, description="prompt + generated tokens of one sequence")
    enable_chunked_context: bool = Field(True, description="split long prompts into chunks across steps")
    context_chunk_size: int = Field(128, ge=1, description="prompt tokens per chunk (chunked context)")
    batch_scheduler_policy: SchedulerPolicy = Field(
        "guaranteed_no_evict",
        description="guaranteed_no_evict: admit only what fits to the end; max_utilization: admit while "
        "blocks are free, preempt (and later resume) the newest sequence when the cache runs out",
    )
    max_tokens_in_paged_kv_cache: int = Field(
        16384, ge=16, description="KV-cache capacity in tokens (native: the block pool; TensorRT-LLM: a cap)"
    )
    kv_cache_free_gpu_mem_fraction: float = Field(
        0.9, gt=0, le=1, description="GPU memory fraction for the KV cache (trtllm / llmapi repositories)"
    )
    enable_kv_cache_reuse: bool = Field(False, description="prefix reuse (trtllm repository only)")
    decoupled: bool = Field(True, description="streaming responses (Triton decoupled transaction policy)")
    exclude_input_in_output: bool = Field(True, description="text_output holds only the generated text")
    num_threads: int = Field(  # le: torch.set_num_threads overflows past 2**31 - 1 (a traceback at load)
        0, ge=0, le=4096, description="native runtime torch threads; 0 = torch's default"
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:[0-9]+)?)$",
        description="native runtime device: cpu, or cuda[:N] (weights, paged KV cache and attention on the "
        "GPU; 4-bit linears through the W4A16 / W4A4 kernels)",
    )
    cuda_graphs: bool = Field(
        False,
        description="native runtime on CUDA with a KV cache a fused decode kernel reads (fp16, or 2/4-bit "
        "KIVI/GEAR with blocks of one key group): replay steps of decode tokens only from CUDA graphs "
        "captured per batch size (1, 2, 4, ... max_batch_size), one launch instead of a kernel per operation",
    )
    kv_decompressed_cache_mb: float = Field(
        64,
        ge=0,
        allow_inf_nan=False,  # .inf passed ge=0, then the engine failed converting it to bytes
        description="native runtime: bytes (MiB) of decompressed KV blocks kept between steps, shared by "
        "all sequences (attention otherwise decompresses every block at every step); 0 = none",
    )
    gemm_tile: int = Field(
        0,
        ge=0,
        le=1024,
        description="0: one GEMM per layer and step, padded to 4 rows (checked batch-invariant at start, "
        "else 16); N: fixed N-row GEMM tiles (results never depend on the batch whatever the BLAS; on CUDA "
        "the 4-bit ops too, which otherwise run whole unless their start-up probe finds them batch-variant)",
    )
    cpu_gemm: Literal["auto", "onednn", "blas"] = Field(
        "auto",
        description="native runtime on CPU, dense GEMMs: onednn (weights reordered once at load; 2.3-3.6x "
        "MKL on an AVX-512 AMD CPU), blas (F.linear: MKL / OpenBLAS), auto = onednn where torch has it",
    )
    engine_dir: str | None = Field(
        None, description="TensorRT-LLM engine directory for the trtllm repository (default: ARTIFACT/engine)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="llmapi / trtllm: tensor-parallel ranks")
    pipeline_parallel_size: int = Field(1, ge=1, description="llmapi / trtllm: pipeline-parallel ranks")

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens one step may take for one sequence."""
        return self.context_chunk_size if self.enable_chunked_context else self.max_seq_len

    @field_validator("model_name")
    @classmethod
    def _not_a_path(cls, v: str) -> str:
        if v in (".", ".."):  # the model's directory in the repository: never the repository or above it
            raise ValueError(f"model_name {v!r} names a directory, not a model")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DeployConfig:
        # Every step must be able to run all in-flight decodes plus one prefill chunk, so a new request
        # always joins within a step of arriving (no starvation behind a full batch).
        need = self.max_batch_size + self.prefill_chunk
        if self.max_num_tokens < need:
            what = "context_chunk_size" if self.enable_chunked_context else "max_seq_len (chunking is off)"
            raise ValueError(
                f"max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size + {what} = {need}"
            )
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graphs needs device: cuda (device is {self.device!r})")
        if self.max_tokens_in_paged_kv_cache < self.max_seq_len:
            raise ValueError(
                f"max_tokens_in_paged_kv_cache ({self.max_tokens_in_paged_kv_cache}) must hold one sequence "
                f"of max_seq_len ({self.max_seq_len}) tokens"
            )
        return self
