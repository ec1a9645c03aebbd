"""Triton kernels of autoselect_fast, installed as ``autoselect_fast.kernels``.

Each module holds one fused kernel and its launcher; ``autoselect_fast.ops`` dispatches to them and
``autoselect_fast.reference`` is the spec every kernel is tested against.

  * ``selection``  hard top-K per image + gather of the kept rows + position ids (inference)
  * ``soft_topk``  z-score + Soft Top-K threshold + α, and the implicit backward (training)
  * ``vp_gate``    variance-preserving noise gate, ε drawn from (seed, offset) in the kernel
  * ``philox``     the VP gate's noise stream: its contract, and its replay in NumPy (no Triton import)

The kernel modules import triton; this package does not, so ``philox`` stays usable without it. On a
machine without CUDA the kernels only run in Triton's interpreter, which is chosen when ``triton.jit``
runs, i.e. ``TRITON_INTERPRET=1`` must be set before a kernel module is first imported. CUDA tensors are
never run through interpreted kernels: ``autoselect_fast.ops`` refuses that with an error.

The launchers are called by keyword from the torch custom ops in ``autoselect_fast.ops``
(``torch.ops.autoselect_fast.*``), whose fake implementations must describe their outputs.
"""


_JIT_TYPES = ("JITFunction", "InterpretedFunction")
_WRAPPER_TYPES = ("Autotuner", "Heuristics")  # @triton.autotune / @triton.heuristics hold the kernel in .fn


def is_interpreted(kernel) -> bool:
    """Whether a ``@triton.jit`` kernel was built for Triton's CPU interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def jit_functions(module) -> list:
    """Every ``@triton.jit`` function defined in ``module`` (unwrapping autotune/heuristics)."""
    found = []
    for obj in vars(module).values():
        while type(obj).__name__ in _WRAPPER_TYPES:
            obj = obj.fn
        if type(obj).__name__ in _JIT_TYPES:
            found.append(obj)
    return found


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (read by tools/compile_gate.py; no triton import needed here)
# --------------------------------------------------------------------------------------------------
from typing import Any, NamedTuple  # noqa: E402

_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                 "int32": "i32", "int64": "i64", "uint8": "u8", "int8": "i8", "bool": "i1"}


def pointer_type(dtype) -> str:
    """Triton's signature string of a pointer to elements of ``dtype`` (a torch dtype), e.g. ``*fp16``."""
    return "*" + _TRITON_TYPES[str(dtype).removeprefix("torch.")]


class CompileCase(NamedTuple):
    """One launch configuration of a kernel, as its launcher really launches it.

    ``signature`` maps every runtime argument to its Triton type (``*fp16``, ``i32``, ``fp32``, ...);
    ``constexprs`` gives the compile-time arguments; ``aligned`` names the integer arguments that are
    multiples of 16 at this configuration (Triton specialises on that, pointers from torch always are).
    Spills at a ``production`` case fail the gate; other cases are reported only.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    aligned: tuple = ()
    production: bool = True
