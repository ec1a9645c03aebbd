"""autoselect_fast: learned visual-token pruning (AutoSelect) for vision-language models.

The public API, imported on first use (``import autoselect_fast`` itself loads neither torch nor
transformers, and never vLLM):

* the engine: :class:`AutoSelectEngine`, its request types :class:`Request`, :class:`ImageInput`,
  :func:`build_requests` and results :class:`PrefillOutput`, :class:`GenerateOutput`
  (``autoselect_fast.engine``);
* the Scorer: :class:`Scorer`, :class:`ScorerConfig` (``autoselect_fast.modules``);
* the fused ops: ``ops`` (``select``, ``soft_topk``, ``vp_gate``).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AutoSelectEngine": "autoselect_fast.engine",
    "Request": "autoselect_fast.engine",
    "ImageInput": "autoselect_fast.engine",
    "build_requests": "autoselect_fast.engine",
    "PreparedBatch": "autoselect_fast.engine",
    "PruneResult": "autoselect_fast.engine",
    "PrefillOutput": "autoselect_fast.engine",
    "GenerateOutput": "autoselect_fast.engine",
    "Scorer": "autoselect_fast.modules",
    "ScorerConfig": "autoselect_fast.modules",
}
_SUBMODULES = ("ops",)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
