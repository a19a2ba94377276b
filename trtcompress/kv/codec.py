"""The KVCodec interface and the codec registry.

A codec compresses one *block* of keys or values: a tensor `(..., H, T, D)` (any leading batch of
blocks, `H` KV heads, `T` tokens = the cache block size, `D` head dim) into named fields, each a
tensor `(..., H, *field_shape)`. The field shapes and dtypes depend only on `(kind, T, D)`, so a paged
cache can preallocate one pool tensor per field and the block bytes are exact: every field is a
stored tensor, metadata included (scales, zero points, outlier values and indices, low-rank factors).
"""

from __future__ import annotations

import difflib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Kind = Literal["k", "v"]
Fields = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FieldSpec:
    shape: tuple[int, ...]  # per KV head
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class KVCodec(ABC):
    """Compress ⇄ decompress a block of keys or values; report its exact size in bytes."""

    name: str = ""
    #: The cache block size must be a multiple of this (keys quantized per channel need whole token groups).
    token_group: int = 1
    #: Decompression is a cast or one scale per token: as cheap as copying an already decompressed
    #: block, so the runtime keeps no decompressed copies of this codec's blocks for decode steps.
    elementwise: bool = False

    @abstractmethod
    def layout(self, kind: Kind, tokens: int, dim: int) -> dict[str, FieldSpec]:
        """The fields of one block for one KV head."""

    @abstractmethod
    def compress(self, x: torch.Tensor, kind: Kind, *, phase: str = "decode") -> Fields:
        """`x`: `(..., H, T, D)` -> fields `(..., H, *shape)` as in `layout`.

        `phase` is "prefill" for blocks of a prompt and "decode" for blocks filled by generation
        (GEAR may use a different low-rank rank for each; the slot is sized for the larger).
        """

    @abstractmethod
    def decompress(self, fields: Fields, kind: Kind, tokens: int, dim: int) -> torch.Tensor:
        """fields -> float32 `(..., H, T, D)`."""

    def decompress_into(self, fields: Fields, kind: Kind, tokens: int, dim: int, out: torch.Tensor) -> None:
        """`decompress` written into `out` (float32, same number of blocks, any strides)."""
        out.copy_(self.decompress(fields, kind, tokens, dim).reshape(out.shape))

    def block_bytes(self, kind: Kind, tokens: int, dim: int, heads: int = 1) -> int:
        return heads * sum(spec.nbytes for spec in self.layout(kind, tokens, dim).values())

    def bytes_per_token(self, tokens: int, dim: int, heads: int = 1) -> float:
        """Keys + values, per token, for full blocks of `tokens` tokens (no recent-token buffer)."""
        return (
            self.block_bytes("k", tokens, dim, heads) + self.block_bytes("v", tokens, dim, heads)
        ) / tokens

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def check_block(self, tokens: int, dim: int | None = None) -> None:
        """Raise ValueError where blocks of `tokens` tokens and head dim `dim` (None: not known yet, as
        when a recipe is validated) cannot be stored."""
        if tokens % self.token_group:
            raise ValueError(
                f"codec {self.name}: the cache block ({tokens} tokens) must be a multiple of "
                f"{self.token_group} tokens"
            )


CODEC_FACTORIES: dict[str, Callable[..., KVCodec]] = {}


def register_codec(name: str) -> Callable[[Callable[..., KVCodec]], Callable[..., KVCodec]]:
    def decorator(factory: Callable[..., KVCodec]) -> Callable[..., KVCodec]:
        CODEC_FACTORIES[name] = factory
        return factory

    return decorator


def codec_names() -> list[str]:
    return list(CODEC_FACTORIES)


def codec_options(name: str) -> list[str]:
    """The option names codec `name` accepts: the parameters of the class its factory builds (a factory
    records it as `codec_class`), less `bits` and `name`, which the codec's name sets."""
    factory = CODEC_FACTORIES[name]
    cls = getattr(factory, "codec_class", factory)
    params = inspect.signature(cls.__init__).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return sorted(p.name for p in params if p.kind not in variadic and p.name not in ("self", "bits", "name"))


def get_codec(name: str, **options: Any) -> KVCodec:
    """A codec by its registered name; `options` override its defaults (e.g. `rank=4`)."""
    if name not in CODEC_FACTORIES:
        hint = difflib.get_close_matches(name, CODEC_FACTORIES, 1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown KV codec {name!r}{did_you_mean}; known: {', '.join(CODEC_FACTORIES)}")
    return CODEC_FACTORIES[name](**options)
