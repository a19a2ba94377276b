"""TensorRT quickly-deployable plugin scaffolding shared by the GEMM plugins (tensorrt imported lazily).

A GEMM plugin computes out (M, N) fp16 = x (M, K) fp16 @ dequant(W (N, K))ᵀ with W in the canonical
packed layout (4-bit codes LSB-first along K, `scales` (N, ceil(K / group))). Its `aot_impl` returns PTX
compiled ahead of time from the plugin's OpenAI Triton kernel (`kernel.py`), so engines run it without
Python. What needs no TensorRT is pure and tested on CPU: output shape inference, the tactic (tile)
table, the launch parameters of a tactic, and the PTX itself (Triton compiles for an sm_90 target on a
machine without a GPU).

TensorRT calls an AOT kernel with its parameters in this order: the plugin's inputs, then the extra
int32 scalars `aot_impl` returns, then the outputs (then Triton's own scratch pointers, which these
kernels do not use). `check_kernel_interface` verifies a kernel against that order before compiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtcompress.errors import MissingDependencyError
from trtcompress.plugins.registration import TRT_HINT  # one install hint for every plugin

TRITON_HINT = "compiling plugin kernels to PTX needs `pip install triton==3.6.0` (runs on CPU)"


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int


# Autotune combinations: TensorRT times each tactic per shape and keeps the fastest. QDP tactics are
# positive integers, so tactic t runs TILES[t - 1].
TILES: tuple[Tile, ...] = (
    Tile(16, 64, 64, 4),  # decode: a few rows
    Tile(32, 64, 128, 4),
    Tile(64, 128, 64, 8),  # prefill
    Tile(128, 128, 64, 8),
)
TACTICS: tuple[int, ...] = tuple(range(1, len(TILES) + 1))


def tile_for(tactic: int) -> Tile:
    """The tile of a QDP tactic (1-based; TensorRT passes 0 only before autotuning, meaning the default)."""
    if tactic == 0:
        return TILES[0]
    if not 1 <= tactic <= len(TILES):
        raise ValueError(f"tactic {tactic} is not one of {TACTICS}")
    return TILES[tactic - 1]


def infer_gemm_shape(
    x_shape: tuple[int, ...], qweight_shape: tuple[int, ...], bits: int = 4
) -> tuple[int, ...]:
    """(..., K) x (N, ceil(K * bits / 8)) -> (..., N); checks K against the packed weight."""
    if len(qweight_shape) != 2 or not x_shape:
        raise ValueError(f"expected x (..., K) and qweight (N, K packed), got {x_shape} and {qweight_shape}")
    k, n = x_shape[-1], qweight_shape[0]
    if qweight_shape[1] != -(-k * bits // 8):
        raise ValueError(
            f"x has K={k} but qweight packs {qweight_shape[1]} bytes per row ({8 // bits} codes per byte)"
        )
    return (*x_shape[:-1], n)


@dataclass(frozen=True)
class LaunchParams:
    grid_x: int
    grid_y: int
    grid_z: int
    block_x: int
    shared_mem: int
    extra_args: tuple[int, ...]  # int32 scalars TensorRT passes after the inputs: (M, N, K)


def launch_params(m: int, n: int, k: int, tactic: int, shared_mem: int = 0) -> LaunchParams:
    """What `aot_impl` tells TensorRT for an (M, K) x (N, K) GEMM (the same formulas, on symbols there)."""
    tile = tile_for(tactic)
    return LaunchParams(
        grid_x=-(-m // tile.block_m),
        grid_y=-(-n // tile.block_n),
        grid_z=1,
        block_x=tile.num_warps * 32,
        shared_mem=shared_mem,
        extra_args=(m, n, k),
    )


def import_kernel(plugin_id: str, module: str, name: str):
    """The Triton kernel `name` of `module` that a GEMM plugin launches; without triton installed, a
    MissingDependencyError that says what to install (not "kernel module not available")."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "triton":
            raise MissingDependencyError(TRITON_HINT) from None
        raise ImportError(f"{plugin_id}: its Triton kernel module is not available ({exc})") from exc


def import_trt():
    from trtcompress.plugins.registration import import_trtp

    trtp = import_trtp(TRT_HINT)
    import tensorrt as trt

    return trt, trtp


def kernel_parameters(fn) -> tuple[list[str], set[str]]:
    """(parameter names, the constexpr ones) of a @triton.jit kernel, also under TRITON_INTERPRET=1."""
    import inspect

    if hasattr(fn, "constexprs"):  # a JITFunction
        names = list(fn.arg_names)
        return names, {names[i] for i in fn.constexprs}
    params = inspect.signature(fn.fn).parameters  # the interpreter's wrapper keeps the Python function
    return list(params), {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def check_kernel_interface(
    fn, inputs: list[str], extra: list[str], outputs: list[str], constants: dict
) -> None:
    """Fail with a clear message when a Triton kernel's parameters are not in TensorRT's AOT order."""
    names, constexprs = kernel_parameters(fn)
    runtime = [n for n in names if n not in constexprs]
    expected = [*inputs, *extra, *outputs]
    missing = set(constants) - constexprs
    if runtime != expected or missing:
        raise ValueError(
            f"kernel {getattr(fn, '__name__', fn)} takes {runtime} (constexpr {sorted(constexprs)}); "
            f"the TensorRT plugin launches it with {expected} (inputs, then the int32 extras, then "
            f"outputs) and constexprs {sorted(constants)}"
        )


def compile_triton_ptx(
    fn, signature: dict[str, str], constants: dict, num_warps: int, arch: int = 90
) -> tuple[str, str, int]:
    """(kernel entry name, PTX, shared bytes) of a @triton.jit kernel for sm_`arch` (runs on CPU)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise MissingDependencyError(TRITON_HINT) from None
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature | dict.fromkeys(constants, "constexpr"), constexprs=constants
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.shared
