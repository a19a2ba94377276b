"""Weight formats a CompressedLinear can hold, named and (de)serialisable for the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCALE_ENCODINGS = ("fp16", "e4m3", "e8m0")


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


@dataclass(frozen=True)
class FpFormat:
    """Sign-exponent-mantissa (ExMy) element codes times one scale per group (see fpgrid.py).

    `scale_encoding` says how the group scales are stored:
    - "fp16": one fp16 scale per group (LLM-FP4's real-valued exponent bias b, stored as s = 2**(b0 - b));
    - "e4m3": float8 E4M3 block scales times one fp32 tensor scale (NVFP4: E2M1, block 16);
    - "e8m0": uint8 E8M0 power-of-two block scales (MXFP4: E2M1, block 32).
    """

    exp_bits: int
    man_bits: int
    group_size: int  # input channels per scale; 0 = one scale per output channel
    scale_encoding: str = "fp16"

    kind = "fp"
    symmetric = True  # sign-magnitude grid, never a zero point

    def __post_init__(self) -> None:
        if self.exp_bits < 1 or self.man_bits < 0 or not 3 <= self.bits <= 8:
            raise ValueError(
                f"FP formats need >= 1 exponent bit and 3..8 bits in all, "
                f"got E{self.exp_bits}M{self.man_bits}"
            )
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.scale_encoding not in SCALE_ENCODINGS:
            raise ValueError(f"scale_encoding must be one of {SCALE_ENCODINGS}, got {self.scale_encoding!r}")
        if self.scale_encoding != "fp16" and self.group_size == 0:
            raise ValueError(f"{self.scale_encoding} block scales need a block size (group_size > 0)")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def element(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def name(self) -> str:
        if (self.element, self.group_size, self.scale_encoding) == ("e2m1", 16, "e4m3"):
            return "nvfp4"
        if (self.element, self.group_size, self.scale_encoding) == ("e2m1", 32, "e8m0"):
            return "mxfp4"
        group = "ch" if self.group_size == 0 else f"g{self.group_size}"
        suffix = "" if self.scale_encoding == "fp16" else f"_{self.scale_encoding}"
        return f"fp{self.bits}_{self.element}_{group}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "exp_bits": self.exp_bits,
            "man_bits": self.man_bits,
            "group_size": self.group_size,
            "scale_encoding": self.scale_encoding,
        }


NVFP4 = FpFormat(2, 1, 16, "e4m3")
MXFP4 = FpFormat(2, 1, 32, "e8m0")

WeightFormat = IntFormat | FpFormat


def format_from_dict(data: dict[str, Any]) -> WeightFormat:
    kind = data.get("kind")
    if kind == "int":
        return IntFormat(
            bits=int(data["bits"]), group_size=int(data["group_size"]), symmetric=bool(data["symmetric"])
        )
    if kind == "fp":
        return FpFormat(
            exp_bits=int(data["exp_bits"]),
            man_bits=int(data["man_bits"]),
            group_size=int(data["group_size"]),
            scale_encoding=str(data["scale_encoding"]),
        )
    raise ValueError(f"unknown weight format kind {kind!r}")
