"""Argument checks shared by the reference path, the kernels' wrappers and the engine.

Every check raises ``ValueError`` (bad value) or ``TypeError`` (bad type or dtype) with a message that
names the argument, the value it got and what is allowed (docs/design.md, "Conventions"). Nothing is clipped
or reordered silently.

Two kinds of checks (see README, "Kernels and dispatch"):

* **metadata checks** read only what the host already knows (types, dtypes, ranks, shapes, devices,
  Python ints): they always run and never synchronise;
* **data checks** read tensor values (finiteness, ``cu_seqlens`` monotonic and total, ``1 <= k <= N``,
  α in [0, 1]). For a CUDA tensor each one is a device→host copy that stalls the stream, so the
  functions below run them only when called with ``validate=True``; :func:`resolve_validate` gives
  ``autoselect_fast.ops`` its default. The reference path always validates.

It also holds ``DTYPES``, the one table of the dtype names the CLI and settings accept.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .ragged import single_segment_cu, to_device

IntOrTensor = Union[int, Sequence[int], Tensor]
VALIDATE_ENV = "AUTOSELECT_FAST_VALIDATE"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtype names of the command line, the presets and the settings files.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


def _env_flag(name: str) -> Optional[bool]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{name} must be 1/true/on/yes or 0/false/off/no, got {raw!r}")


def resolve_validate(validate: Optional[bool], device: torch.device) -> bool:
    """Whether the data checks run for tensors on ``device``.

    ``validate`` True/False wins. ``None`` (the default of every ``ops`` function): off while
    ``torch.compile`` traces (a data check is a host read, i.e. a graph break), else the environment
    variable ``AUTOSELECT_FAST_VALIDATE`` (1/0) when set (the test suite sets 1), else on for CPU
    tensors (reading host memory costs no synchronisation) and off for CUDA tensors.
    """
    if validate is not None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool or None, got {type(validate).__name__}")
        return validate
    if torch.compiler.is_compiling():
        return False
    from_env = _env_flag(VALIDATE_ENV)
    if from_env is not None:
        return from_env
    return device.type == "cpu"


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {', '.join(f'{n} on {d}' for n, d in devices.items())}")


def check_cu_seqlens(
    cu_seqlens: Tensor | None, total: int, *, name: str = "cu_seqlens", device=None, validate: bool = True,
    allow_empty: bool = False,
) -> Tensor:
    """Validate cumulative offsets ``(B+1,)``: cu[0] = 0, non-decreasing, cu[-1] = total.

    ``None`` means one segment covering everything. Returns int64 offsets on ``device``.
    Segments of length 0 are rejected (every image has at least one token) unless ``allow_empty``
    (varlen attention over a batch padded for a CUDA graph). The values are read on the host (a
    synchronisation for device tensors) only when ``validate``; dtype and shape always.
    """
    if cu_seqlens is None:
        return single_segment_cu(total, device)
    check_tensor(name, cu_seqlens, ndim=1, dtypes=INT_DTYPES)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (B+1 with B >= 1), got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    if not validate:
        return cu if device is None else to_device(cu, device)
    cu_host = cu.tolist()
    if cu_host[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu_host[0]}")
    if cu_host[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens ({total}), got {cu_host[-1]}")
    lengths = [b - a for a, b in zip(cu_host[:-1], cu_host[1:])]
    bad = [i for i, n in enumerate(lengths) if n < (0 if allow_empty else 1)]
    if bad and allow_empty:
        raise ValueError(f"{name} must be non-decreasing, got segment lengths {lengths}")
    if bad:
        raise ValueError(f"{name} must be strictly increasing (every segment needs >= 1 token), got segment lengths {lengths}")
    return cu if device is None else to_device(cu, device)


def host_budgets(k, num_segments: int, *, name: str = "k") -> Optional[list[int]]:
    """The budgets as a host list when ``k`` is an int or a list/tuple of ints, else ``None`` (a tensor).

    Metadata checks only (type, one entry per segment, every entry >= 1): no synchronisation.
    """
    if isinstance(k, Tensor):
        return None
    if isinstance(k, (list, tuple)):
        if not all(is_int(v) for v in k):
            raise TypeError(f"{name} must be an int, a list of ints or an integer tensor of shape (B,), got a {type(k).__name__} holding {sorted({type(v).__name__ for v in k})}")
        if len(k) != num_segments:
            raise ValueError(f"{name} must have shape ({num_segments},) (one budget per segment), got ({len(k)},)")
        values = list(k)
    elif is_int(k):
        values = [k] * num_segments
    else:
        raise TypeError(f"{name} must be an int, a list of ints or an integer tensor of shape (B,), got {type(k).__name__}")
    for i, v in enumerate(values):
        if v < 1:
            raise ValueError(f"{name} must satisfy 1 <= {name} <= N for every segment; segment {i} has {name} = {v}")
    return values


def budget_tensors(
    k: IntOrTensor, num_segments: int, device, *, name: str = "k", host_lengths: Optional[list[int]] = None,
    with_offsets: bool = False,
):
    """The budgets as an int64 tensor ``(B,)`` on ``device``; with ``with_offsets`` also their offsets
    ``(B+1,)`` = ``[0, k_0, k_0 + k_1, ...]`` (``(k, offsets)``).

    Host budgets (an int or a list of ints) are checked on the host (``k >= 1``, and ``k <= N`` when
    ``host_lengths`` gives N) and reach the device in one non-blocking copy, offsets included. A budget
    tensor gets its dtype and shape checked and its offsets from a cumsum on its device; its values are
    not read (that is :func:`check_budget_values`).
    """
    values = host_budgets(k, num_segments, name=name)
    if values is not None:
        if host_lengths is not None:
            for i, (v, n) in enumerate(zip(values, host_lengths)):
                if v > n:
                    raise ValueError(f"{name} must satisfy 1 <= {name} <= N for every segment; segment {i} has N = {n} and {name} = {v}")
        offsets = [0] + list(itertools.accumulate(values)) if with_offsets else []
        both = to_device(torch.tensor(values + offsets, dtype=torch.int64), device)
        k_t = both[:num_segments]
        return (k_t, both[num_segments:]) if with_offsets else k_t
    if k.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {k.dtype}")
    if k.dim() == 0:
        k = k.reshape(1).expand(num_segments)
    if tuple(k.shape) != (num_segments,):
        raise ValueError(f"{name} must have shape ({num_segments},) (one budget per segment), got {tuple(k.shape)}")
    k_t = to_device(k.to(torch.int64).contiguous(), device)
    if with_offsets:
        return k_t, torch.nn.functional.pad(torch.cumsum(k_t, 0), (1, 0))
    return k_t


def check_budget_values(k_t: Tensor, lengths: Tensor, *, name: str = "k") -> None:
    """Data check: ``1 <= k_i <= N_i`` for every segment (reads both tensors on the host)."""
    bad = (k_t < 1) | (k_t > lengths)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N for every segment; segment {i} has N = {int(lengths[i])} and {name} = {int(k_t[i])}")


def check_k(
    k: IntOrTensor, lengths: Tensor, *, name: str = "k", validate: bool = True, host_lengths: Optional[list[int]] = None
) -> Tensor:
    """Validate the per-segment budget: an int, a list of ints or an int tensor ``(B,)``, 1 <= k_i <= N_i.

    Returns an int64 tensor ``(B,)`` on the device of ``lengths`` (:func:`budget_tensors`); the
    comparison with the lengths on their device runs only when ``validate``.
    """
    k_t = budget_tensors(k, lengths.numel(), lengths.device, name=name, host_lengths=host_lengths)
    if validate:
        check_budget_values(k_t, lengths, name=name)
    return k_t


def check_tau(tau: float) -> float:
    if not is_number(tau):
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


def check_scores(scores: Tensor, cu_seqlens: Tensor | None, *, validate: bool = True) -> Tensor:
    """Scores ``(ΣN,)`` of a float dtype (all finite when ``validate``); returns the int64 ``cu_seqlens``."""
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    if validate:
        check_finite("scores", scores)
    return check_cu_seqlens(cu_seqlens, scores.shape[0], device=scores.device, validate=validate)


def check_alpha_values(alpha: Tensor) -> None:
    """Data check of a mask: finite and in [0, 1] (reads α on the host)."""
    check_finite("alpha", alpha)
    if bool(((alpha < 0) | (alpha > 1)).any()):
        raise ValueError(f"alpha must lie in [0, 1], got min {float(alpha.min())} and max {float(alpha.max())}")


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


def is_int(value) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a Python int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
