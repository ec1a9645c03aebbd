"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native resolution, one token per 2x2 merge group.

Facts this adapter relies on (docs/design.md, "Model rules"; transformers 5.24 ``models/qwen2_5_vl/``):

* The image processor emits an image as ``(t·h·w, 3·temporal_patch·patch²)`` patches plus its grid
  ``(t, h, w)`` (``image_grid_thw``); every ``merge²`` consecutive patches form one spatial-merge group,
  groups in raster order over the ``(h/merge, w/merge)`` grid. One group is one LLM visual token: the
  prunable unit. N = t·h·w / merge² differs per image.
* The vision tower permutes groups into window order (``window_index``) before its blocks. The
  pre-merger features of group g in raster order are ``hidden.view(-1, merge², C)[argsort(window_index)][g]``;
  the Scorer reads them concatenated, d_v = merge² · C.
* The merger (RMSNorm per patch, ``view(-1, merge²·C)``, MLP) works per group, so only the kept groups
  are merged (:meth:`Qwen2_5_VLAdapter.project`). :meth:`Qwen2_5_VLAdapter.encode` runs the tower's
  own patch embedding and blocks for all images of a batch in one pass and stops before the merger,
  through :class:`~autoselect_fast.models.qwen2_5_vl_vision.QwenVisionTower` (one varlen attention call
  per block instead of transformers' per-window loop; window index, rotary tables and ``cu_seqlens``
  cached per grid).
* Positions are M-RoPE ``(3, L)``: :meth:`Qwen2_5_VLAdapter.sequence_positions` applies the rule of the
  model's ``get_rope_index`` piece by piece, with a cached table per grid (equal to it, tested): text tokens
  ``arange + offset`` on all three rows, an image's tokens ``(t, row, col) + offset`` over its merged
  grid, and after an image the offset advances by ``max(h, w) / merge``.

* For ``autoselect-fast show`` and training data: the processor resizes an image with ``smart_resize``
  (sides multiples of ``patch·merge`` = 28 px, pixel count within its limits), so
  :meth:`Qwen2_5_VLAdapter.image_size_of` knows the grid, hence N, from the image header, and
  :meth:`Qwen2_5_VLAdapter.token_regions` maps group (row, col) to its 28x28 square scaled back.
  Training needs nothing beyond the base class: ``training_sequence`` builds on ``embed_full_sequence``
  and :meth:`Qwen2_5_VLAdapter.sequence_positions`.

Budgets: a fixed ``keep`` larger than an image's N is clipped to N (``clips_keep_to_tokens``), since N
follows each image's resolution. Videos are not supported yet (their placeholder token is refused).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
from torch import Tensor

from ..caching import SharedLRUCache
from ..validation import FLOAT_DTYPES, check_tensor, is_int
from .base import LAYOUT_CACHE_SIZE, ImageLayout, TokenRegions, VLMAdapter
from .qwen2_5_vl_vision import QwenVisionTower


def _grid_tuple(image_size) -> tuple[int, int, int]:
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    if isinstance(image_size, (list, tuple)) and len(image_size) == 1:  # (1, 3), as the processor returns it
        image_size = image_size[0]
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 3 or not all(is_int(v) and v > 0 for v in image_size):
        raise ValueError(f"image_sizes of a Qwen2.5-VL image must be its image_grid_thw (t, h, w) as three positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1]), int(image_size[2])


class Qwen2_5_VLAdapter(VLMAdapter):
    position_rows = 3
    clips_keep_to_tokens = True

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    #: Vision attention backend (``autoselect_fast.attention.ATTENTION_BACKENDS``); "auto" picks by device and dtype.
    vision_attention_backend = "auto"

    def __init__(self, model):
        super().__init__(model)
        vision = self.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.patch_size = int(vision.patch_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.vision_hidden = int(vision.hidden_size)
        self.patch_dim = int(vision.in_channels) * self.temporal_patch_size * self.patch_size**2
        self._layouts: SharedLRUCache[ImageLayout] = SharedLRUCache(LAYOUT_CACHE_SIZE)  # by grid; bounded, locked
        self._rope_tables = SharedLRUCache(512)  # grid -> ((3, N) M-RoPE offsets of its tokens, advance after it)
        self._vision: QwenVisionTower | None = None  # built on first use: the tower may still be on the meta device here

    @property
    def tower(self):
        return self.inner.visual

    @property
    def vision_dtype(self) -> torch.dtype:
        """The dtype the vision tower takes its pixel values in."""
        return self.tower.patch_embed.proj.weight.dtype

    @property
    def vision(self) -> QwenVisionTower:
        """The tower run with one varlen attention call per block (its caches live as long as the adapter)."""
        if self._vision is None or self._vision.tower is not self.tower or self._vision.backend != self.vision_attention_backend:
            self._vision = QwenVisionTower(self.tower, backend=self.vision_attention_backend)
        return self._vision

    @property
    def feature_dim(self) -> int:
        return self.merge**2 * self.vision_hidden

    @property
    def unsupported_token_ids(self) -> dict[int, str]:
        video = getattr(self.config, "video_token_id", None)
        return {} if video is None else {int(video): "video input is not supported yet (video placeholder token)"}

    # -- images (host) --------------------------------------------------------------------------
    def default_image_processor(self):
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge)

    def process_image(self, image, image_processor) -> tuple[Tensor, tuple[int, int, int]]:
        out = image_processor(images=[image], return_tensors="pt")
        return self.check_pixel_values(out["pixel_values"], out["image_grid_thw"][0])

    def check_pixel_values(self, pixel_values: Tensor, image_size) -> tuple[Tensor, tuple[int, int, int]]:
        if image_size is None:
            raise ValueError("Qwen2.5-VL pixel_values need image_sizes: the image's image_grid_thw (t, h, w), as the image processor returns it")
        t, h, w = _grid_tuple(image_size)
        if t != 1:
            raise ValueError(f"image_grid_thw {(t, h, w)} has t={t} temporal patches: video input is not supported yet, give still images (t=1)")
        if h % self.merge or w % self.merge:
            raise ValueError(f"image_grid_thw {(t, h, w)}: h and w must be multiples of spatial_merge_size={self.merge}")
        check_tensor("pixel_values", pixel_values, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        if pixel_values.dim() == 3:
            if pixel_values.shape[0] != 1:
                raise ValueError(f"pixel_values of one Qwen2.5-VL image must be (patches, {self.patch_dim}) or (1, patches, {self.patch_dim}), got {tuple(pixel_values.shape)}")
            pixel_values = pixel_values[0]
        if tuple(pixel_values.shape) != (t * h * w, self.patch_dim):
            raise ValueError(f"pixel_values of an image with image_grid_thw {(t, h, w)} must have shape ({t * h * w}, {self.patch_dim}), got {tuple(pixel_values.shape)}")
        return pixel_values, (t, h, w)

    def layout(self, image_size) -> ImageLayout:
        grid = _grid_tuple(image_size)
        return self._layouts.get_or_build(grid, lambda: ImageLayout.plain(grid[0] * grid[1] * grid[2] // self.merge**2))

    def resized_size(self, height: int, width: int, image_processor) -> tuple[int, int]:
        """``(height, width)`` in pixels of the image the processor patchifies (its ``smart_resize``)."""
        # the Pillow backend's copy of smart_resize: the torchvision backend's module needs torchvision to import
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if not getattr(image_processor, "do_resize", True):
            return int(height), int(width)
        size = image_processor.size
        field = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        patch = int(getattr(image_processor, "patch_size", self.patch_size))
        merge = int(getattr(image_processor, "merge_size", self.merge))
        return smart_resize(int(height), int(width), factor=patch * merge,
                            min_pixels=field("shortest_edge"), max_pixels=field("longest_edge"))

    def image_size_of(self, height: int, width: int, image_processor) -> tuple[int, int, int]:
        rh, rw = self.resized_size(height, width, image_processor)
        return 1, rh // self.patch_size, rw // self.patch_size

    def image_prompt_text(self, tokenizer) -> str:
        """``<|vision_start|><|image_pad|><|vision_end|>``, as Qwen's chat template renders an image."""
        ids = [self.config.vision_start_token_id, self.image_token_id, self.config.vision_end_token_id]
        return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    def token_regions(self, image_size: tuple[int, int], image_processor) -> TokenRegions:
        """LLM visual token g = merge group (row, col) in raster order = a ``merge·patch``-pixel square
        (28x28) of the resized image, mapped back to the original ``(height, width)``."""
        h, w = int(image_size[0]), int(image_size[1])
        rh, rw = self.resized_size(h, w, image_processor)
        cell = self.merge * self.patch_size
        rows, cols = rh // cell, rw // cell
        r, c = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
        sx, sy = w / rw, h / rh
        boxes = torch.stack([c * cell * sx, r * cell * sy, (c + 1) * cell * sx, (r + 1) * cell * sy], dim=1).float()
        boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))
        return TokenRegions(boxes, torch.zeros(rows * cols, dtype=torch.int64), ("image",))

    # -- images (device) ------------------------------------------------------------------------
    def pre_merger_states(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, Tensor]:
        """The vision tower up to (not including) the merger: ``(hidden (ΣP, C) in window order, window_index)``.

        ``pixel_values`` ``(ΣP, patch_dim)`` of the images in ``grid_thw`` order; equal to the tower's
        ``last_hidden_state`` (tested), without merging every group.
        """
        grids = [_grid_tuple(g) for g in grid_thw.tolist()]
        vision = self.vision
        plan = vision.plan(grids)
        return vision.forward(vision.pack([pixel_values], plan), plan), plan.window_index

    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> list[Tensor]:
        if not pixel_values:
            return []
        return self.vision.encode(list(pixel_values), [_grid_tuple(size) for size in image_sizes])

    def project(self, features: Tensor) -> Tensor:
        """``(K, merge²·C)`` pre-merger groups -> ``(K, H)``: the model's merger on the kept groups only."""
        merger = self.tower.merger
        dtype = next(merger.parameters()).dtype
        return merger(features.to(dtype).reshape(-1, self.vision_hidden))

    # -- sequences ------------------------------------------------------------------------------
    def _rope_table(self, grid: tuple[int, int, int]) -> tuple[Tensor, int]:
        """``((3, N) positions of an image's tokens relative to the offset, advance of the offset after it)``."""
        def build():
            t, h, w = grid
            axes = torch.meshgrid(torch.arange(t), torch.arange(h // self.merge), torch.arange(w // self.merge), indexing="ij")
            return torch.stack(axes).reshape(3, -1), max(h, w) // self.merge

        return self._rope_tables.get_or_build(grid, build)

    def sequence_positions(self, input_ids: Tensor, image_sizes: Sequence[Any]) -> Tensor:
        """M-RoPE positions ``(3, L)`` of the full sequence: the rule of the model's ``get_rope_index``,
        built from whole pieces (equal to it, tested).

        Image i takes the next N_i image tokens, as one run; its tokens are its cached table plus the
        offset at its first token; each text piece is ``arange`` from the offset on all three rows.
        """
        input_ids = input_ids.view(-1).cpu()
        length = input_ids.numel()
        if not image_sizes:
            return torch.arange(length).view(1, -1).expand(3, -1).clone()
        tables = [self._rope_table(_grid_tuple(size)) for size in image_sizes]
        counts = [table.shape[1] for table, _ in tables]
        image_columns = torch.nonzero(input_ids == self.image_token_id)[:, 0]
        if image_columns.numel() != sum(counts):
            raise ValueError(f"input_ids hold {image_columns.numel()} image tokens but the images' grids take {sum(counts)}")
        ends = list(itertools.accumulate(counts))
        firsts = image_columns[[e - n for e, n in zip(ends, counts)]].tolist()  # a host tensor: no device read
        lasts = image_columns[[e - 1 for e in ends]].tolist()
        if any(last - first != n - 1 for first, last, n in zip(firsts, lasts, counts)):
            raise ValueError("input_ids must hold each image's tokens as one run (images in order, N_i tokens each)")
        pieces, offset, column = [], 0, 0
        for (table, advance), first, n in zip(tables, firsts, counts):
            if first > column:  # text before the image
                pieces.append(torch.arange(offset, offset + first - column).expand(3, -1))
                offset += first - column
            pieces.append(table + offset)
            offset += advance
            column = first + n
        if column < length:
            pieces.append(torch.arange(offset, offset + length - column).expand(3, -1))
        return torch.cat(pieces, dim=1)
