"""The model-neutral side of the adapters: :class:`VLMAdapter` (what the engine and the trainer ask of a
model), :class:`ImageLayout` (where an image's tokens sit in the LLM sequence) and :class:`TokenRegions`.
One subclass of :class:`VLMAdapter` per model family lives beside this module; ``autoselect_fast.models``
picks one for a model instance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..placeholders import expand, image_runs, strip_runs
from ..ragged import to_device

# Image layouts kept per adapter, keyed by image size or grid: a server meets new sizes without end.
LAYOUT_CACHE_SIZE = 1024


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
        if not self.newline_slot.numel():  # no newline rule: a gather on kept's device, no host read
            slots = to_device(self.token_slot, kept.device)[kept]
            return slots, torch.zeros(kept.numel(), dtype=torch.bool), torch.zeros(0, dtype=torch.int64)
        kept = kept.cpu()  # the newline rule's sizes depend on which tokens were kept
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
    """Model-specific operations the engine calls; one subclass per supported model family.

    Images are handled one by one on the host (``process_image`` / ``check_pixel_values`` /
    ``layout``) and all together on the device (``encode``: one vision call per batch). An image's
    "size" is whatever the model needs besides its pixels: ``None`` (LLaVA-1.5), the original
    ``(height, width)`` (LLaVA-NeXT) or the patch grid ``(t, h, w)`` (Qwen2.5-VL).
    """

    #: Rows of the position ids: 1 (plain 1-D positions) or 3 (M-RoPE: temporal, height, width).
    position_rows: int = 1
    #: True when a fixed budget ``keep`` larger than an image's N is clipped to N (models whose N varies
    #: with the image's resolution); False when it is an error.
    clips_keep_to_tokens: bool = False

    @property
    def fixed_num_tokens(self) -> Optional[int]:
        """N when every image has the same number of visual tokens (LLaVA-1.5), else None: a fixed
        ``keep`` above it can then be refused before any image is seen."""
        return None

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        """The transformers classes the adapter handles."""
        raise NotImplementedError

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model  # the model without lm_head: vision tower, projector/merger, language model
        self.config = model.config

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
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: ``[0, vocab_size)`` (rows of the input embedding)."""
        return int(self.embed_tokens.num_embeddings)

    @property
    def max_positions(self) -> Optional[int]:
        """The language model's ``max_position_embeddings`` (None when its config has none): the most new
        tokens a request may ask for (its KV cache is sized for the prompt plus them)."""
        value = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        return None if value is None else int(value)

    @property
    def image_token_id(self) -> int:
        token = getattr(self.config, "image_token_id", None)
        if token is None:  # older configs call it image_token_index
            token = self.config.image_token_index
        return int(token)

    @property
    def unsupported_token_ids(self) -> dict[int, str]:
        """Token ids a prompt must not hold, with the reason (e.g. video placeholders)."""
        return {}

    @property
    def feature_dim(self) -> int:
        """d_v: width of the pre-projector features the Scorer reads."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def newline_embedding(self) -> Optional[Tensor]:
        """``(H,)`` embedding inserted at newline slots, ``None`` for models without newlines."""
        return None

    # -- images (host) --------------------------------------------------------------------------
    def default_image_processor(self):
        raise NotImplementedError

    def process_image(self, image, image_processor) -> tuple[Tensor, Any]:
        """A Pillow image -> ``(pixel_values of one image, image size)``."""
        raise NotImplementedError

    def check_pixel_values(self, pixel_values: Tensor, image_size) -> tuple[Tensor, Any]:
        """Normalise caller-supplied pixel values of one image (drop a batch dim of 1, check shape)."""
        raise NotImplementedError

    def layout(self, image_size) -> ImageLayout:
        raise NotImplementedError

    def image_size_of(self, height: int, width: int, image_processor) -> Any:
        """The image size (as :meth:`layout` takes it) of an original ``height x width`` image under
        ``image_processor``, from the header alone: N is known before any pixel is decoded."""
        raise NotImplementedError

    def image_prompt_text(self, tokenizer) -> str:
        """The text one image takes in a prompt before expansion (the chat template's rendering of an image)."""
        return tokenizer.convert_ids_to_tokens(self.image_token_id)

    # -- images (device) ------------------------------------------------------------------------
    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> list[Tensor]:
        """Pre-projector features ``(N_i, d_v)`` of every image, tokens in sequence order (one vision call)."""
        raise NotImplementedError

    def cls_attention_unavailable(self) -> Optional[str]:
        """Why :meth:`encode_with_cls_attention` cannot work on this model (``None`` when it can)."""
        return "its vision tower has no [CLS] token"

    def encode_with_cls_attention(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`encode` plus, per image, the ``(N_i,)`` attention the [CLS] token pays each visual token in
        the feature layer, summed over heads (the ``visionzip`` selector's scores); one vision call."""
        raise ValueError(f"{type(self.model).__name__} has no [CLS] attention: {self.cls_attention_unavailable()}")

    def token_regions(self, image_size: tuple[int, int], image_processor) -> TokenRegions:
        """Region of the original ``(height, width)`` image behind each visual token (for ``autoselect-fast show``),
        following ``image_processor``'s resizing, cropping and tiling."""
        raise NotImplementedError(f"{type(self).__name__} cannot map tokens to image regions")

    def project(self, features: Tensor) -> Tensor:
        """``(K, d_v)`` -> ``(K, H)``, per token: projecting the kept tokens equals keeping projected ones."""
        raise NotImplementedError

    # -- sequences ------------------------------------------------------------------------------
    def sequence_positions(self, input_ids: Tensor, image_sizes: Sequence[Any]) -> Tensor:
        """``(position_rows, L)`` positions the unmodified model gives the full, expanded sequence.

        ``input_ids`` ``(L,)`` holds every image's full run of image tokens (``layout.num_slots`` each,
        images in order); ``image_sizes`` has one entry per image. Default: ``0..L-1``.
        """
        return torch.arange(input_ids.numel()).view(1, -1)

    def image_slot_embeddings(self, layout: ImageLayout, kept: Tensor, projected: Tensor) -> tuple[Tensor, Tensor]:
        """The pruned image's slots and their embeddings: kept tokens plus the newlines the rule keeps.

        ``kept`` ``(K,)`` ascending token indices in ``[0, N)``, ``projected`` ``(K, H)`` their projected
        features. Returns ``(slots (V,), embeds (V, H))``, slots ascending. With ``kept = arange(N)``
        this is the whole image as the unmodified model feeds it to the LLM.
        """
        slots, is_newline, _ = layout.kept_slots(kept)
        if not layout.newline_slot.numel() or not bool(is_newline.any()):  # is_newline is a host tensor
            return slots, projected
        embeds = projected.new_empty(slots.numel(), projected.shape[-1])
        is_newline = is_newline.to(projected.device)
        embeds[~is_newline] = projected
        embeds[is_newline] = self.newline_embedding().to(projected.dtype)
        return slots, embeds

    def embed_full_sequence(self, input_ids: Tensor, image_sizes: Sequence[Any], projected: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Input embeddings ``(L, H)`` and positions ``(position_rows, L)`` of one unpruned sequence.

        For a trainer that feeds the frozen LLM its own (e.g. gated and denoised) projected features:
        ``input_ids`` ``(L,)`` is the expanded sequence, ``projected[i]`` ``(N_i, H)`` image i's
        projected tokens in sequence order. Newline tokens are inserted by the layout.
        """
        image_token = self.image_token_id
        embeds = self.embed_tokens(input_ids.to(self.device))
        is_image = (input_ids == image_token).cpu()
        pieces = []
        for size, proj in zip(image_sizes, projected):
            layout = self.layout(size)
            _, slot_embeds = self.image_slot_embeddings(layout, torch.arange(layout.num_tokens), proj)
            pieces.append(slot_embeds)
        visual = torch.cat(pieces).to(embeds.dtype) if pieces else embeds[:0]
        if visual.shape[0] != int(is_image.sum()):
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but the images take {visual.shape[0]} slots")
        embeds = embeds.clone()
        embeds[is_image.to(embeds.device)] = visual
        return embeds, self.sequence_positions(input_ids.cpu(), image_sizes)

    # -- training (autoselect_fast.training) ----------------------------------------------------
    def training_sequence(self, input_ids: Tensor, labels: Tensor, projected: Tensor, image_size) -> tuple[Tensor, Tensor, Tensor]:
        """One sample's LLM input during training: nothing is pruned, the image is in its full layout.

        Model-neutral: the placeholder is expanded to the image's ``layout(image_size).num_slots``
        tokens and :meth:`embed_full_sequence` does the rest (newline tokens from the layout, positions
        from :meth:`sequence_positions`, so M-RoPE models get their ``(3, S)`` positions unchanged).

        Args:
            input_ids: ``(L,)`` text token ids holding the model's image token once (the placeholder)
                or as the already expanded run of ``layout(image_size).num_slots`` tokens.
            labels: ``(L,)`` target ids aligned with ``input_ids`` (-100 where there is no target).
            projected: ``(N, H)`` the image's visual tokens after the projector / merger, in sequence order.
            image_size: as for :meth:`layout`.
        Returns:
            ``(inputs_embeds (S, H), positions, labels (S,))`` with -100 at every image slot; positions
            are ``(S,)`` for 1-D models and ``(position_rows, S)`` otherwise, on ``projected``'s device.
        """
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        ids = [int(t) for t in input_ids.tolist()]
        runs = image_runs(ids, self.image_token_id)
        if len(runs) != 1:
            raise ValueError(f"a training sample must hold the image token (id {self.image_token_id}) in one run, got {len(runs)} runs")
        _, run = runs[0]
        layout = self.layout(image_size)
        if run not in (1, layout.num_slots):
            raise ValueError(f"a training sample has a run of {run} image tokens; expected 1 placeholder or the expanded run of {layout.num_slots}")
        if projected.dim() != 2 or projected.shape[0] != layout.num_tokens:
            raise ValueError(f"projected must have shape ({layout.num_tokens}, H) for this image, got {tuple(projected.shape)}")
        text, insert_at = strip_runs(ids, runs)
        expanded = expand(text, insert_at, [layout.num_slots], self.image_token_id)
        label_text, _ = strip_runs(labels.to(torch.int64).cpu().tolist(), runs)
        seq_labels = expand(label_text, insert_at, [layout.num_slots], -100)
        embeds, positions = self.embed_full_sequence(expanded, [image_size], [projected])
        device = projected.device
        positions = positions.to(device)
        return embeds.to(device), positions[0] if self.position_rows == 1 else positions, seq_labels.to(device)

    def training_logits(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, rows: Tensor) -> Tensor:
        """Logits of the frozen LLM at the flat ``rows`` of a right-padded ``(B, S, H)`` batch.

        ``lm_head`` runs only on the rows that predict a target, which keeps its vocab-sized output
        small. ``position_ids`` is ``(B, S)`` (or ``(3, B, S)`` for M-RoPE models).
        """
        hidden = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.lm_head(hidden.reshape(-1, hidden.shape[-1])[rows])
