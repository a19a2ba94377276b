"""The recipe's `kv_cache:` section: which codec the evaluation and the native runtime decode with."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trtcompress.errors import RecipeError

# Kept in sync with the registry by tests/kv/test_eval_kv.py (importing torch here would slow the CLI).
CODEC_NAMES = ("fp16", "int8", "fp8", "kivi-2bit", "kivi-3bit", "kivi-4bit", "gear-2bit", "gear-4bit")
# An artifact's or a recipe's options stay when `--kv` / `--set kv_cache.codec` names another codec.
_CLEAR_OPTIONS = " (options set for another codec? `--set kv_cache.options={}` clears them)"


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
            raise ValueError(f"kv_cache.options needs a kv_cache.codec{_CLEAR_OPTIONS}")
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
                + ("" if did_you_mean else _CLEAR_OPTIONS)
            )
        try:
            codec = get_codec(name, **self.options)
            codec.check_block(self.block_size)  # the head dim is checked when the cache is built
        except TypeError as exc:
            raise ValueError(f"options for codec {self.codec!r}: {exc}") from None
        return codec

    def check_context(self, context: int) -> None:
        """Refuse a perplexity window no longer than one cache block for a lossy codec: each window's
        tokens would attend only to the exact fp16 tail (its one block is compressed after its last
        token), so `ppl_ratio` would read 1 for any codec while the bytes counted the fp16 tail."""
        if self.codec not in (None, "fp16") and context <= self.block_size:
            raise ValueError(
                f"eval.context ({context}) must be longer than kv_cache.block_size ({self.block_size}) to "
                f"measure codec {self.codec}: no perplexity token would attend to a compressed block; use a "
                "longer eval.context or a smaller block_size"
            )

    def check_model(self, model: Any, context: int | None = None) -> None:
        """Refuse, before any compression or evaluation, what the codec cannot store for this model (a
        rank above its head dim, codes that do not fill whole bytes of a head, ...) and, with `context`,
        sequences the cache decoder cannot attend exactly (a sliding window shorter than the context)."""
        if self.codec is None:
            return
        from trtcompress.kv.decode import model_head_dim
        from trtcompress.models.layout import check_exact_attention

        try:
            codec, dim = self.build_codec(), model_head_dim(model)
            codec.check_block(self.block_size, dim)
            for kind in ("k", "v"):  # every field the cache would allocate for this head dim
                codec.layout(kind, self.block_size, dim)
            if context is not None:
                who, fix = "compressed-KV decoding", "use a context of at most {} tokens"
                check_exact_attention(model, context, who, fix)
                self.check_context(context)
        except (ValueError, NotImplementedError) as exc:
            raise RecipeError(f"kv_cache: {exc}") from None
