"""Model integrations: what the engine needs to know about each supported VLM.

This package owns the model-specific side of pruning (DESIGN.md section 4): how an image's
pre-projector features are computed, in which order the model lays an image's tokens out in the LLM
sequence (:class:`ImageLayout`, including LLaVA-NeXT's ``image_newline`` tokens), and how kept
features are projected. The engine (``autoselect_fast.engine``) is model-agnostic and talks to a
:class:`VLMAdapter`; :func:`get_adapter` picks the adapter for a model instance.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5, ``models/llava.py``) and
``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, ``models/llava_next.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's tokens sit in the LLM sequence, relative to the image's first slot.

    The image occupies ``num_slots`` consecutive positions of the unpruned prompt. ``num_tokens`` of
    them are visual tokens the Scorer scores and the budget K counts; the others are LLaVA-NeXT's
    ``image_newline`` tokens (one after each row of the crop grid), which are neither scored nor
    counted. Token ``i`` (the i-th visual token in sequence order, the order scores and selection
    use) comes from row ``source_index[i]`` of the encoder's feature rows of that image.

    Attributes:
        source_index: ``(N,)`` int64 rows of the encoder output (all tiles' patches, flattened).
        token_slot: ``(N,)`` int64 slot of each visual token, ascending.
        token_row: ``(N,)`` int64 crop-grid row closed by a newline, -1 for tokens without one
            (every LLaVA-1.5 token, LLaVA-NeXT's base-image tokens).
        newline_slot: ``(R,)`` int64 slot of each row's newline, row by row.
    """

    source_index: Tensor
    token_slot: Tensor
    token_row: Tensor
    newline_slot: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_slot.numel())

    @property
    def num_slots(self) -> int:
        return int(self.token_slot.numel() + self.newline_slot.numel())

    @classmethod
    def plain(cls, num_tokens: int) -> "ImageLayout":
        """Visual tokens only, in encoder order (LLaVA-1.5)."""
        ar = torch.arange(num_tokens)
        return cls(ar, ar, torch.full((num_tokens,), -1), torch.zeros(0, dtype=torch.int64))

    def kept_slots(self, kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slots of the pruned image: the kept tokens plus the newlines the newline rule keeps.

        Newline rule: a row's newline is kept, at its original slot, iff the row keeps at least one
        visual token. ``kept`` holds ascending token indices in ``[0, N)``.

        Returns ``(slots (V,), is_newline (V,) bool, kept_rows (R',))``, slots ascending; the visual
        tokens appear in ``slots`` in the order of ``kept``.
        """
        kept = kept.cpu()
        rows = torch.unique(self.token_row[kept])
        rows = rows[rows >= 0]
        slots = torch.cat([self.token_slot[kept], self.newline_slot[rows]])
        is_newline = torch.cat([torch.zeros(kept.numel(), dtype=torch.bool), torch.ones(rows.numel(), dtype=torch.bool)])
        order = torch.argsort(slots)
        return slots[order], is_newline[order], rows


@dataclass(frozen=True)
class TokenRegions:
    """Where each visual token of one image looks, in the original image's pixel coordinates.

    Attributes:
        boxes: ``(N, 4)`` float ``(x0, y0, x1, y1)`` per visual token (sequence order), clipped to the
            image; a token with no region (a CLS token) has NaNs.
        view: ``(N,)`` int64 index into ``view_names`` (LLaVA-NeXT: the base tile and the crop grid
            each cover the whole image), -1 for tokens with no region.
        view_names: one name per view.
    """

    boxes: Tensor
    view: Tensor
    view_names: tuple[str, ...]


class VLMAdapter:
    """Model-specific operations the engine calls; one subclass per supported model class."""

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        """The transformers classes the adapter handles."""
        raise NotImplementedError

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model  # LlavaModel / LlavaNextModel: vision tower, projector, language model
        self.config = model.config
        if isinstance(self.config.vision_feature_layer, bool) or not isinstance(self.config.vision_feature_layer, (int, list, tuple)):
            raise ValueError(f"config.vision_feature_layer must be an int or a list of ints, got {self.config.vision_feature_layer!r}")
        if self.config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"config.vision_feature_select_strategy must be 'default' or 'full', got {self.config.vision_feature_select_strategy!r}")

    # -- parts of the model -------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def image_token_id(self) -> int:
        token = getattr(self.config, "image_token_id", None)
        if token is None:  # older configs call it image_token_index
            token = getattr(self.config, "image_token_index")
        return int(token)

    @property
    def feature_dim(self) -> int:
        """d_v: width of the pre-projector features the Scorer reads."""
        layers = self.config.vision_feature_layer
        return self.config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.inner.vision_tower.parameters()).dtype

    def newline_embedding(self) -> Optional[Tensor]:
        """``(H,)`` embedding inserted at newline slots, ``None`` for models without newlines."""
        return None

    # -- images ---------------------------------------------------------------------------------
    def default_image_processor(self):
        raise NotImplementedError

    def process_image(self, image, image_processor) -> tuple[Tensor, Optional[tuple[int, int]]]:
        """A Pillow image -> ``(pixel_values of one image, image_size or None)``."""
        raise NotImplementedError

    def check_pixel_values(self, pixel_values: Tensor, image_size) -> tuple[Tensor, Optional[tuple[int, int]]]:
        """Normalise caller-supplied pixel values of one image (drop a batch dim of 1, check shape)."""
        raise NotImplementedError

    def layout(self, image_size: Optional[tuple[int, int]]) -> ImageLayout:
        raise NotImplementedError

    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Optional[tuple[int, int]]]) -> list[Tensor]:
        """Pre-projector features ``(N_i, d_v)`` of every image, tokens in sequence order."""
        raise NotImplementedError

    def token_regions(self, image_size: tuple[int, int], image_processor) -> TokenRegions:
        """Region of the original ``(height, width)`` image behind each visual token (for ``autoselect-fast show``),
        following ``image_processor``'s resizing, cropping and tiling."""
        raise NotImplementedError(f"{type(self).__name__} cannot map tokens to image regions")

    def project(self, features: Tensor) -> Tensor:
        """``(K, d_v)`` -> ``(K, H)``. The projector is per-token, so projecting the kept tokens equals
        keeping the projected ones."""
        projector = self.inner.multi_modal_projector
        dtype = next(projector.parameters()).dtype
        return projector(features.to(dtype))

    # -- shared helpers -------------------------------------------------------------------------
    def _vision_hidden_states(self, pixel_values: Tensor) -> Tensor:
        """``(tiles, P, d_v)`` features of ``config.vision_feature_layer`` as the model selects them."""
        tower = self.inner.vision_tower
        out = tower(pixel_values.to(device=self.device, dtype=self.vision_dtype), output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        states = [out.hidden_states[layer] for layer in layers]
        if self.config.vision_feature_select_strategy == "default":  # drop CLS
            states = [s[:, 1:] for s in states]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)


def _adapters() -> tuple[type[VLMAdapter], ...]:
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter

    return (LlavaAdapter, LlavaNextAdapter)


def supported_model_classes() -> tuple[str, ...]:
    return tuple(c.__name__ for adapter in _adapters() for c in adapter.model_classes())


def get_adapter(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``; TypeError naming the class when it is not supported."""
    for adapter in _adapters():
        if isinstance(model, adapter.model_classes()):
            return adapter(model)
    raise TypeError(f"model must be one of {supported_model_classes()}, got {type(model).__name__}")


__all__ = ["ImageLayout", "TokenRegions", "VLMAdapter", "get_adapter", "supported_model_classes"]
