"""Weight formats a CompressedLinear can hold, named and (de)serialisable for the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer grid, one fp16 scale (and a uint8 zero point if asymmetric) per group."""

    bits: int
    group_size: int  # 0 = one group per output channel
    symmetric: bool

    kind = "int"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"integer formats need 2..8 bits, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")

    @property
    def name(self) -> str:
        group = "ch" if self.group_size == 0 else f"g{self.group_size}"
        return f"int{self.bits}_{group}_{'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
        }


def format_from_dict(data: dict[str, Any]) -> IntFormat:
    kind = data.get("kind")
    if kind == "int":
        return IntFormat(
            bits=int(data["bits"]), group_size=int(data["group_size"]), symmetric=bool(data["symmetric"])
        )
    raise ValueError(f"unknown weight format kind {kind!r}")
