"""Wall-clock measurement shared by the CLI report and the benchmark scripts.

``measure`` runs warm-up calls, then times each repeat on its own: with CUDA events on a GPU (the
stream is synchronised before reading them), with ``time.perf_counter`` on the CPU. It reports the
median with min and max. ``Stopwatch`` times named stages of one run (synchronising CUDA around each
stage); ``summarize`` turns samples into median/min/max and ``is_noisy`` says when their spread is too
wide to trust (``NOISE_MAX_OVER_MIN``). ``environment`` describes the machine and library versions
for the JSON results, so a number can always be traced to where it was measured.
``gpu_timeline_ms`` times a CUDA step as a captured CUDA graph replayed back to back: the GPU's own time
per call without Python launch overhead (what a kernel costs inside a served model's graph).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (min {self.min_ms:.3f}, max {self.max_ms:.3f}, n={self.repeats})"


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 3, repeats: int = 20) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with torch.cuda.device(device):  # events go on the current stream of the current device: make it this one
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def turning_order(count: int, round_: int) -> list[int]:
    """Indices ``0..count-1`` starting ``round_`` places further along each round: interleaved timing in
    which no contender always runs first (cold, or right after another's work)."""
    return [(round_ + j) % count for j in range(count)]


def gpu_timeline_ms(fn: Callable[[], object], *, replays: int = 200, warmup: int = 3, graph: bool = True) -> tuple[float, str]:
    """GPU time per call of ``fn`` (CUDA), in ms, and how it was taken.

    ``fn`` is captured once into a CUDA graph (after ``warmup`` calls on a side stream, as capture
    requires) and the graph is replayed ``replays`` times between two CUDA events: launch overhead
    is gone, what remains is the kernels' time on the GPU. A step that cannot be captured (it reads a
    device value on the host, say) is timed instead as ``replays`` eager calls back to back between
    two events, and the method string says so, with the capture error. ``graph=False`` skips the
    capture (a step drawing from torch's CUDA generator, say, which a failed capture can leave broken).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def per_call_ms(step: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start.record()
        for _ in range(replays):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    method = "eager back-to-back (no capture asked)"
    if graph:
        try:
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                fn()
            captured.replay()  # one untimed replay
            return per_call_ms(captured.replay), "cuda-graph replay"
        except Exception as exc:  # capture failed: fall back to eager calls, and say so
            method = f"eager back-to-back (graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return per_call_ms(fn), method


# A measurement whose slowest repeat is more than this many times its fastest is reported as noisy:
# on a quiet machine repeats of the same prefill agree within a few per cent.
NOISE_MAX_OVER_MIN = 1.3


def summarize(samples_ms: Sequence[float]) -> dict:
    """``{"median_ms", "min_ms", "max_ms"}`` of some samples."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    return {"median_ms": statistics.median(samples_ms), "min_ms": min(samples_ms), "max_ms": max(samples_ms)}


def is_noisy(summary: dict, threshold: float = NOISE_MAX_OVER_MIN) -> bool:
    """True when max/min of a :func:`summarize` result exceeds ``threshold``."""
    return summary["min_ms"] > 0 and summary["max_ms"] / summary["min_ms"] > threshold


class Stopwatch:
    """Wall-clock per named stage of one run; synchronises CUDA around each stage so GPU work lands in it."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.ms = torch.device(device), {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


def _package_version() -> str:
    """This package's version, with the git commit (and "+dirty") when it runs from a checkout."""
    import subprocess

    from . import __version__

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return __version__
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return f"{__version__} ({sha.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''})"
    except (OSError, subprocess.SubprocessError):  # no git: the version alone
        return __version__


def environment(device: torch.device | str = "cpu") -> dict:
    """Device and library versions, for results files."""
    import transformers

    device = torch.device(device)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "autoselect_fast": _package_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency, but keep results writable without it
        info["triton"] = None
    return info
