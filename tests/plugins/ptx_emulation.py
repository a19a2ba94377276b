"""A CPU emulator of the straight-line PTX that the decode GEMVs inline (`tl.inline_asm_elementwise`), and
a hook that lets `TRITON_INTERPRET` run it: the interpreter itself refuses inline assembly, so without
this the kernels' PTX paths (DEQ_ASM) only ever ran on a GPU.

Registers are numpy arrays (one lane per element, so a whole tensor's instances run at once): .b32
values as uint64 holding 32 bits, .f16 as their 16 bits, .f32 as float32. fp16x2 math is done in
float64 and rounded once to fp16 (exact for add, sub and mul of fp16 inputs; fma rounded once as the
hardware does). Only the instructions the kernels use are known; anything else fails loudly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

U = np.uint64  # numpy 1.x mixes uint64 with Python ints into float64: every constant is a U
MASK32 = U(0xFFFFFFFF)
MASK16 = U(0xFFFF)


def _halves(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp16x2 register -> (low, high) as float64."""
    lo = (v & MASK16).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = ((v >> U(16)) & MASK16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(low, high) rounded to fp16 -> fp16x2 register."""
    lo16 = np.asarray(lo).astype(np.float16).view(np.uint16).astype(np.uint64)
    hi16 = np.asarray(hi).astype(np.float16).view(np.uint16).astype(np.uint64)
    return lo16 | hi16 << U(16)


def prmt(a: np.ndarray, b: np.ndarray, select: int) -> np.ndarray:
    """PTX prmt.b32 (default mode): byte k of the result = byte select[4k:4k+4] (0-7) of (b:a). A
    selector nibble with its sign-replicate bit (8) set is not emulated."""
    if any((select >> (4 * k)) & 8 for k in range(4)):
        raise AssertionError(f"prmt selector {select:#x} replicates signs: not emulated")
    both = (np.asarray(a, dtype=U) & MASK32) | (np.asarray(b, dtype=U) & MASK32) << U(32)
    out = np.zeros_like(both)
    for k in range(4):
        src = (select >> (4 * k)) & 7
        out |= ((both >> U(8 * src)) & U(0xFF)) << U(8 * k)
    return out


def _f16x2(op: str, args: list[np.ndarray]) -> np.ndarray:
    parts = [_halves(a) for a in args]
    lanes = []
    for lane in (0, 1):
        v = [p[lane] for p in parts]
        if op == "add":
            lanes.append(v[0] + v[1])
        elif op == "sub":
            lanes.append(v[0] - v[1])
        elif op == "mul":
            lanes.append(v[0] * v[1])
        else:  # fma
            lanes.append(v[0] * v[1] + v[2])
    return _pack(*lanes)


def run_ptx(asm: str, regs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Execute `asm` on `regs` (operands `$i` and named registers; updated in place and returned)."""
    shape = np.broadcast_shapes(*(np.shape(v) for v in regs.values())) if regs else ()

    def val(tok: str) -> np.ndarray:
        if tok[0].isdigit():
            return np.full(shape, int(tok, 0), dtype=U)
        return regs[tok]

    for raw in asm.splitlines():
        line = raw.split("//")[0].strip().rstrip(";").strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):  # unpack a .b32 into two .f16 registers
            dst, src = rest.split("}, ")
            lo_name, hi_name = (t.strip() for t in dst.strip("{").split(","))
            regs[lo_name], regs[hi_name] = val(src) & MASK16, (val(src) >> U(16)) & MASK16
            continue
        d, *a = (t.strip() for t in rest.split(","))
        if op == "lop3.b32":
            if a[3] != "0xEA":  # (a & b) | c: the only truth table the kernels use
                raise AssertionError(f"unexpected lop3 table: {line}")
            regs[d] = (val(a[0]) & val(a[1])) | val(a[2])
        elif op == "and.b32":
            regs[d] = val(a[0]) & val(a[1])
        elif op == "shr.b32":
            regs[d] = (val(a[0]) & MASK32) >> U(int(a[1]))
        elif op == "mov.b32":
            regs[d] = val(a[0]) & MASK32
        elif op == "prmt.b32":
            regs[d] = prmt(val(a[0]), val(a[1]), int(a[2], 0))
        elif op in ("add.f16x2", "sub.f16x2", "mul.f16x2", "fma.rn.f16x2"):
            regs[d] = _f16x2(op.split(".")[0], [val(t) for t in a])
        elif op == "cvt.f32.f16":
            regs[d] = (val(a[0]) & MASK16).astype(np.uint16).view(np.float16).astype(np.float32)
        elif op == "add.f32":
            regs[d] = (regs[a[0]] + regs[a[1]]).astype(np.float32)
        else:
            raise AssertionError(f"unexpected PTX: {line}")
    return regs


def _bits(data: np.ndarray) -> np.ndarray:
    """An element's bits, zero-extended (what a register of that element holds)."""
    return data.view(f"u{data.itemsize}").astype(U)


def _from_bits(bits: np.ndarray, np_dtype: np.dtype) -> np.ndarray:
    width = np.dtype(np_dtype).itemsize
    return (bits & U((1 << (8 * width)) - 1)).astype(f"u{width}").view(np_dtype)


def emulate_inline_asm(asm: str, constraints: str, arrays: list[np.ndarray], out_dtypes: list, pack: int):
    """The outputs of `tl.inline_asm_elementwise(asm, constraints, args, dtype, pack=pack)` for
    inputs `arrays` (broadcast to one shape). With pack > 1 an instance gets `pack` elements packed
    into 32-bit registers, lowest element first; which elements share an instance is up to Triton's
    register layout on a GPU, so the PTX must treat them as independent lanes: it is run with two
    different groupings of the elements and must give the same results (else AssertionError)."""
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    flat = [np.broadcast_to(a, shape).reshape(-1) for a in arrays]
    outs = _emulate_flat(asm, constraints, flat, out_dtypes, pack)
    if pack > 1:  # regroup: element i joins the instance of element i + 1
        shifted = _emulate_flat(asm, constraints, [np.roll(a, -1) for a in flat], out_dtypes, pack)
        for a, b in zip(outs, shifted, strict=True):
            if not np.array_equal(np.roll(b, 1).view(f"u{a.itemsize}"), a.view(f"u{a.itemsize}")):
                raise AssertionError("the PTX mixes the elements of one instance: its result would depend on "
                                     "Triton's register layout")  # fmt: skip
    return [o.reshape(shape) for o in outs]


def _emulate_flat(asm: str, constraints: str, flat: list[np.ndarray], out_dtypes: list, pack: int):
    """`emulate_inline_asm` on flat inputs: consecutive elements share an instance."""
    count = flat[0].size if flat else 1
    if count % pack:
        raise AssertionError(f"{count} elements do not split into instances of {pack}")
    regs: dict[str, np.ndarray] = {}
    index = 0
    out_regs = []
    for dt in out_dtypes:  # outputs first: $0 ..
        per = max(1, pack * np.dtype(dt).itemsize // 4)
        out_regs.append([f"${index + r}" for r in range(per)])
        index += per
    for a in flat:
        width = a.itemsize
        per_reg = max(1, 4 // width)
        lanes = _bits(a).reshape(-1, pack)
        for r in range(max(1, pack * width // 4)):
            word = np.zeros(lanes.shape[0], dtype=U)
            for e in range(per_reg):
                if r * per_reg + e < pack:
                    word |= lanes[:, r * per_reg + e] << U(8 * width * e)
            regs[f"${index}"] = word
            index += 1
    if index != len(constraints.split(",")):
        raise AssertionError(f"{index} registers for constraints {constraints!r}")
    run_ptx(asm, regs)
    outs = []
    for dt, names in zip(out_dtypes, out_regs, strict=True):
        width = np.dtype(dt).itemsize
        per_reg = max(1, 4 // width)
        lanes = np.zeros((count // pack, pack), dtype=np.dtype(dt))
        for r, name in enumerate(names):
            value = regs[name]
            for e in range(per_reg):
                if r * per_reg + e < pack:
                    if value.dtype == np.float32:  # an .f32 register written by float math
                        lanes[:, r * per_reg + e] = value
                    else:
                        lanes[:, r * per_reg + e] = _from_bits(value >> U(8 * width * e), dt)
        outs.append(lanes.reshape(-1))
    return outs


@contextmanager
def interpreted_inline_asm() -> Iterator[None]:
    """Within the block, TRITON_INTERPRET runs `tl.inline_asm_elementwise` through `emulate_inline_asm`."""
    from triton.runtime import interpreter

    class _Call:
        def __init__(self, handles: list) -> None:
            self.handles = handles

        def get_result(self, i: int):
            return self.handles[i]

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        scalars = [getattr(t, "element_ty", t) for t in types]
        np_dtypes = [interpreter._get_np_dtype(t) for t in scalars]
        outs = emulate_inline_asm(asm, constraints, [v.data for v in values], np_dtypes, pack)
        return _Call([interpreter.TensorHandle(o, t) for o, t in zip(outs, scalars, strict=True)])

    original = interpreter.InterpreterBuilder.create_inline_asm
    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_inline_asm = original
