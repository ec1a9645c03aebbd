"""Model integrations: what the engine (and the trainer) need to know about each supported VLM.

This package owns the model-specific side of pruning (DESIGN.md sections 3 and 4): how an image is
processed, how its pre-projector features are computed (the Scorer's input, tokens in sequence
order), in which order the model lays an image's tokens out in the LLM sequence (:class:`ImageLayout`,
including LLaVA-NeXT's ``image_newline`` tokens), how kept features are projected, and which position
ids the unmodified model gives a full (unpruned) sequence: 1-D for LLaVA, ``(3, L)`` M-RoPE for
Qwen2.5-VL. The engine (``autoselect_fast.engine``) is model-agnostic and talks to a
:class:`VLMAdapter`; :func:`get_adapter` picks the adapter for a model instance.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5, ``models/llava.py``),
``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, ``models/llava_next.py``) and
``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL, ``models/qwen2_5_vl.py``).
"""
from __future__ import annotations

from torch import nn

from .base import ImageLayout, TokenRegions, VLMAdapter


def _adapters() -> tuple[type[VLMAdapter], ...]:
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter
    from .qwen2_5_vl import Qwen2_5_VLAdapter

    return (LlavaAdapter, LlavaNextAdapter, Qwen2_5_VLAdapter)


def supported_model_classes() -> tuple[str, ...]:
    return tuple(c.__name__ for adapter in _adapters() for c in adapter.model_classes())


def get_adapter(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``; TypeError naming the class when it is not supported."""
    for adapter in _adapters():
        if isinstance(model, adapter.model_classes()):
            return adapter(model)
    raise TypeError(f"model must be one of {supported_model_classes()}, got {type(model).__name__}")


__all__ = ["ImageLayout", "TokenRegions", "VLMAdapter", "get_adapter", "supported_model_classes"]
