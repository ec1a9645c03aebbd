"""Backend choices of the engine, one place each: selection, packer and attention.

Each resolver returns the chosen name and the callable the engine uses. A backend that should run on
the device is tried once on a tiny input against its reference (:func:`smoke_test`); a GPU never falls
back silently to a slow path: the resolver raises ``RuntimeError`` naming the backend and the device.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

import torch

from .. import reference
from ..attention import ATTENTION_BACKENDS, install_dispatch, resolve_backend
from ..packing import PackedBatch
from ..reference import Selection
from ..validation import check_choice

SELECTION_BACKENDS = ("auto", "ops", "reference")
SelectFn = Callable[..., Selection]
T = TypeVar("T")

__all__ = ["SELECTION_BACKENDS", "resolve_selection_backend", "resolve_packer", "resolve_attention", "smoke_test", "one_at_a_time"]


def smoke_test(failure: str, check: Callable[[], T]) -> T:
    """``check()``'s result; any exception becomes ``RuntimeError(f"{failure}: {exc}")``."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here", said loudly
        raise RuntimeError(f"{failure}: {exc}") from exc


def resolve_selection_backend(name: str, device: torch.device) -> tuple[str, SelectFn]:
    """``(chosen name, select function)``; the function is called as
    ``select(scores, features, budgets: list[int], cu_seqlens, positions=, position_mode=)``.

    Both choices are ``autoselect_fast.ops.select`` with the data checks off (the engine builds its
    own inputs and checks budgets on the host), so with the budgets given as a host list the selection
    makes no device→host synchronisation: ``"ops"`` runs the Triton kernels (backend resolved once
    here), ``"reference"`` runs ``reference.select_tokens`` inside the same custom op. ``"auto"`` picks
    ``"ops"``, except on a CPU without Triton's interpreter, where there are no kernels to run.
    A GPU never falls back: when the kernels cannot run (not importable, interpreted, or wrong on a
    tiny smoke test) ``"auto"`` and ``"ops"`` raise ``RuntimeError``.
    """
    check_choice("selection_backend", name, SELECTION_BACKENDS)
    from .. import ops

    on_reference = functools.partial(ops.select, backend="reference", validate=False)
    if name == "reference":  # through ops too: the same call, traceable as a custom op
        return "reference", on_reference
    failure = f"selection_backend={name!r} is not usable on {device}"
    kernel_backend = smoke_test(failure, lambda: ops.resolve_backend("auto", device))
    if name == "auto" and kernel_backend == "reference":
        return "reference", on_reference

    def agrees_with_reference() -> None:  # with the data checks on
        scores = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, 1.0, -2.0], device=device)
        feats = torch.arange(14.0, device=device).view(7, 2)
        cu = torch.tensor([0, 4, 7], device=device)
        pos = torch.arange(7, device=device) + 10
        got = ops.select(scores, feats, [2, 2], cu, positions=pos, backend=kernel_backend, validate=True)
        want = reference.select_tokens(scores, feats, 2, cu, positions=pos)
        if not all(torch.equal(getattr(got, n).cpu(), getattr(want, n).cpu()) for n in ("indices", "position_ids", "features")):
            raise RuntimeError("ops.select disagrees with reference.select_tokens on a smoke test")

    smoke_test(failure, agrees_with_reference)
    return "ops", functools.partial(ops.select, backend=kernel_backend, validate=False)


def resolve_packer(device: torch.device) -> tuple[str, Callable[..., PackedBatch]]:
    """``("extension", packing.pack_varlen)`` when the C++ packer runs on ``device``, else the reference.

    Only a CPU without the built extension gets the plain PyTorch reference. On CUDA the extension
    must be built with its CUDA path and pass a smoke test, else ``RuntimeError``: a GPU run never
    falls back to the slow packer. A built extension that fails its smoke test raises on any device.
    """
    from .. import packing

    failure = f"the C++ packer cannot run on {device}"
    if not packing.extension_available():
        if device.type == "cuda":
            raise RuntimeError(f"{failure}: {packing.extension_error()}") from packing.extension_error()
        return "reference", packing.pack_varlen_reference

    def packs_two_rows() -> None:  # the extension may be built without the CUDA path
        one = torch.ones(1, 1, device=device)
        cu = torch.tensor([0, 1])
        pos = torch.zeros(1, dtype=torch.int64, device=device)
        got = packing.pack_varlen(one, cu, pos, 2 * one, cu, pos + 1, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        if got.embeds.flatten().tolist() != [2.0, 1.0] or got.position_ids.tolist() != [1, 0]:
            raise RuntimeError(f"pack_varlen gave embeds {got.embeds.flatten().tolist()} and positions {got.position_ids.tolist()}, expected [2.0, 1.0] and [1, 0]")

    smoke_test(failure, packs_two_rows)
    return "extension", packing.pack_varlen


def resolve_attention(name: str, device: torch.device, language_model) -> str:
    """The varlen attention backend for the packed prefill; points the model's config at the dispatcher."""
    check_choice("attention_backend", name, ATTENTION_BACKENDS)
    chosen = resolve_backend(name, device, language_model.dtype)
    install_dispatch(language_model.config)
    return chosen


_INTERPRETER_LOCK = threading.Lock()


def one_at_a_time(fn: Callable) -> Callable:
    """Serialise ``fn`` across threads: Triton's CPU interpreter (TRITON_INTERPRET=1, the test setting)
    keeps per-launch global state and fails when two threads launch kernels at once."""
    @functools.wraps(fn)
    def serialised(*args, **kwargs):
        if torch.compiler.is_compiling():  # tracing runs no kernel, and Dynamo cannot trace a lock
            return fn(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return serialised
