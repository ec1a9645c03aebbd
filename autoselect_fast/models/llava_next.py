"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiles, one budget per image.

An image is processed as a base tile (the whole image resized) plus a grid of crops. The model lays
its tokens out as: the base tile's P tokens, then the crop grid stitched into one feature map,
unpadded to the image's aspect ratio (``unpad_image``), row by row with an ``image_newline`` token
after each row (``LlavaNextModel.pack_image_features``).

The arrangement is not re-derived here: :meth:`LlavaNextAdapter.layout` runs the model's own
``pack_image_features`` on a tensor of token *indices* (one channel, newline = -1), which yields the
exact order and the newline slots for any image size. Pruning works in the d_v space before the
projector on the N = P + rows·cols tokens of that arrangement (padding tokens removed by unpadding
are never scored); the newline tokens are not scored and not counted in K. Newline rule (see
``ImageLayout.kept_slots``): a row's newline is kept, at its original slot, iff the row keeps at
least one token. Kept tokens are projected afterwards (the projector is per-token).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..caching import SharedLRUCache
from ..validation import FLOAT_DTYPES, check_tensor
from .base import LAYOUT_CACHE_SIZE, ImageLayout, TokenRegions
from .llava import LlavaFamilyAdapter


def _image_size_tuple(image_size) -> tuple[int, int]:
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    if isinstance(image_size, (list, tuple)) and len(image_size) == 1:  # (1, 2), as the processor returns it
        image_size = image_size[0]
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 2 or not all(isinstance(v, int) and v > 0 for v in image_size):
        raise ValueError(f"image_sizes must give (height, width) of the original image as two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


class LlavaNextAdapter(LlavaFamilyAdapter):
    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from transformers import LlavaNextForConditionalGeneration

        return (LlavaNextForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                "LLaVA-NeXT supports vision_feature_select_strategy='default' only (its tile grid has no room "
                f"for a CLS token), got {self.config.vision_feature_select_strategy!r}"
            )
        vision = self.config.vision_config
        self.tile_size = int(vision.image_size)
        side = self.tile_size // int(vision.patch_size)
        self.tokens_per_tile = side * side
        # Keyed by the original (height, width): a server meets new sizes without end, hence bounded.
        self._layouts: SharedLRUCache[ImageLayout] = SharedLRUCache(LAYOUT_CACHE_SIZE)

    def newline_embedding(self) -> Tensor:
        return self.inner.image_newline

    def default_image_processor(self):
        from transformers import LlavaNextImageProcessor

        s = self.tile_size
        return LlavaNextImageProcessor(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_grid_pinpoints=self.config.image_grid_pinpoints
        )

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return int(image_size_to_num_patches(list(image_size), self.config.image_grid_pinpoints, self.tile_size))

    def process_image(self, image, image_processor) -> tuple[Tensor, Optional[tuple[int, int]]]:
        out = image_processor(images=image, return_tensors="pt")
        return self.check_pixel_values(out["pixel_values"], out["image_sizes"][0])

    def check_pixel_values(self, pixel_values: Tensor, image_size) -> tuple[Tensor, Optional[tuple[int, int]]]:
        if image_size is None:
            raise ValueError("LLaVA-NeXT pixel_values need image_sizes: the original (height, width) of the image, as the image processor returns it")
        image_size = _image_size_tuple(image_size)
        check_tensor("pixel_values", pixel_values, ndim=(4, 5), dtypes=FLOAT_DTYPES)
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != 1:
                raise ValueError(f"pixel_values of one request must hold one image, (tiles, 3, h, w) or (1, tiles, 3, h, w), got shape {tuple(pixel_values.shape)}")
            pixel_values = pixel_values[0]
        tiles, s = self.num_tiles(image_size), self.tile_size
        if pixel_values.shape[0] < tiles or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(
                f"pixel_values of an image of size {image_size} must have shape (>= {tiles}, 3, {s}, {s}) "
                f"(base tile + crops for image_grid_pinpoints), got {tuple(pixel_values.shape)}"
            )
        return pixel_values[:tiles], image_size  # the processor pads a batch to its largest tile count

    def layout(self, image_size) -> ImageLayout:
        image_size = _image_size_tuple(image_size)
        return self._layouts.get_or_build(image_size, lambda: self._build_layout(image_size))

    def image_size_of(self, height: int, width: int, image_processor) -> tuple[int, int]:
        return _image_size_tuple((height, width))  # the layout follows the original size

    def _build_layout(self, image_size: tuple[int, int]) -> ImageLayout:
        tiles, p = self.num_tiles(image_size), self.tokens_per_tile
        # The model's own arrangement applied to token indices (float64 is exact far beyond any N).
        index = torch.arange(tiles * p, dtype=torch.float64).view(tiles, p, 1)
        arranged, _ = self.inner.pack_image_features(
            [index], torch.tensor([image_size]), self.config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        arranged = arranged[0][:, 0]
        is_token = arranged >= 0
        token_slot = torch.nonzero(is_token)[:, 0]
        newline_slot = torch.nonzero(~is_token)[:, 0]
        token_row = torch.searchsorted(newline_slot, token_slot)  # row = newlines before the token
        if tiles > 1:  # the base tile's tokens come first and have no newline
            token_row[:p] = -1
        return ImageLayout(arranged[is_token].long(), token_slot, token_row, newline_slot)

    def tower_input(self, pixel_values: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(pixel_values))

    def image_features(self, features: Tensor, image_sizes: Sequence[Optional[tuple[int, int]]]) -> list[Tensor]:
        tiles = [self.num_tiles(_image_size_tuple(size)) for size in image_sizes]
        if sum(tiles) != features.shape[0]:
            raise ValueError(f"the vision tower returned features of {features.shape[0]} tiles, the image sizes call for {sum(tiles)}")
        return self._arranged(features, tiles, image_sizes)

    def _arranged(self, per_tile: Tensor, tiles: list[int], image_sizes) -> list[Tensor]:
        """``(Σtiles, P, C)`` per-tile rows -> per image ``(N_i, C)`` in the model's sequence order."""
        out = []
        for per_image, size in zip(per_tile.split(tiles), image_sizes):
            layout = self.layout(size)
            out.append(per_image.reshape(-1, per_image.shape[-1])[layout.source_index.to(per_image.device)])
        return out

    def token_regions(self, image_size, image_processor) -> TokenRegions:
        """Base-tile tokens map to the whole image squashed to one tile; crop-grid tokens to their place on
        the best-fit canvas (image resized keeping its aspect ratio, centred with padding, as
        ``LlavaNextImageProcessor`` does), mapped back to the original pixels."""
        from transformers.image_processing_utils import select_best_resolution

        h, w = _image_size_tuple(image_size)
        layout, p = self.layout((h, w)), self.tokens_per_tile
        patch = int(self.config.vision_config.patch_size)
        side, tile = self.tile_size // patch, self.tile_size
        best_h, best_w = select_best_resolution((h, w), image_processor.image_grid_pinpoints)
        # transformers' get_patch_output_size: fit inside the canvas, then centre it
        if best_w / w < best_h / h:
            new_w, new_h = best_w, min(math.ceil(h * best_w / w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(w * best_h / h), best_w)
        pad_top, pad_left = (best_h - new_h) // 2, (best_w - new_w) // 2
        tiles_per_row = best_w // tile

        src = layout.source_index
        tile_of, within = src // p, src % p
        pr, pc = within // side, within % side
        base = tile_of == 0
        grid_row, grid_col = (tile_of - 1).clamp(min=0) // tiles_per_row, (tile_of - 1).clamp(min=0) % tiles_per_row
        # base tile: the whole image squashed to tile x tile pixels
        bx0, by0 = pc * patch * w / tile, pr * patch * h / tile
        bx1, by1 = (pc + 1) * patch * w / tile, (pr + 1) * patch * h / tile
        # crop grid: canvas pixels -> original pixels
        cy, cx = grid_row * tile + pr * patch, grid_col * tile + pc * patch
        gx0, gy0 = (cx - pad_left) * w / new_w, (cy - pad_top) * h / new_h
        gx1, gy1 = (cx + patch - pad_left) * w / new_w, (cy + patch - pad_top) * h / new_h
        boxes = torch.stack([
            torch.where(base, bx0, gx0).clamp(0, w), torch.where(base, by0, gy0).clamp(0, h),
            torch.where(base, bx1, gx1).clamp(0, w), torch.where(base, by1, gy1).clamp(0, h),
        ], dim=1).float()
        return TokenRegions(boxes, (~base).long(), ("base tile", "crop grid"))
