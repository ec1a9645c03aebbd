"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed-size image, N = (image_size / patch)² tokens.

The features are the vision tower's hidden states of ``config.vision_feature_layer`` (-2 by default;
a list of layers is concatenated on the feature axis, as the model does), with CLS dropped under the
``"default"`` select strategy. They are taken before ``multi_modal_projector``; the image's tokens
appear in the LLM sequence in encoder (row-major patch) order, with no extra tokens.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..validation import FLOAT_DTYPES, check_tensor
from .base import ImageLayout, TokenRegions, VLMAdapter


def size_field(size, key: str) -> Optional[int]:
    """``size[key]`` of an image processor's ``size`` / ``crop_size`` (a dict or transformers' ``SizeDict``)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def clip_geometry(image_size: tuple[int, int], image_processor) -> tuple[float, float, int, int]:
    """``(scale_y, scale_x, top, left)``: how a CLIP-style processor maps the original image to its input.

    Resize (shortest edge to ``size["shortest_edge"]`` keeping the aspect ratio, or to a fixed
    ``height`` x ``width``), then an optional centre crop to ``crop_size``: input pixel (y, x) shows
    original pixel ((y + top) / scale_y, (x + left) / scale_x). Exact to the processor's rounding (a pixel).
    """
    h, w = image_size
    size = image_processor.size
    rh, rw = h, w
    if getattr(image_processor, "do_resize", True):
        short = size_field(size, "shortest_edge")
        if short is not None:  # transformers' get_resize_output_image_size(default_to_square=False)
            if h <= w:
                rh, rw = short, int(short * w / h)
            else:
                rh, rw = int(short * h / w), short
        else:
            rh, rw = size_field(size, "height"), size_field(size, "width")
    top = left = 0
    if getattr(image_processor, "do_center_crop", False):
        ch, cw = size_field(image_processor.crop_size, "height"), size_field(image_processor.crop_size, "width")
        top, left = (rh - ch) // 2, (rw - cw) // 2
    return rh / h, rw / w, top, left


def clip_cls_attention(layer, hidden: Tensor) -> Tensor:
    """``(B, T)``: the attention token 0 ([CLS]) pays every token in ``layer`` (a CLIP encoder layer) given
    the layer's input ``hidden`` ``(B, T, C)``, summed over heads. The softmax runs over all T keys (the
    [CLS] column included), as the layer's own attention does; float32 at least (float64 stays float64)."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    b, t, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    dtype = torch.promote_types(x.dtype, torch.float32)
    q = attn.q_proj(x[:, :1]).view(b, 1, heads, head_dim).transpose(1, 2).to(dtype)
    k = attn.k_proj(x).view(b, t, heads, head_dim).transpose(1, 2).to(dtype)
    weights = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # (B, heads, 1, T)
    return weights[:, :, 0].sum(1)


class LlavaFamilyAdapter(VLMAdapter):
    """What LLaVA-1.5 and LLaVA-NeXT share: CLIP-style features of ``vision_feature_layer``, a per-token
    ``multi_modal_projector``, 1-D positions, ``keep > N`` is an error."""

    def __init__(self, model):
        super().__init__(model)
        if isinstance(self.config.vision_feature_layer, bool) or not isinstance(self.config.vision_feature_layer, (int, list, tuple)):
            raise ValueError(f"config.vision_feature_layer must be an int or a list of ints, got {self.config.vision_feature_layer!r}")
        if self.config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"config.vision_feature_select_strategy must be 'default' or 'full', got {self.config.vision_feature_select_strategy!r}")

    @property
    def feature_dim(self) -> int:
        layers = self.config.vision_feature_layer
        return self.config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.inner.vision_tower.parameters()).dtype

    def project(self, features: Tensor) -> Tensor:
        projector = self.inner.multi_modal_projector
        dtype = next(projector.parameters()).dtype
        return projector(features.to(dtype))

    # The vision stage in three steps, so that a runner can replay the middle one from a CUDA graph
    # (``autoselect_fast.engine.runner``): ``encode = image_features(tower_features(tower_input(pixels)))``.
    def tower_input(self, pixel_values: Sequence[Tensor]) -> Tensor:
        """The vision tower's batch ``(tiles, 3, s, s)`` of a list of images (host or device, any float dtype)."""
        raise NotImplementedError

    def image_features(self, features: Tensor, image_sizes: Sequence[Any]) -> list[Tensor]:
        """Per image ``(N_i, d_v)`` tokens in sequence order, from :meth:`tower_features` of its batch."""
        raise NotImplementedError

    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> list[Tensor]:
        return self.image_features(self.tower_features(self.tower_input(pixel_values)), image_sizes)

    def encode_with_cls_attention(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`encode` and, per image, the ``(N_i,)`` [CLS] attention of its tokens (``visionzip``), one vision call."""
        features, attention = self.tower_features(self.tower_input(pixel_values), cls_attention=True)
        return self.image_features(features, image_sizes), [a[:, 0] for a in self.image_features(attention[..., None], image_sizes)]

    def tower_features(self, pixel_values: Tensor, *, cls_attention: bool = False):
        """``(tiles, P, d_v)`` features of ``config.vision_feature_layer`` as the model selects them; with
        ``cls_attention`` also ``(tiles, P)``, the [CLS] attention of each feature token (see
        :meth:`feature_attention_layer`), from the same vision call.

        Every tile is computed on its own (CLIP attends within a tile), so extra tiles in the batch
        do not change the features of the others."""
        tower = self.inner.vision_tower
        out = tower(pixel_values.to(device=self.device, dtype=self.vision_dtype), output_hidden_states=True, return_dict=True)
        layers = self.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        states = [out.hidden_states[layer] for layer in layers]
        drop_cls = self.config.vision_feature_select_strategy == "default"
        if drop_cls:
            states = [s[:, 1:] for s in states]
        features = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        if not cls_attention:
            return features
        index = self.feature_attention_layer(len(out.hidden_states) - 1)
        attention = clip_cls_attention(self._clip_body().encoder.layers[index], out.hidden_states[index])
        return features, attention[:, 1:] if drop_cls else attention

    def cls_attention_unavailable(self) -> Optional[str]:
        layers = self.config.vision_feature_layer
        if not isinstance(layers, int):
            return f"vision_feature_layer is a list of layers ({layers}), so the features come from no single attention layer"
        if getattr(getattr(self._clip_body(), "embeddings", None), "class_embedding", None) is None:
            return f"its vision tower ({type(self.inner.vision_tower).__name__}) has no [CLS] token"
        return None

    def _clip_body(self):
        """The CLIP vision transformer (embeddings, encoder): the tower itself in transformers >= 5.2x, its
        ``vision_model`` before."""
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower)

    def feature_attention_layer(self, num_layers: int) -> int:
        """The encoder layer whose [CLS] attention scores the features (``visionzip``).

        VisionZip pairs the feature layer's hidden states with the attention of the layer that computed
        them (``attentions[-2]`` with ``hidden_states[-2]``): layer ``f - 1`` for features ``hidden_states[f]``.
        Features taken from the embeddings (``f = 0``, e.g. a one-layer tower read at layer -2) were
        computed by no attention layer; they get the first layer's, the attention over those very
        tokens (a documented substitute).
        """
        f = self.config.vision_feature_layer % (num_layers + 1)
        return max(f - 1, 0)


class LlavaAdapter(LlavaFamilyAdapter):
    @classmethod
    def model_classes(cls) -> tuple[type, ...]:
        from transformers import LlavaForConditionalGeneration

        return (LlavaForConditionalGeneration,)

    def __init__(self, model):
        super().__init__(model)
        vision = self.config.vision_config
        self.image_size = int(vision.image_size)
        side = self.image_size // int(vision.patch_size)
        cls_token = 1 if self.config.vision_feature_select_strategy == "full" else 0
        self._layout = ImageLayout.plain(side * side + cls_token)

    def default_image_processor(self):
        from transformers import CLIPImageProcessor

        s = self.image_size
        return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

    def process_image(self, image, image_processor) -> tuple[Tensor, Optional[tuple[int, int]]]:
        pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
        return self.check_pixel_values(pixel_values, None)

    def check_pixel_values(self, pixel_values: Tensor, image_size) -> tuple[Tensor, Optional[tuple[int, int]]]:
        check_tensor("pixel_values", pixel_values, ndim=(3, 4), dtypes=FLOAT_DTYPES)
        if pixel_values.dim() == 4:
            if pixel_values.shape[0] != 1:
                raise ValueError(f"pixel_values of one request must hold one image, (3, H, W) or (1, 3, H, W), got shape {tuple(pixel_values.shape)}")
            pixel_values = pixel_values[0]
        s = self.image_size
        if tuple(pixel_values.shape) != (3, s, s):
            raise ValueError(f"pixel_values must have shape (3, {s}, {s}) for this model (vision_config.image_size = {s}), got {tuple(pixel_values.shape)}")
        return pixel_values, None

    @property
    def fixed_num_tokens(self) -> int:
        return self._layout.num_tokens

    def layout(self, image_size: Optional[tuple[int, int]] = None) -> ImageLayout:
        return self._layout

    def image_size_of(self, height: int, width: int, image_processor) -> None:
        return None  # every image is resized to one square: N does not depend on the size

    def tower_input(self, pixel_values: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(pixel_values))

    def image_features(self, features: Tensor, image_sizes: Sequence[Optional[tuple[int, int]]]) -> list[Tensor]:
        self._check_token_count(features)
        return list(features.unbind(0))

    def _check_token_count(self, features: Tensor) -> None:
        if features.shape[1] != self._layout.num_tokens:
            raise ValueError(f"the vision tower returned {features.shape[1]} tokens per image, expected {self._layout.num_tokens}")

    def token_regions(self, image_size: tuple[int, int], image_processor) -> TokenRegions:
        """Patch (r, c) of the processed image, mapped back through the processor's resize and crop."""
        h, w = image_size
        scale_y, scale_x, top, left = clip_geometry(image_size, image_processor)
        patch = int(self.config.vision_config.patch_size)
        side = self.image_size // patch
        r, c = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
        boxes = torch.stack([
            ((c * patch + left) / scale_x).clamp(0, w), ((r * patch + top) / scale_y).clamp(0, h),
            (((c + 1) * patch + left) / scale_x).clamp(0, w), (((r + 1) * patch + top) / scale_y).clamp(0, h),
        ], dim=1).float()
        view = torch.zeros(side * side, dtype=torch.int64)
        if self._layout.num_tokens == side * side + 1:  # "full" strategy: the CLS token comes first, no region
            boxes = torch.cat([torch.full((1, 4), float("nan")), boxes])
            view = torch.cat([torch.tensor([-1]), view])
        return TokenRegions(boxes, view, ("image",))
