"""Ragged batches: ``cu_seqlens`` offsets, packed <-> padded layouts, and small host-built tensors on the device.

One convention everywhere: a packed tensor holds every segment's rows one after the other along one
dimension (``(ΣN,)``, ``(ΣN, d)``, ``(3, ΣN)``, ...), and ``cu_seqlens`` ``(B+1,)`` gives their offsets
(``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = ΣN``). :func:`packed_to_padded` is the one way to lay such a
batch out as ``(B, max N)`` rows (right- or left-aligned); :func:`padded_to_packed` goes back.

:func:`to_device` copies the small index tensors the host builds (budgets, offsets, positions) to the
device without a synchronisation; :func:`copy_into` does the same into an existing (static) device buffer. This module imports nothing else from the package, so
``validation`` and everything above it can use it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

PAD_SIDES = ("right", "left")


def segment_bounds(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each segment, as Python ints (reads ``cu_seqlens`` on the host)."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def lengths_from_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def cu_seqlens_from_lengths(lengths: Union[Tensor, Sequence[int]]) -> Tensor:
    """int64 offsets ``[0, n_0, n_0 + n_1, ...]`` of segments of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without blocking: pinned staging + ``non_blocking``.

    A plain ``.to("cuda")`` of pageable memory is a synchronous copy (``torch.cuda.set_sync_debug_mode``
    reports it); pinned memory lets the copy run on the stream while the host goes on. The caching
    host allocator keeps the pinned buffer alive until the copy has finished.
    """
    device = torch.device(device)
    if host.device.type == device.type and (device.index is None or host.device == device):
        return host
    if device.type == "cuda" and host.device.type == "cpu" and not torch.compiler.is_compiling():
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``; a host tensor goes to a CUDA buffer through pinned memory without blocking the host."""
    if dst.device.type == "cuda" and src.device.type == "cpu":
        src = src.to(dst.dtype).pin_memory()  # cast first: a casting copy would stage through pageable memory
        dst.copy_(src, non_blocking=True)
    else:
        dst.copy_(src)


def single_segment_cu(total: int, device=None) -> Tensor:
    """``[0, total]`` int64 on ``device`` (one non-blocking copy)."""
    host = torch.tensor([0, total], dtype=torch.int64)
    return host if device is None else to_device(host, device)


def packed_to_padded(
    packed: Tensor,
    cu_seqlens: Tensor,
    *,
    dim: int = 0,
    pad_value: float = 0,
    side: str = "right",
    max_len: Optional[int] = None,
) -> Tensor:
    """Segments packed along ``dim`` -> one row per segment, padded with ``pad_value`` to the longest.

    The packed dimension (size ΣN) becomes two, ``(B, L)``: ``(ΣN, d)`` -> ``(B, L, d)``,
    ``(3, ΣN)`` with ``dim=-1`` -> ``(3, B, L)``, ``(H, ΣN, d)`` with ``dim=1`` -> ``(H, B, L, d)``.
    Each segment starts at column 0 (``side="right"``: padding after it) or ends at column L - 1
    (``side="left"``). ``L`` is ``max_len`` when given (at least the longest segment), else the longest
    segment, which is read from ``cu_seqlens`` on the host (a synchronisation for a CUDA tensor).
    """
    if not isinstance(packed, Tensor) or packed.dim() < 1:
        raise ValueError(f"packed must be a tensor with at least 1 dimension, got {type(packed).__name__}")
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}")
    if not -packed.dim() <= dim < packed.dim():
        raise ValueError(f"dim must index one of the {packed.dim()} dimensions of packed, got {dim}")
    dim %= packed.dim()
    rows = packed.movedim(dim, 0)
    total = rows.shape[0]
    cu = to_device(cu_seqlens.to(torch.int64), packed.device)
    lengths = cu[1:] - cu[:-1]
    longest = int(lengths.max()) if max_len is None else max_len
    segment = torch.repeat_interleave(torch.arange(lengths.shape[0], device=packed.device), lengths, output_size=total)
    column = torch.arange(total, device=packed.device) - cu[segment]
    if side == "left":
        column = column + (longest - lengths)[segment]
    out = rows.new_full((lengths.shape[0], longest, *rows.shape[1:]), pad_value)
    out[segment, column] = rows
    return out.movedim((0, 1), (dim, dim + 1))


def padded_to_packed(padded: Tensor, lengths: Union[Tensor, Sequence[int], None] = None) -> tuple[Tensor, Tensor]:
    """Right-padded ``(B, N, ...)`` -> packed ``(ΣN_b, ...)`` and ``cu_seqlens``; ``lengths`` defaults to N for all."""
    if not isinstance(padded, Tensor) or padded.dim() not in (2, 3):
        shape = tuple(padded.shape) if isinstance(padded, Tensor) else type(padded).__name__
        raise ValueError(f"padded must be a tensor of 2 or 3 dimensions (B, N[, d]), got {shape}")
    b, n = padded.shape[:2]
    if lengths is None:
        lengths = torch.full((b,), n, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
    if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > n).any()):
        raise ValueError(f"lengths must have shape ({b},) with 1 <= lengths <= {n}, got {lengths.tolist()}")
    packed = torch.cat([padded[i, : int(lengths[i])] for i in range(b)])
    return packed, cu_seqlens_from_lengths(lengths).to(padded.device)
