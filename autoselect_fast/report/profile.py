"""GPU busy time and kernel launches of one prefill, from ``torch.profiler`` (CUDA only).

The wall time of a prefill says how long the caller waits; these say how much of it the GPU works:
``kernels`` is the number of GPU kernels one prefill launches, ``busy_ms`` the time at least one of
them runs (the union of their intervals), and ``busy_pct`` that time against the prefill's median
wall time from the timed rounds (the profiled run itself is slowed by the profiler). A CPU run has no
GPU kernels: the result says they were not measured, with no numbers.
"""
from __future__ import annotations

from typing import Callable

import torch

NOT_MEASURED = "not measured: GPU busy time and kernel launches exist only on a CUDA run"


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_profile(run: Callable[[], object], device: torch.device, wall_ms: float) -> dict:
    """``{"measured": True, "kernels", "busy_ms", "busy_pct"}`` of one call of ``run`` on CUDA;
    ``{"measured": False, "reason"}`` elsewhere. ``wall_ms``: the call's median wall time."""
    if torch.device(device).type != "cuda":
        return {"measured": False, "reason": NOT_MEASURED}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        run()  # warm: the profiled call launches what a timed round launches
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    busy_ms = busy_time([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e3
    return {"measured": True, "kernels": len(kernels), "busy_ms": busy_ms, "busy_pct": 100 * busy_ms / wall_ms}
