"""Bit packing of unsigned integer codes.

Layout (the canonical one every exporter reads): codes of `bits` bits are packed LSB-first into a
little-endian bit stream along the last dimension, so for 4 bits element 2k sits in the low nibble of
byte k and element 2k+1 in the high nibble; 8-bit codes are stored as they are. A row of n codes takes
ceil(n * bits / 8) bytes, and rows never share a byte.
"""

from __future__ import annotations

import torch


def packed_length(n: int, bits: int) -> int:
    """Bytes that one row of `n` codes of `bits` bits occupies."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values < 2**bits) along the last dim into uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    # An out-of-range code would wrap (negative, >= 256) or spill into its neighbour's bits: refuse it.
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{lo}, {hi}]")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    n = codes.shape[-1]
    if bits == 4:
        if n % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    # General case: expand to a bit stream, then gather 8 bits per byte.
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.unflatten(-1, (-1, 8))
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: returns uint8 codes with last dim `n`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8:  # int8 would shift in sign bits: negative codes
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"packed row has {packed.shape[-1]} bytes, expected {packed_length(n, bits)} "
            f"for {n} x {bits}-bit codes"
        )
    if bits == 8:
        return packed
    if bits == 4:
        out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
        return out[..., :n]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * bits]
    stream = stream.unflatten(-1, (n, bits)).to(torch.int32)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(-1).to(torch.uint8)
