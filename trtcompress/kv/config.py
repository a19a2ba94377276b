"""The recipe's `kv_cache:` section: which codec the evaluation and the native runtime decode with."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Kept in sync with the registry by tests/kv/test_eval_kv.py (importing torch here would slow the CLI).
CODEC_NAMES = ("fp16", "int8", "fp8", "kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit", "gear-4bit")


class KVCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: str | None = Field(
        None,
        description=f"KV-cache codec for generation-time evaluation: {', '.join(CODEC_NAMES)}; null = none",
    )
    block_size: int = Field(
        64, ge=16, le=1024, description="tokens per cache block (= fp16 streaming buffer)"
    )
    sink_tokens: int = Field(
        1, ge=0, description="first tokens of a sequence kept exact in fp16 (attention sink); 0 = none"
    )
    options: dict[str, float | int | str] = Field(
        default_factory=dict, description="codec parameters, e.g. {rank: 4, outlier_ratio: 0.04}"
    )

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str | None) -> str | None:
        if value is not None and value not in CODEC_NAMES:
            hint = difflib.get_close_matches(value, CODEC_NAMES, 1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown KV codec {value!r}{did_you_mean}; known: {', '.join(CODEC_NAMES)}")
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> KVCacheConfig:
        if self.options and self.codec is None:
            raise ValueError("kv_cache.options needs a kv_cache.codec")
        if self.sink_tokens >= self.block_size:
            raise ValueError(
                f"kv_cache.sink_tokens ({self.sink_tokens}) must be < block_size ({self.block_size})"
            )
        if self.codec is not None:
            self.build_codec()  # unknown or invalid options fail at recipe validation, not mid-evaluation
        return self

    def build_codec(self) -> Any:
        from trtcompress.kv import get_codec
        from trtcompress.kv.codec import codec_options

        name = self.codec or "fp16"
        allowed = codec_options(name)
        for key in self.options:
            if key in allowed or (key == "bits" and allowed):  # KIVI/GEAR name the codec of that width
                continue
            hint = difflib.get_close_matches(key, allowed, 1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            known = f"allowed options: {', '.join(allowed)}" if allowed else "it takes no options"
            raise ValueError(
                f"kv_cache.options.{key}: unknown option for codec {name!r}{did_you_mean}; {known}"
            )
        try:
            codec = get_codec(name, **self.options)
            codec.check_block(self.block_size)  # the head dim is checked when the cache is built
        except TypeError as exc:
            raise ValueError(f"options for codec {self.codec!r}: {exc}") from None
        return codec
