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

    # ==========================================================================================
    # Training (autoselect_fast.training): the full, unpruned sequence of one sample with its
    # gated visual features in place. Additive section; nothing above depends on it.
    # ==========================================================================================
    def training_sequence(self, input_ids: Tensor, labels: Tensor, visual_embeds: Tensor, image_size) -> tuple[Tensor, Tensor, Tensor]:
        """One sample's LLM input during training: nothing is pruned, the image is in its full layout.

        Args:
            input_ids: ``(L,)`` text token ids holding the model's image token once (the placeholder)
                or as the already expanded run of ``layout(image_size).num_slots`` tokens.
            labels: ``(L,)`` target ids aligned with ``input_ids`` (-100 where there is no target).
            visual_embeds: ``(N, H)`` the image's visual tokens after the projector, in sequence order.
            image_size: as for :meth:`layout`.
        Returns:
            ``(inputs_embeds (S, H), position_ids (S,), labels (S,))`` with -100 at every visual slot.
            Models with multi-axis positions (M-RoPE) override this and return ``(3, S)`` positions.
        """
        from ..engine import _find_image_run  # one home for the placeholder rule (engine imports this package)

        ids = [int(t) for t in input_ids.tolist()]
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        start, run = _find_image_run(ids, self.image_token_id, 0)
        layout = self.layout(image_size)
        if run not in (1, layout.num_slots):
            raise ValueError(f"a training sample has a run of {run} image tokens; expected 1 placeholder or the expanded run of {layout.num_slots}")
        if visual_embeds.dim() != 2 or visual_embeds.shape[0] != layout.num_tokens:
            raise ValueError(f"visual_embeds must have shape ({layout.num_tokens}, H) for this image, got {tuple(visual_embeds.shape)}")
        device = visual_embeds.device
        text_ids = torch.tensor(ids[:start] + ids[start + run:], dtype=torch.int64, device=device)
        text_labels = torch.cat([labels[:start], labels[start + run:]]).to(device=device, dtype=torch.int64)
        text_embeds = self.embed_tokens(text_ids)
        visual = visual_embeds.new_zeros(layout.num_slots, visual_embeds.shape[-1])
        visual = visual.index_copy(0, layout.token_slot.to(device), visual_embeds)
        newline = self.newline_embedding()
        if layout.newline_slot.numel():
            rows = newline.to(device=device, dtype=visual.dtype).expand(layout.newline_slot.numel(), -1)
            visual = visual.index_copy(0, layout.newline_slot.to(device), rows)
        embeds = torch.cat([text_embeds[:start], visual.to(text_embeds.dtype), text_embeds[start:]])
        seq_labels = torch.cat([text_labels[:start], text_labels.new_full((layout.num_slots,), -100), text_labels[start:]])
        return embeds, torch.arange(embeds.shape[0], device=device), seq_labels

    def training_logits(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, rows: Tensor) -> Tensor:
        """Logits of the frozen LLM at the flat ``rows`` of a right-padded ``(B, S, H)`` batch.

        ``lm_head`` runs only on the rows that predict a target, which keeps its vocab-sized output
        small. ``position_ids`` is ``(B, S)`` (or ``(3, B, S)`` for M-RoPE models).
        """
        hidden = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1])[rows])


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


__all__ = ["ImageLayout", "VLMAdapter", "get_adapter", "supported_model_classes"]
