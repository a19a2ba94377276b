"""The evaluation protocol, as a recipe section. Defaults = REFERENCE section 2, so numbers line up
with the anchors measured there (fp32 SmolLM2-135M: ppl 19.55, GSM8K gold-answer bpb 0.748)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="evaluate the compressed model during build")
    reference: bool = Field(True, description="compare against the uncompressed model (ppl_ref, KL, top-1)")
    ppl_tokens: int = Field(4096, ge=2, description="tokens of BoolQ passages in the perplexity window")
    context: int = Field(1024, ge=2, description="perplexity window length (non-overlapping windows)")
    gsm8k_problems: int = Field(
        64, ge=0, le=1319, description="first N GSM8K test problems scored on gold answers"
    )
    gsm_symbolic_problems: int = Field(
        16, ge=0, le=10_000, description="reasoning-gym gsm_symbolic problems (second set)"
    )  # le: generated one by one (10^30 was an OverflowError traceback in reasoning-gym, 10^9 hours)
    gsm_symbolic_seed: int = Field(42, description="seed of the gsm_symbolic generator")
    gsm8k_generate: int = Field(
        0, ge=0, le=1319, description="problems for greedy 8-shot exact match (slow; 0 = off)"
    )  # le: past the 1,319 test problems the score would silently cover fewer than asked
    max_new_tokens: int = Field(256, ge=1, description="generation budget for exact match")
    batch_size: int = Field(4, ge=1, description="problems per forward pass")

    @model_validator(mode="after")
    def _window_fits(self) -> EvalConfig:
        if self.ppl_tokens < self.context:
            raise ValueError(
                f"ppl_tokens ({self.ppl_tokens}) must be at least one window of context ({self.context})"
            )
        if self.ppl_tokens % self.context:  # the windows are whole: a remainder was dropped unscored
            whole = self.ppl_tokens // self.context * self.context
            raise ValueError(
                f"ppl_tokens ({self.ppl_tokens}) must be a whole number of windows of context "
                f"({self.context}); use {whole} or {whole + self.context}"
            )
        return self
