"""Finds, on a CPU, every place where eager code would read a GPU value on the host.

On a CPU, "device" and "host" are the same memory, so a read of a device value cannot be seen as a
copy. :class:`DeviceValueTracker` makes the difference visible again by tracking which tensors would
live on the device in a GPU run:

* **device values** are the model's and the Scorer's parameters and buffers, every tensor moved with
  ``Tensor.to(<device>)`` or ``_validation.to_device`` while tracking (the move is made to return a
  fresh tensor, so the host original stays a host tensor), and every output of an op (a
  ``TorchDispatchMode``) that has a device value among its inputs (in-place ops mark the tensor they write);
* a **host read** is ``item``/``tolist``/``numpy``/``cpu``/``bool``/``int``/``float`` of a device value
  (Python-level patches, so reads that never reach the dispatcher are seen too), an op whose output size
  depends on device data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
  ``repeat_interleave`` without ``output_size``), or a host tensor indexed with device indices (on a
  GPU: an implicit device→host copy); ``torch.cuda.synchronize`` and ``timing.Stopwatch``'s
  synchronisation are counted as syncs.

Each read is recorded with the innermost frames of the package (or of transformers) that made it.
Two private hooks of the package are patched, as the only places to see these events: the
``to_device`` helper of ``autoselect_fast._validation`` (on a CPU it returns its input as is) and
``timing.Stopwatch._sync`` (on a CPU it does nothing, on a GPU it synchronises).
What it cannot see: ops written in C++ outside the dispatcher (the packing extension is called with host
index tensors by design, and its outputs are marked as device values by the caller's wrapper).
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose result reads device data on the host (a value, or a data-dependent output size).
_READ_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_select.default, aten.gather.default, aten.take.default}
_PY_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@dataclass
class HostRead:
    what: str
    where: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.what} at " + " <- ".join(self.where[:4])


def _frames() -> list[str]:
    """Innermost-first ``file:line (function)`` of package / transformers frames (not this module)."""
    out = []
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.endswith("device_values.py"):
            continue
        if "autoselect_fast" in name or "transformers" in name or "triton" in name:
            out.append(f"{name.split('site-packages/')[-1].split('wt-onehome-engine/')[-1]}:{frame.lineno} ({frame.name})")
    return out


class DeviceValueTracker(TorchDispatchMode):
    """Use as a context manager around one call; ``reads`` and ``syncs`` are filled while it runs."""

    def __init__(self, *modules: torch.nn.Module):
        super().__init__()
        self.device_values: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive: ids stay unique)
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                self.mark(t)
        self.reads: list[HostRead] = []
        self.syncs: list[HostRead] = []
        self._stack = contextlib.ExitStack()
        self._in_python_read = False  # a Python-level read dispatches too: count it once

    def mark(self, tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            self.device_values[id(tensor)] = tensor

    def is_device(self, tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self.device_values

    # -- dispatcher level ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.is_device(t) for t in inputs)
        if self._in_python_read:
            pass
        elif on_device and func in _READ_OPS:
            self.reads.append(HostRead(str(func), _frames()))
        elif on_device and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.reads.append(HostRead("repeat_interleave without output_size", _frames()))
        elif func in _INDEX_OPS:
            indices = [t for t in tree_flatten((args[1:], kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(self.is_device(t) and t.dtype == torch.bool for t in indices):
                self.reads.append(HostRead(f"{func} with a device boolean mask", _frames()))
            elif args and not self.is_device(args[0]) and args[0].dim() > 0 and any(self.is_device(t) for t in indices):
                self.reads.append(HostRead(f"{func}: host tensor indexed with device indices", _frames()))
        out = func(*args, **kwargs)
        if on_device:
            for t in tree_flatten(out)[0]:
                self.mark(t)
        return out

    # -- Python level -------------------------------------------------------------------------------
    def _patch_reads(self):
        for name in _PY_READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, _name=name, **kwargs):
                if self.is_device(tensor) and not self._in_python_read:
                    self.reads.append(HostRead(f"Tensor.{_name}", _frames()))
                outer, self._in_python_read = self._in_python_read, True
                try:
                    return _original(tensor, *args, **kwargs)
                finally:
                    self._in_python_read = outer

            self._stack.enter_context(_patched(torch.Tensor, name, read))

    def _patch_moves(self):
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            targets_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
            if not targets_device:
                return original_to(tensor, *args, **kwargs)
            out = original_to(tensor, *args, **{**kwargs, "copy": True})
            self.mark(out)
            return out

        self._stack.enter_context(_patched(torch.Tensor, "to", to))
        from autoselect_fast import _validation

        original_to_device = _validation.to_device

        def to_device(host, device):
            out = original_to_device(host, device).clone()
            self.mark(out)
            return out

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("autoselect_fast") and getattr(module, "to_device", None) is original_to_device:
                self._stack.enter_context(_patched(module, "to_device", to_device))

    def _patch_syncs(self):
        from autoselect_fast import timing

        def recorder(what, original):
            def sync(*args, **kwargs):
                self.syncs.append(HostRead(what, _frames()))
                if what == "torch.cuda.synchronize" and not torch.cuda.is_available():
                    return None  # counted; there is nothing to wait for
                return original(*args, **kwargs)
            return sync

        self._stack.enter_context(_patched(torch.cuda, "synchronize", recorder("torch.cuda.synchronize", torch.cuda.synchronize)))
        self._stack.enter_context(_patched(timing.Stopwatch, "_sync", recorder("Stopwatch sync", timing.Stopwatch._sync)))

    def __enter__(self):
        self._patch_reads()
        self._patch_moves()
        self._patch_syncs()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()


@contextlib.contextmanager
def _patched(owner, name: str, value):
    original = owner.__dict__.get(name, getattr(owner, name))
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)
