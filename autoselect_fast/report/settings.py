"""What a report run is asked to do (:class:`ReportSettings`) and the one place it is checked.

:meth:`ReportSettings.validate` checks every setting before any model is built (the budgets against
the preset's N from a model skeleton on the ``meta`` device, no weights) and returns the
:class:`ReportPlan` the run uses. A bad setting raises :class:`SettingError`, which names the setting,
the value and what is allowed; ``autoselect-fast bench`` turns it into the same message with the
command-line flag's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..presets import PRESETS, Preset
from ..validation import DTYPES, is_int, is_number
from .workloads import SERVING_RATIOS, supports_serving


class SettingError(ValueError):
    """A bad report setting: ``setting`` (a :class:`ReportSettings` field), the ``value`` at fault
    and what is ``allowed``."""

    def __init__(self, setting: str, value: Any, allowed: str):
        self.setting, self.value, self.allowed = setting, value, allowed
        super().__init__(f"{setting} {value!r}: {allowed}")


@dataclass
class ReportSettings:
    preset: str = "default"
    keeps: Sequence[int] = ()  # budgets K; empty: the preset's
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Optional[str] = None  # default: the preset's
    batch: int = 1  # requests of the `single` scenario
    mixed_batch: Optional[int] = None  # requests of the `mixed` scenario; None: the preset's, 0: skip it
    mixed_text: tuple[int, int] = (10, 200)  # text tokens per prompt of the `mixed` scenario
    serving_batch: Optional[int] = None  # requests of the `serving` scenario; None: the preset's, 0: skip it
    serving_ratios: Sequence[float] = SERVING_RATIOS  # keep ratios of the `serving` scenario
    decode_batches: Sequence[int] = ()  # batch sizes of the `decode` scenario; empty: skip it
    decode_tokens: int = 16  # new tokens per request in the `decode` scenario (>= 2)
    warmup: int = 2
    repeats: int = 5
    out_dir: str = "bench/out"
    plot: bool = True
    progress: bool = True

    def validate(self, skeleton=None) -> "ReportPlan":
        """Check every setting, cheapest first, before any model is built; the values the run uses.

        ``skeleton``: the preset's adapter on the ``meta`` device when the caller has one already.
        """
        from .. import preflight

        if self.preset not in PRESETS:
            raise SettingError("preset", self.preset, f"allowed: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[self.preset]
        dtype_name = self.dtype or preset.default_dtype
        if dtype_name not in DTYPES:
            raise SettingError("dtype", dtype_name, f"allowed: {', '.join(sorted(DTYPES))}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise SettingError("device", self.device, "allowed: cpu, cuda, cuda:N") from None
        mixed_batch = preset.mixed_batch if self.mixed_batch is None else self.mixed_batch
        serving_batch = preset.serving_batch if self.serving_batch is None else self.serving_batch
        for name, value, lowest in (("batch", self.batch, 1), ("repeats", self.repeats, 1), ("warmup", self.warmup, 0),
                                    ("mixed_batch", mixed_batch, 0), ("serving_batch", serving_batch, 0),
                                    ("decode_tokens", self.decode_tokens, 2)):
            if not is_int(value) or value < lowest:
                raise SettingError(name, value, f"allowed: an int >= {lowest}")
        if serving_batch and not supports_serving(preset):
            raise SettingError("serving_batch", serving_batch, f"preset {preset.name!r} has fixed-size images; the serving scenario "
                               "needs a native-resolution model (a Qwen2.5-VL preset), or 0 to skip it")
        for r in self.serving_ratios:
            if not is_number(r) or not 0 < r < 1:
                raise SettingError("serving_ratios", r, "allowed: keep ratios r with 0 < r < 1")
        low, high = self.mixed_text
        if not (is_int(low) and is_int(high) and 2 <= low <= high):
            raise SettingError("mixed_text", tuple(self.mixed_text), "allowed: (low, high) text tokens per prompt with 2 <= low <= high")
        for b in self.decode_batches:
            if not is_int(b) or b < 1:
                raise SettingError("decode_batches", b, "allowed: batch sizes >= 1")
        for k in self.keeps:
            if not is_int(k) or k < 1:
                raise SettingError("keeps", k, "allowed: ints K >= 1")
        skeleton = skeleton if skeleton is not None else preflight.preset_skeleton(preset)
        n = preflight.preset_visual_tokens(preset, skeleton)
        keeps = sorted(set(self.keeps or preset.default_keeps), reverse=True)
        for k in keeps:
            if k >= n:
                raise SettingError("keeps", k, f"preset {preset.name!r} has N = {n} visual tokens; allowed: 1 <= K <= {n - 1} "
                                   f"(K = {n} is the full model, which the report always includes)")
        return ReportPlan(preset, device, dtype_name, DTYPES[dtype_name], keeps, mixed_batch, serving_batch,
                          sorted(set(self.decode_batches)), n, skeleton)


@dataclass(frozen=True)
class ReportPlan:
    """Validated settings: the preset, where and in what dtype to run, the budgets K (largest first),
    the scenarios' batch sizes (0: skipped) and the preset image's visual tokens N."""

    preset: Preset
    device: torch.device
    dtype_name: str
    dtype: torch.dtype
    keeps: list[int]
    mixed_batch: int
    serving_batch: int
    decode_batches: list[int]
    visual_tokens: int
    skeleton: Any  # the preset's adapter on the meta device (shapes only)


