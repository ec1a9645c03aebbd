"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): native resolution, one token per 2x2 merge group.

Facts this adapter relies on (DESIGN.md section 9, transformers 5.24 ``models/qwen2_5_vl/``):

* The image processor emits an image as ``(t·h·w, 3·temporal_patch·patch²)`` patches plus its grid
  ``(t, h, w)`` (``image_grid_thw``); every ``merge²`` consecutive patches form one spatial-merge group,
  groups in raster order over the ``(h/merge, w/merge)`` grid. One group is one LLM visual token: the
  prunable unit. N = t·h·w / merge² differs per image.
* The vision tower permutes groups into window order (``window_index``) before its blocks. The
  pre-merger features of group g in raster order are ``hidden.view(-1, merge², C)[argsort(window_index)][g]``;
  the Scorer reads them concatenated, d_v = merge² · C.
* The merger (RMSNorm per patch, ``view(-1, merge²·C)``, MLP) works per group, so only the kept groups
  are merged (:meth:`Qwen2_5_VLAdapter.project`). :meth:`Qwen2_5_VLAdapter.encode` runs the tower's
  own patch embedding, rotary embedding and blocks for all images of a batch in one pass and stops
  before the merger.
* Positions are M-RoPE ``(3, L)``: :meth:`Qwen2_5_VLAdapter.sequence_positions` is the model's own
  ``get_rope_index`` on the full (unpruned) sequence.

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

from typing import Any, Sequence

import torch
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_tensor
from .base import ImageLayout, TokenRegions, VLMAdapter


def _grid_tuple(image_size) -> tuple[int, int, int]:
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    if isinstance(image_size, (list, tuple)) and len(image_size) == 1:  # (1, 3), as the processor returns it
        image_size = image_size[0]
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size):
        raise ValueError(f"image_sizes of a Qwen2.5-VL image must be its image_grid_thw (t, h, w) as three positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1]), int(image_size[2])


class Qwen2_5_VLAdapter(VLMAdapter):
    position_rows = 3
    clips_keep_to_tokens = True

    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return (Qwen2_5_VLForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        try:  # the tower's own index helpers, used by pre_merger_states
            from transformers.vision_utils import get_vision_window_index  # noqa: F401
        except ImportError as exc:
            import transformers

            raise ImportError(
                f"Qwen2.5-VL support needs transformers.vision_utils (transformers 5.24, pinned in requirements.txt); "
                f"installed: transformers {transformers.__version__}"
            ) from exc
        vision = self.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.patch_size = int(vision.patch_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.vision_hidden = int(vision.hidden_size)
        self.patch_dim = int(vision.in_channels) * self.temporal_patch_size * self.patch_size**2
        self._layouts: dict[tuple[int, int, int], ImageLayout] = {}

    @property
    def tower(self):
        return self.inner.visual

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
        if grid not in self._layouts:
            self._layouts[grid] = ImageLayout.plain(grid[0] * grid[1] * grid[2] // self.merge**2)
        return self._layouts[grid]

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

        The tower's own submodules and transformers' own index helpers, in the tower's order; equal to
        the tower's ``last_hidden_state`` (tested), without merging every group.
        """
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

        tower = self.tower
        position_ids = get_vision_position_ids(grid_thw, tower.spatial_merge_size)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, tower.config)
        window_index, cu_window = get_vision_window_index(
            grid_thw, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size, patch_size=tower.patch_size
        )
        max_window = get_max_seqlen(cu_window, tower.config, kwarg_name="max_window_seqlen")
        hidden = tower.patch_embed(pixel_values)
        seq_len = hidden.shape[0]
        hidden = tower.permute_input_for_window_attn(hidden, window_index, seq_len=seq_len)
        rotary = tower.rotary_pos_emb(hidden, position_ids)
        rotary = tuple(tower.permute_input_for_window_attn(f, window_index, seq_len=seq_len) for f in rotary)
        for layer, block in enumerate(tower.blocks):
            full = layer in tower.fullatt_block_indexes
            hidden = block(
                hidden,
                cu_seqlens=cu_seqlens if full else cu_window,
                max_seqlen=max_seqlen if full else max_window,
                position_embeddings=rotary,
            )
        return hidden, window_index

    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> list[Tensor]:
        if not pixel_values:
            return []
        grids = [_grid_tuple(size) for size in image_sizes]
        device, dtype = self.device, self.tower.patch_embed.proj.weight.dtype
        grid_thw = torch.tensor(grids, dtype=torch.int64, device=device)
        hidden, window_index = self.pre_merger_states(torch.cat(list(pixel_values)).to(device=device, dtype=dtype), grid_thw)
        unit = self.merge**2
        raster = torch.argsort(window_index.to(device))  # window order -> raster order of the groups
        groups = hidden.view(-1, unit, hidden.shape[-1])[raster].reshape(-1, unit * hidden.shape[-1])
        return list(groups.split([t * h * w // unit for t, h, w in grids]))

    def project(self, features: Tensor) -> Tensor:
        """``(K, merge²·C)`` pre-merger groups -> ``(K, H)``: the model's merger on the kept groups only."""
        merger = self.tower.merger
        dtype = next(merger.parameters()).dtype
        return merger(features.to(dtype).reshape(-1, self.vision_hidden))

    # -- sequences ------------------------------------------------------------------------------
    def sequence_positions(self, input_ids: Tensor, image_sizes: Sequence[Any]) -> Tensor:
        """The model's own ``get_rope_index`` on the full sequence: ``(3, L)``."""
        input_ids = input_ids.view(-1).cpu()
        if not image_sizes:
            return torch.arange(input_ids.numel()).view(1, -1).expand(3, -1).clone()
        is_image = (input_ids == self.image_token_id).to(torch.int32)
        grid_thw = torch.tensor([_grid_tuple(size) for size in image_sizes], dtype=torch.int64)
        positions, _ = self.inner.get_rope_index(input_ids[None], mm_token_type_ids=is_image[None], image_grid_thw=grid_thw)
        return positions[:, 0].to(torch.int64)
