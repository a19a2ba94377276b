"""The CPU PTX emulator the kernel tests rely on (`ptx_emulation.py`): its instructions against values
worked out from the PTX ISA, and its refusal of what it cannot emulate faithfully."""

from __future__ import annotations

import numpy as np
import pytest

from tests.plugins.ptx_emulation import U, emulate_inline_asm, prmt, run_ptx


def test_prmt_picks_bytes_of_b_a() -> None:
    a, b = U(0x33221100), U(0x77665544)
    assert int(prmt(a, b, 0x5410)) == 0x55441100  # the low halves of a and b
    assert int(prmt(a, b, 0x7632)) == 0x77663322  # the high halves
    assert int(prmt(a, U(0), 0x4140)) == 0x00110000  # bytes a0, b0, a1, b0 (low to high), b = 0
    with pytest.raises(AssertionError, match="replicates signs"):
        prmt(a, b, 0x8000)


def test_bit_ops_and_fp16x2_math() -> None:
    regs = {"$1": np.array([0x12345678], dtype=U), "$2": np.array([0x3C003C00], dtype=U)}  # (1.0, 1.0)
    asm = """lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA;
shr.b32 u, $1, 4;
and.b32 v, $1, 0x00FF00FF;
fma.rn.f16x2 w, $2, $2, $2;
mov.b32 {lo, hi}, w;
cvt.f32.f16 f, lo;
add.f32 $0, f, f;"""
    out = run_ptx(asm, regs)
    assert int(out["t"][0]) == 0x64046408  # nibbles 8 and 4 under the 1024.0 exponent
    assert int(out["u"][0]) == 0x01234567  # logical shift
    assert int(out["v"][0]) == 0x00340078
    assert int(out["w"][0]) == 0x40004000  # 1 * 1 + 1 = 2.0 in both halves
    assert out["$0"][0] == np.float32(4.0)


def test_fma_rounds_once() -> None:
    # (1 + 2^-10) * (1 + 2^-10) + 2^-11: exact 1 + 2^-9 + 2^-20 + 2^-11; rounded once to fp16 (11 bits)
    # it is 1 + 2^-9 + 2^-10 (the 2^-11 tie broken up by 2^-20), rounding the product first gives 1 + 2^-9
    x = np.array([1 + 2**-10], dtype=np.float16).view(np.uint16).astype(U)
    c = np.array([2**-11], dtype=np.float16).view(np.uint16).astype(U)
    regs = {"$1": x | x << U(16), "$2": c | c << U(16)}
    out = run_ptx("fma.rn.f16x2 $0, $1, $1, $2;", regs)["$0"]
    got = (out & U(0xFFFF)).astype(np.uint16).view(np.float16)[0]
    assert got == np.float16(1 + 2**-9 + 2**-10)


def test_unknown_instructions_and_lane_mixing_are_refused() -> None:
    with pytest.raises(AssertionError, match="unexpected PTX"):
        run_ptx("min.u32 $0, $1, $1;", {"$1": np.zeros(1, dtype=U)})
    data = np.arange(8, dtype=np.uint8)
    lanewise = emulate_inline_asm("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [data], [np.uint8], 4)[0]
    np.testing.assert_array_equal(lanewise, data & 0x0F)
    with pytest.raises(AssertionError, match="mixes the elements"):  # swaps bytes within a register
        emulate_inline_asm("prmt.b32 $0, $1, 0, 0x0123;", "=r,r", [data], [np.uint8], 4)
