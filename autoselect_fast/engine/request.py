"""Requests and their host-side preparation: the engine's stage 1.

This module owns the request types (:class:`ImageInput`, :class:`Request`, :func:`build_requests`),
prompt parsing and validation (token ids, placeholders against images, generation limits) and
:func:`prepare_batch`, which turns a list of requests into a :class:`PreparedBatch`: text tokens with
the placeholders removed, processed pixels, image layouts, budgets, score-cache keys and the positions
the unmodified model gives every full (unpruned) sequence. Everything here runs on the host.

Images are attached one way, ``images=[...]``; the single-image fields of :class:`Request`
(``image``, ``pixel_values``, ``image_sizes``, ``image_id``) are a convenience that
:meth:`Request.attached_images` maps onto it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..caching import image_fingerprint
from ..models import ImageLayout, VLMAdapter
from ..placeholders import expand, image_runs, strip_runs, text_columns
from ..ragged import cu_seqlens_from_lengths, segment_bounds, to_device
from ..validation import is_int

Prompt = Union[str, Sequence[int], Tensor]

__all__ = ["ImageInput", "Request", "PreparedBatch", "Prompt", "build_requests", "prepare_batch", "stop_set", "check_max_new_tokens"]


@dataclass
class ImageInput:
    """One image for :attr:`Request.images`: processed ``pixel_values``, or a Pillow ``image``.

    ``pixel_values`` as the model's image processor returns them for this one image, ``image_size`` what
    the model needs besides (LLaVA-1.5: nothing; LLaVA-NeXT: the original ``(height, width)``;
    Qwen2.5-VL: ``image_grid_thw`` ``(t, h, w)``), ``image_id`` the score-cache key (default: pixel hash).
    ``image`` instead of ``pixel_values``: a Pillow image, processed by the engine's image processor.
    """

    pixel_values: Optional[Tensor] = None
    image_size: Any = None
    image_id: Optional[Hashable] = None
    image: Any = None


@dataclass
class Request:
    """One prompt with zero, one or several images, and its generation limits.

    Images: ``images=[...]``, each a Pillow image, a pixel tensor or an :class:`ImageInput`, in the
    order of their placeholders. For one image, ``image`` (Pillow) or ``pixel_values`` plus
    ``image_sizes``, with an optional ``image_id``, are shorthands for ``images=[ImageInput(...)]``.
    No image: a text-only request.

    ``prompt`` is a list/tensor of token ids or a string (with a tokenizer/processor given to the
    engine). It holds one run of the model's image token per image, in order: one placeholder token
    (the engine expands it) or the already expanded run. ``max_new_tokens`` and ``stop_token_ids``
    override / extend the defaults of ``AutoSelectEngine.generate`` for this request; ``seed``
    seeds this request's own sampling generator (its samples then depend on nothing else in the batch).
    """

    prompt: Prompt
    image: Any = None
    pixel_values: Optional[Tensor] = None
    image_sizes: Any = None
    image_id: Optional[Hashable] = None
    images: Optional[Sequence[Any]] = None
    max_new_tokens: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None
    seed: Optional[int] = None
    videos: Any = None

    def attached_images(self, index: int = 0) -> list[ImageInput]:
        """The request's images as :class:`ImageInput`, in placeholder order (``index`` names it in errors)."""
        if self.videos is not None:
            raise ValueError(f"request {index} has videos: video input is not supported yet; give still images")
        if self.images is not None:
            if self.image is not None or self.pixel_values is not None or self.image_sizes is not None:
                raise ValueError(f"request {index} gives images=[...] and image/pixel_values/image_sizes; give several images as images=[...] only (ImageInput for processed pixels)")
            if isinstance(self.images, (str, Tensor)) or not isinstance(self.images, Sequence):
                raise TypeError(f"images of request {index} must be a list of Pillow images / ImageInput, got {type(self.images).__name__}")
            items = [_as_image_input(item) for item in self.images]
        elif self.image is not None and self.pixel_values is not None:
            raise ValueError(f"request {index} must carry each image once: give image (Pillow) or pixel_values, not both")
        elif self.image is not None:
            items = [ImageInput(image=self.image, image_id=self.image_id)]
        elif self.pixel_values is not None:
            items = [ImageInput(self.pixel_values, self.image_sizes, self.image_id)]
        else:
            items = []
        for j, item in enumerate(items):
            if (item.image is None) == (item.pixel_values is None):
                raise ValueError(f"image {j} of request {index} must give exactly one of pixel_values and image (Pillow)")
            if item.image is not None and not _is_picture(item.image):  # else the processor's own, nameless error
                raise TypeError(f"image {j} of request {index} must be a Pillow image or an (H, W[, C]) numpy array, got "
                                f"{type(item.image).__name__}; processed pixels go in pixel_values")
        return items


def _is_picture(image) -> bool:
    import numpy as np
    from PIL import Image

    return isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim in (2, 3))


def _as_image_input(item) -> ImageInput:
    if isinstance(item, ImageInput):
        return item
    if isinstance(item, Tensor):
        return ImageInput(pixel_values=item)
    return ImageInput(image=item)


@dataclass
class PreparedBatch:
    """Output of :func:`prepare_batch`: everything host-side the later stages need.

    Requests: ``text_ids`` are all requests' text tokens with the image placeholders removed, request
    after request (``text_cu_seqlens``); ``full_positions[r]`` ``(rows, L_r)`` are the positions the
    unmodified model gives request r's full (unpruned) sequence (rows = 1, or 3 for M-RoPE).
    Images (all images of the batch, request after request): image i belongs to request
    ``image_request[i]`` and goes after ``insert_at[i]`` of its request's text tokens.
    ``token_positions`` ``(ΣN,)`` or ``(3, ΣN)`` are the full-sequence positions of every visual token.
    """

    text_ids: Tensor
    text_cu_seqlens: Tensor
    image_request: Tensor
    insert_at: Tensor
    pixel_values: list[Tensor]
    image_sizes: list[Any]
    layouts: list[ImageLayout]
    image_keys: list[Hashable]
    budgets: list[int]
    token_positions: Tensor
    full_positions: list[Tensor]
    max_new_tokens: list[Optional[int]] = field(default_factory=list)
    stop_token_ids: list[frozenset] = field(default_factory=list)
    seeds: list[Optional[int]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.text_cu_seqlens.numel() - 1

    @property
    def num_images(self) -> int:
        return len(self.layouts)

    def images_of(self, request: int) -> list[int]:
        """Indices of request ``request``'s images, in sequence order."""
        return [i for i, r in enumerate(self.image_request.tolist()) if r == request]

    def pruned_positions(self, slots: list[Tensor], position_mode: str, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Positions of the text tokens ``(rows, ΣLt)`` (host) and of the kept image slots ``(rows, ΣV)``
        (on ``device``), given each image's kept ``slots``.

        ``original``: each token's column in the full sequence, looked up in the positions the model gives
        that sequence (gaps remain; M-RoPE rows gathered alike). ``compact``: the column in the pruned
        sequence, the same on every row. Rows are squeezed away for 1-D positions.
        """
        text_parts, visual_parts = [], [None] * self.num_images
        for r, (s, e) in enumerate(segment_bounds(self.text_cu_seqlens)):
            images = self.images_of(r)
            insert_at = [int(self.insert_at[i]) for i in images]
            if position_mode == "original":
                columns, starts = text_columns(e - s, insert_at, [self.layouts[i].num_slots for i in images])
                full = self.full_positions[r]
                text_parts.append(full[:, columns])
                for i, start in zip(images, starts):  # gathered where the slots are: no device index read on the host
                    visual_parts[i] = to_device(full, slots[i].device)[:, start + slots[i]]
            else:
                columns, starts = text_columns(e - s, insert_at, [slots[i].numel() for i in images])
                text_parts.append(columns.expand(rows, -1))
                for i, start in zip(images, starts):
                    visual_parts[i] = (start + torch.arange(slots[i].numel())).expand(rows, -1)
        text = torch.cat(text_parts, dim=1)
        visual = torch.cat([to_device(v, device) for v in visual_parts], dim=1) if visual_parts else torch.zeros(rows, 0, dtype=torch.int64)
        return (text[0], visual[0]) if rows == 1 else (text.contiguous(), visual.contiguous())


def build_requests(prompts: Sequence[Prompt], images: Sequence[Any], *, image_sizes=None, image_ids=None) -> list[Request]:
    """Pair prompts with images (Pillow images or pixel tensors); ValueError when the counts differ."""
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if isinstance(images, Tensor) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list with one image per prompt, got {type(images).__name__}")
    if len(prompts) != len(images):
        raise ValueError(f"images and prompts must pair up one to one: got {len(images)} image(s) and {len(prompts)} prompt(s)")
    for name, extra in (("image_sizes", image_sizes), ("image_ids", image_ids)):
        if extra is not None and len(extra) != len(prompts):
            raise ValueError(f"{name} must have one entry per prompt ({len(prompts)}), got {len(extra)}")
    out = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        is_tensor = isinstance(image, Tensor)
        out.append(Request(
            prompt=prompt,
            image=None if is_tensor else image,
            pixel_values=image if is_tensor else None,
            image_sizes=None if image_sizes is None else image_sizes[i],
            image_id=None if image_ids is None else image_ids[i],
        ))
    return out


# --------------------------------------------------------------------------------------------------
# Prompt parsing and argument checks
# --------------------------------------------------------------------------------------------------
def check_max_new_tokens(name: str, value, limit: Optional[int] = None) -> int:
    """``1 <= value`` and, with ``limit`` (the model's ``max_position_embeddings``), ``value <= limit``: the
    decode cache is sized for the prompt plus ``value`` tokens, so a huge value fails here, not in the allocator."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be <= {limit} (the model's max_position_embeddings), got {value!r}")
    return value


def stop_set(name: str, value, vocab_size: Optional[int] = None) -> frozenset:
    """Stop tokens as a set of ints: ``None``, one int or a sequence of ints (or an integer tensor); with
    ``vocab_size``, each must be a token the model can emit (a stop id outside it would never stop anything)."""
    if value is None:
        return frozenset()
    if is_int(value):
        value = [value]
    if isinstance(value, Tensor):
        value = value.reshape(-1).tolist() if not value.dtype.is_floating_point and value.dtype != torch.bool else [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(is_int(t) for t in value):
        raise TypeError(f"{name} must be an int token id or a list of int token ids, got {value!r}")
    if vocab_size is not None:
        outside = [t for t in value if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(f"{name} holds token id {outside[0]}, outside the vocabulary: allowed 0 <= id < {vocab_size}")
    return frozenset(value)


def _token_ids(prompt: Prompt, tokenizer, index: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError(f"prompt of request {index} is a string, which needs a tokenizer (or processor) given to the engine; pass token ids instead")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"prompt of request {index} must be a 1-D integer tensor of token ids, got {prompt.dtype} of shape {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, Sequence) and all(is_int(t) for t in prompt):
        return list(prompt)
    raise TypeError(f"prompt of request {index} must be a string, a list of int token ids or an integer tensor, got {type(prompt).__name__}")


def _check_token_ids(ids: list[int], vocab_size: int, refused: dict[int, str], image_token_id: int, index: int) -> None:
    """Every id must be embeddable; the image token is replaced by features, so it may lie outside the vocabulary."""
    if not ids:
        raise ValueError(f"prompt of request {index} is empty; every request needs at least one token")
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size and t != image_token_id:
            raise ValueError(f"prompt of request {index} holds token id {t} at index {j}, outside the vocabulary: allowed 0 <= id < {vocab_size}")
        if t in refused:
            raise ValueError(f"prompt of request {index} holds token id {t} at index {j}: {refused[t]}")


@dataclass
class _Parsed:
    ids: list[int]
    runs: list[tuple[int, int]]
    images: list[ImageInput]
    max_new_tokens: Optional[int]
    stop_token_ids: frozenset
    seed: Optional[int]


def _parse(req, index: int, adapter: VLMAdapter, tokenizer) -> _Parsed:
    """Checks one request (everything that needs no image processing)."""
    if not isinstance(req, Request):
        raise TypeError(f"requests[{index}] must be a Request, got {type(req).__name__}")
    images = req.attached_images(index)
    image_token = adapter.image_token_id
    ids = _token_ids(req.prompt, tokenizer, index)
    _check_token_ids(ids, adapter.vocab_size, adapter.unsupported_token_ids, image_token, index)
    runs = image_runs(ids, image_token)
    if images and not runs:
        raise ValueError(f"prompt of request {index} has no image token (id {image_token}) but the request carries {len(images)} image(s); put one placeholder where each image goes")
    if len(runs) != len(images):
        raise ValueError(
            f"prompt of request {index} has {len(runs)} separate image-token runs but the request carries {len(images)} "
            "image(s); give one placeholder (or expanded run) per image, images separated by other tokens"
        )
    if req.max_new_tokens is not None:
        check_max_new_tokens(f"max_new_tokens of request {index}", req.max_new_tokens, adapter.max_positions)
    if req.seed is not None and not is_int(req.seed):
        raise TypeError(f"seed of request {index} must be an int or None, got {req.seed!r}")
    return _Parsed(ids, runs, images, req.max_new_tokens, stop_set(f"stop_token_ids of request {index}", req.stop_token_ids, adapter.vocab_size),
                   req.seed)


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------
def prepare_batch(
    requests: Union[Request, Sequence[Request]],
    adapter: VLMAdapter,
    *,
    budget: Callable[[int], int],
    image_processor: Callable[[], Any],
    tokenizer=None,
    fingerprints: bool = True,
) -> PreparedBatch:
    """Validate and tokenise requests, process images, expand placeholders, compute positions.

    ``budget(N)`` gives an image's K; ``image_processor()`` the processor for Pillow images (called
    only when one is met). Every request is checked (types, token ids, placeholders against images,
    limits) before the first image is processed. ``fingerprints=False``: an image without an ``image_id``
    gets no key (hashing its pixels costs ~7 ms per megapixel on the host, and reads GPU pixels back).
    """
    if isinstance(requests, Request):
        requests = [requests]
    if isinstance(requests, (str, Tensor)) or not isinstance(requests, Sequence) or not requests:
        raise TypeError(f"requests must be a non-empty list of Request, got {type(requests).__name__}")
    parsed = [_parse(req, i, adapter, tokenizer) for i, req in enumerate(requests)]

    image_token = adapter.image_token_id
    text, lengths, full_positions, token_positions = [], [], [], []
    image_request, insert_at, pixels, sizes, layouts, keys, budgets = [], [], [], [], [], [], []
    for r, p in enumerate(parsed):
        own_sizes, own_layouts = [], []
        for (_, run), item in zip(p.runs, p.images):
            if item.image is not None:
                pv, size = adapter.process_image(item.image, image_processor())
            else:
                pv, size = adapter.check_pixel_values(item.pixel_values, item.image_size)
            layout = adapter.layout(size)
            if run not in (1, layout.num_slots):
                raise ValueError(
                    f"prompt of request {r} has a run of {run} image tokens; give one placeholder token or the "
                    f"expanded run of {layout.num_slots} tokens this image takes"
                )
            budgets.append(budget(layout.num_tokens))
            own_sizes.append(size)
            own_layouts.append(layout)
            image_request.append(r)
            pixels.append(pv)
            keys.append(item.image_id if item.image_id is not None or not fingerprints else image_fingerprint(pv, meta=size))
        own_text, own_insert = strip_runs(p.ids, p.runs)
        # The full (unpruned) sequence as the model sees it, and the positions it would give it.
        spans = [layout.num_slots for layout in own_layouts]
        full = adapter.sequence_positions(expand(own_text, own_insert, spans, image_token), own_sizes)
        full_positions.append(full)
        _, starts = text_columns(len(own_text), own_insert, spans)
        token_positions.extend(full[:, s + layout.token_slot] for s, layout in zip(starts, own_layouts))
        text.extend(own_text)
        lengths.append(len(own_text))
        insert_at.extend(own_insert)
        sizes.extend(own_sizes)
        layouts.extend(own_layouts)
    rows = adapter.position_rows
    visual_positions = torch.cat(token_positions, dim=1) if token_positions else torch.zeros(rows, 0, dtype=torch.int64)
    return PreparedBatch(
        text_ids=torch.tensor(text, dtype=torch.int64),
        text_cu_seqlens=cu_seqlens_from_lengths(lengths),
        image_request=torch.tensor(image_request, dtype=torch.int64),
        insert_at=torch.tensor(insert_at, dtype=torch.int64),
        pixel_values=pixels,
        image_sizes=sizes,
        layouts=layouts,
        image_keys=keys,
        budgets=budgets,
        token_positions=visual_positions[0] if rows == 1 else visual_positions,
        full_positions=full_positions,
        max_new_tokens=[p.max_new_tokens for p in parsed],
        stop_token_ids=[p.stop_token_ids for p in parsed],
        seeds=[p.seed for p in parsed],
    )
