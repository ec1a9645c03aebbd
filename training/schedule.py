"""The temperature schedule of training: τ follows a cosine from τ_start to τ_end (docs/design.md, "Soft Top-K")."""
from __future__ import annotations

import math

from ..validation import check_tau


def tau_schedule(step: int, total_steps: int, tau_start: float = 2.0, tau_end: float = 0.1) -> float:
    """Cosine from ``tau_start`` (step 0) to ``tau_end`` (step >= total_steps)."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    check_tau(tau_start)
    check_tau(tau_end)
    progress = min(step, total_steps) / total_steps
    return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * progress))
