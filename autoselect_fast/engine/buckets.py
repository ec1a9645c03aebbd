"""Shape buckets of the runner (``engine.runner``) and its configuration and counters.

A CUDA graph replays fixed shapes, so every stage the runner graphs rounds its batch up to a bucket:
packed prefill tokens (:func:`prefill_bucket_schedule`), requests per prefill, images (tiles) per vision
call. :class:`RunnerConfig` holds the ladders and switches; :class:`StageStats` counts what ran how.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..validation import is_int

DEFAULT_LARGEST_PREFILL_BUCKET = 4096
#: Requests per prefill graph (the padding segment comes on top). Each bucket is a graph per token
#: bucket; a coarse ×4 ladder keeps the graph count down, and empty segments cost varlen attention only
#: an early exit per (segment, row block, head).
DEFAULT_REQUEST_BUCKETS = (1, 4, 16, 64)
#: Images (LLaVA-1.5) or tiles (LLaVA-NeXT) per vision / pruning graph. A CLIP-L/336 tile is already
#: compute-bound (577 tokens through 24 layers), so a padding tile costs as much as a real one: exact
#: counts up to 6 (a LLaVA-NeXT image is 3 to 5 tiles), then steps of at most a quarter.
DEFAULT_VISION_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
STAGES = ("prefill", "vision", "prune")
MODES = ("graphs", "padded", "eager")


def prefill_bucket_schedule(largest: int = DEFAULT_LARGEST_PREFILL_BUCKET) -> tuple[int, ...]:
    """Packed-token buckets: every 32 tokens up to 512, then 8 buckets per doubling up to ``largest``.

    ``32, 64, ..., 512, 576, 640, ..., 1024, 1152, ..., 2048, 2304, ..., 4096`` (40 buckets for 4096).
    Why: below a few hundred tokens a 7B prefill is bound by reading the weights (an H200 turns
    ~200 FLOPs per fp16 weight byte, i.e. ~200 tokens, before compute dominates), so padding a batch
    there by up to 31 tokens costs next to nothing; above 512 the prefill is compute-bound and the
    steps grow with the size (1/8 of the octave: 64 from 512, 128 from 1024, 256 from 2048), which caps
    the padding at 12.5 % of the tokens while the number of graphs grows only logarithmically.
    vLLM's decode ladder (8-token steps to 256, 16 to 512) is finer because a decode step is one token
    per request; SGLang's prefill ladders are coarser still. ``largest`` is the last bucket
    (appended when the ladder does not land on it); a batch above it runs eagerly.
    """
    if not is_int(largest) or largest < 1:
        raise ValueError(f"largest must be an int >= 1 (packed tokens), got {largest!r}")
    buckets, size = [], 0
    while size < largest:
        step = 32 if size < 512 else (1 << (size.bit_length() - 1)) // 8
        size = min(size + step, largest)
        buckets.append(size)
    return tuple(buckets)


def bucket_for(size: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= ``size``, or ``None`` above the largest (a plain scan: ladders are short, and Dynamo traces it)."""
    return next((bucket for bucket in buckets if bucket >= size), None)


def _check_ladder(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of increasing ints >= 1, got {value!r}")
    if not all(is_int(v) and v >= 1 for v in value) or any(a >= b for a, b in zip(value[:-1], value[1:])):
        raise ValueError(f"{name} must be a non-empty list of increasing ints >= 1, got {list(value)!r}")
    return tuple(value)


@dataclass
class RunnerConfig:
    """How an engine's device stages run (see the module docstring).

    Attributes:
        cuda_graphs: capture and replay CUDA graphs on a CUDA device (ignored elsewhere). ``False``
            keeps the eager path of every stage.
        pad_to_buckets: pad to the buckets without graphs (``True``; on a CPU this is the tested
            padded path), or not at all (``False``, only with graphs off). ``None``: pad exactly when
            graphs are used.
        prefill_buckets: packed-token buckets, increasing; default :func:`prefill_bucket_schedule`
            up to ``largest_prefill_bucket``.
        largest_prefill_bucket: the last bucket of the default schedule.
        request_buckets: requests per prefill graph.
        vision_buckets: images (LLaVA-1.5) or tiles (LLaVA-NeXT) per vision and pruning graph.
        max_graphs: graphs per stage at most; a new shape beyond it runs eagerly (counted).
        warmup_calls: eager calls on a side stream before a capture (cuBLAS/Triton set-up, compilation).
        compile_language_model: ``torch.compile`` the padded prefill step (each bucket compiles once;
            off by default); ``compile_options`` are passed to ``torch.compile`` (e.g. ``mode``, ``backend``).
    """

    cuda_graphs: bool = True
    pad_to_buckets: Optional[bool] = None
    prefill_buckets: Optional[Sequence[int]] = None
    largest_prefill_bucket: int = DEFAULT_LARGEST_PREFILL_BUCKET
    request_buckets: Sequence[int] = DEFAULT_REQUEST_BUCKETS
    vision_buckets: Sequence[int] = DEFAULT_VISION_BUCKETS
    max_graphs: int = 128
    warmup_calls: int = 2
    compile_language_model: bool = False
    compile_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "compile_language_model"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.pad_to_buckets is not None and not isinstance(self.pad_to_buckets, bool):
            raise TypeError(f"pad_to_buckets must be None or a bool, got {self.pad_to_buckets!r}")
        if self.prefill_buckets is None:
            self.prefill_buckets = prefill_bucket_schedule(self.largest_prefill_bucket)
        self.prefill_buckets = _check_ladder("prefill_buckets", self.prefill_buckets)
        self.request_buckets = _check_ladder("request_buckets", self.request_buckets)
        self.vision_buckets = _check_ladder("vision_buckets", self.vision_buckets)
        for name, low in (("max_graphs", 0), ("warmup_calls", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.compile_options, dict):
            raise TypeError(f"compile_options must be a dict of torch.compile keyword arguments, got {type(self.compile_options).__name__}")
        if self.compile_options.get("mode") in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_options mode={self.compile_options['mode']!r} captures its own CUDA graphs; the runner captures the "
                             "compiled step itself: use mode='default' or 'max-autotune-no-cudagraphs'")


@dataclass
class StageStats:
    """What one stage did: graph replays, captures, padded eager runs (no graph) and eager runs by reason."""

    graph_replays: int = 0
    captures: int = 0
    padded: int = 0
    eager: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"graph_replays": self.graph_replays, "captures": self.captures, "padded": self.padded, "eager": dict(self.eager)}
