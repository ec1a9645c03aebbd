"""Argument checks shared by the reference path, the kernels' wrappers and the engine.

Every check raises ``ValueError`` (bad value) or ``TypeError`` (bad type or dtype) with a message that
names the argument, the value it got and what is allowed (DESIGN.md section 7). Nothing is clipped
or reordered silently.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

IntOrTensor = Union[int, Tensor]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None, dtypes=None) -> Tensor:
    """Check that ``value`` is a tensor of the given rank(s) and dtype(s)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    return value


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {', '.join(f'{n} on {d}' for n, d in devices.items())}")


def check_cu_seqlens(cu_seqlens: Tensor | None, total: int, *, name: str = "cu_seqlens", device=None) -> Tensor:
    """Validate cumulative offsets ``(B+1,)``: cu[0] = 0, non-decreasing, cu[-1] = total.

    ``None`` means one segment covering everything. Returns int64 offsets on ``device``.
    Segments of length 0 are rejected: every image has at least one token.
    """
    if cu_seqlens is None:
        return torch.tensor([0, total], dtype=torch.int64, device=device)
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INT_DTYPES)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (B+1 with B >= 1), got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    cu_host = cu.tolist()
    if cu_host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu_host[0]}")
    if cu_host[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens ({total}), got {cu_host[-1]}")
    lengths = [b - a for a, b in zip(cu_host[:-1], cu_host[1:])]
    bad = [i for i, n in enumerate(lengths) if n < 1]
    if bad:
        raise ValueError(f"{name} must be strictly increasing (every segment needs >= 1 token), got segment lengths {lengths}")
    return cu if device is None else cu.to(device)


def check_k(k: IntOrTensor, lengths: Tensor, *, name: str = "k") -> Tensor:
    """Validate the per-segment budget: an int or an int tensor ``(B,)`` with 1 <= k_i <= N_i.

    Returns an int64 tensor ``(B,)`` on the device of ``lengths``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor of shape (B,), got {type(k).__name__}")
    if isinstance(k, Tensor):
        if k.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got dtype {k.dtype}")
        if k.dim() == 0:
            k = k.reshape(1).expand(lengths.numel())
        if k.shape != lengths.shape:
            raise ValueError(f"{name} must have shape {tuple(lengths.shape)} (one budget per segment), got {tuple(k.shape)}")
        k_t = k.to(device=lengths.device, dtype=torch.int64)
    else:
        k_t = torch.full_like(lengths, k, dtype=torch.int64)
    bad = (k_t < 1) | (k_t > lengths)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N for every segment; segment {i} has N = {int(lengths[i])} and {name} = {int(k_t[i])}")
    return k_t


def check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


def check_finite(name: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf)")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def check_scores(scores: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Scores ``(ΣN,)`` of a float dtype, all finite; returns the validated int64 ``cu_seqlens``."""
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    check_finite("scores", scores)
    return check_cu_seqlens(cu_seqlens, scores.shape[0], device=scores.device)


def check_selection_inputs(scores: Tensor, features: Tensor | None, positions: Tensor | None) -> None:
    """Rows of ``features`` ``(ΣN, d)`` and columns of ``positions`` ``(ΣN,)``/``(3, ΣN)`` match the scores."""
    total = scores.shape[0]
    if features is not None:
        check_tensor("features", features, ndim=2)
        if features.shape[0] != total:
            raise ValueError(f"features must have {total} rows (one per score), got shape {tuple(features.shape)}")
    if positions is not None:
        check_tensor("positions", positions, ndim=(1, 2), dtypes=INT_DTYPES)
        if positions.shape[-1] != total or (positions.dim() == 2 and positions.shape[0] != 3):
            raise ValueError(f"positions must have shape ({total},) or (3, {total}), got {tuple(positions.shape)}")
