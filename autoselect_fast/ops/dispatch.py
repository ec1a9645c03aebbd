"""Backend choice, lazy loading of the Triton kernels, and the argument checks every op shares.

Two backends run each op:

* ``"triton"``: the kernels in ``autoselect_fast.kernels``. CUDA tensors run them compiled; CPU tensors
  run them through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before*
  the kernel modules are first imported (they are imported lazily, on first use, by
  :func:`kernel_module`). The Triton path additionally requires contiguous inputs (stride 1 along the
  last dimension for features/positions). CUDA tensors never run interpreted kernels: that is refused
  with an error, not done slowly.
* ``"reference"``: ``autoselect_fast.reference`` (float64, a Python loop over images).

``backend="auto"`` (default) picks ``"triton"`` for CUDA tensors and for CPU tensors when the kernels
are (or will be) built for the interpreter, and ``"reference"`` otherwise (:func:`resolve_backend`).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from ..validation import check_choice, is_int

BACKENDS = ("auto", "triton", "reference")
_KERNEL_MODULES = ("selection", "soft_topk", "vp_gate")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel_module(name: str):
    """Import ``autoselect_fast.kernels.<name>`` on first use (so TRITON_INTERPRET can be set late)."""
    return importlib.import_module(f"autoselect_fast.kernels.{name}")


@functools.lru_cache(maxsize=None)
def _kernel_build() -> tuple[bool, bool]:
    """``(all interpreted, none interpreted)`` of the Triton kernels; fixed once they are imported."""
    from ..kernels import is_interpreted, jit_functions

    flags = [is_interpreted(kernel) for name in _KERNEL_MODULES for kernel in jit_functions(kernel_module(name))]
    if not flags:
        raise RuntimeError(f"no @triton.jit function found in autoselect_fast.kernels.{{{', '.join(_KERNEL_MODULES)}}}")
    return all(flags), not any(flags)


def kernels_interpreted() -> bool:
    """Whether the Triton kernels were built for Triton's CPU interpreter (imports them)."""
    return _kernel_build()[0]


def kernels_compiled() -> bool:
    """Whether no Triton kernel was built for the interpreter, i.e. they compile for the GPU (imports them)."""
    return _kernel_build()[1]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module docstring).

    Host-only (environment and the kernels' build, no tensor data); ``torch.compile`` evaluates it
    once while tracing and keeps the answer.
    """
    check_choice("backend", backend, BACKENDS)
    device_type = torch.device(device).type
    if torch.compiler.is_compiling():
        return _resolve_backend_traced(backend, device_type)
    return _resolve_backend(backend, device_type)


def _resolve_backend(backend: str, device_type: str) -> str:
    if backend == "reference":
        return "reference"
    if device_type == "cuda":
        if not kernels_compiled():
            raise RuntimeError(
                "the Triton kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 was set when they "
                "were imported), so CUDA tensors would run them interpreted, orders of magnitude slower; unset "
                "TRITON_INTERPRET for GPU runs, or pass backend='reference'"
            )
        return "triton"
    usable = device_type == "cpu" and _interpret_env() and kernels_interpreted()
    if backend == "triton" and not usable:
        if device_type == "cpu" and _interpret_env():
            why = "the kernels were imported before TRITON_INTERPRET=1 was set (set it before importing them)"
        else:
            why = "Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
        raise ValueError(f"backend='triton' cannot run on device {device_type}: {why}; use backend='auto' or 'reference'")
    return "triton" if usable else "reference"


_resolve_backend_traced = torch.compiler.assume_constant_result(_resolve_backend)


def plain_eager_call(*tensors: Optional[Tensor]) -> bool:
    """Whether an eager call may skip the custom-op dispatcher (10-30 µs of host time per call).

    Only when nothing needs it: no ``torch.compile`` tracing, no dispatch mode (fake/meta tracing),
    plain tensors, and no input that autograd has to follow.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.device.type == "meta" or (grad and t.requires_grad)):
            return False
    return True


def _check_block(name: str, value: Optional[int]) -> None:
    if value is None:
        return
    if not is_int(value) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1 (or None for the default), got {value!r}")


def tile_options(**blocks: Optional[int]) -> dict:
    """The tile sizes that were given (each checked), as keyword arguments of the launchers."""
    for name, value in blocks.items():
        _check_block(name, value)
    return {name: value for name, value in blocks.items() if value is not None}


def check_contiguous(name: str, t: Optional[Tensor], *, last_dim_only: bool = False) -> None:
    """The Triton backend's layout: contiguous, or (``last_dim_only``) stride 1 along the last dimension."""
    if t is None:
        return
    ok = (t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1) if last_dim_only else t.is_contiguous()
    if not ok:
        what = "have stride 1 along its last dimension" if last_dim_only else "be contiguous"
        raise ValueError(f"{name} must {what} for the Triton backend, got strides {tuple(t.stride())}; call .contiguous()")


def check_max_seqlen(max_seqlen: Optional[int], single_image: Optional[int], cu: Tensor, validate: bool) -> Optional[int]:
    """The longest image's N as a host int (given, or the whole input for one image), or None.

    Its value against ``cu_seqlens`` is checked only in ``validate`` mode (that reads the device)."""
    if max_seqlen is None:
        return single_image
    if not is_int(max_seqlen) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1 (the longest image's token count) or None, got {max_seqlen!r}")
    if validate and cu.numel() > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen must be at least the longest image's token count ({longest}), got {max_seqlen}")
    return max_seqlen
