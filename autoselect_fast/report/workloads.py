"""The report's requests: synthetic images and prompts for the ``single``, ``mixed`` and ``serving``
scenarios, and the per-request token counts the tables show.

Every prompt comes from :func:`synthetic_prompt` (BOS, random words, the image placeholder after
``text_before`` tokens); every image from :func:`synthetic_image`, processed by the model's real
image processor. The serving scenario's images have different sizes, chosen so that each one gets its
own token count N_i through the processor's ``min_pixels`` / ``max_pixels`` bounds.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..engine import AutoSelectEngine, Request
from ..presets import Preset

# Keep ratios of the serving scenario: 66.7, 77.8 and 88.9 % pruning (AutoSelect's Table 3 rates).
SERVING_RATIOS = (1 / 3, 2 / 9, 1 / 9)
# Prompt text tokens of the serving scenario's requests, from LOW to HIGH.
SERVING_TEXT = (10, 120)
# Aspect ratios (width / height) the serving scenario's images cycle through.
SERVING_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 1 / 2)


def synthetic_image(height: int, width: int, seed: int):
    """A deterministic picture made in code: colour gradients with a few shapes, as a Pillow image."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, height, width, generator=gen) * 55
    image = Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x0, y0 = int(width * (0.1 + 0.2 * i)), int(height * (0.15 + 0.15 * i))
        draw.ellipse((x0, y0, x0 + width // 6, y0 + height // 6), fill=(255 - 50 * i, 40 * i, 120))
    return image


def synthetic_prompt(engine: AutoSelectEngine, text_tokens: int, text_before: int, seed: int) -> list[int]:
    """A prompt of ``text_tokens`` text tokens: BOS, ``text_before - 1`` random words, the image
    placeholder, the remaining words (at least one token before the placeholder, the BOS)."""
    adapter = engine.adapter
    vocab, image_token = adapter.language_model.config.vocab_size, adapter.image_token_id
    gen = torch.Generator().manual_seed(seed)
    before = max(1, min(text_before, text_tokens - 1))
    words = torch.randint(3, min(vocab, image_token) - 1, (text_tokens - 1,), generator=gen).tolist()
    return [1] + words[: before - 1] + [image_token] + words[before - 1 :]


def synthetic_requests(engine: AutoSelectEngine, preset: Preset, batch: int, text_lengths: Optional[Sequence[int]] = None) -> list[Request]:
    """``batch`` requests with the preset's image, processed by the model's real image processor;
    ``text_lengths`` gives each prompt's text tokens (default: the preset's ``text_before + text_after``)."""
    processor = engine.adapter.default_image_processor()
    if text_lengths is None:
        text_lengths = [preset.text_before + preset.text_after] * batch
    requests = []
    for i, length in enumerate(text_lengths):
        prompt = synthetic_prompt(engine, length, preset.text_before, seed=1000 + i)
        pixel_values, size = engine.adapter.process_image(synthetic_image(*preset.image_size, seed=i), processor)
        requests.append(Request(prompt, pixel_values=pixel_values, image_sizes=size))
    return requests


def mixed_text_lengths(batch: int, low: int, high: int) -> list[int]:
    """``batch`` prompt lengths evenly spread over ``[low, high]`` text tokens, shortest first."""
    if batch == 1:
        return [low]
    return [round(low + (high - low) * i / (batch - 1)) for i in range(batch)]


def supports_serving(preset: Preset) -> bool:
    """Whether the preset's model gives each image its own token count (a spatial-merge vision config)."""
    return hasattr(preset.build_config().vision_config, "spatial_merge_size")


def serving_image_processor(adapter, preset: Preset):
    """The model's image processor with the preset's ``(min_pixels, max_pixels)`` bounds."""
    default = adapter.default_image_processor()
    if not hasattr(default, "merge_size"):
        raise ValueError(f"the serving scenario needs a native-resolution model (Qwen2.5-VL); {type(adapter).__name__} has fixed-size images")
    low, high = preset.serving_pixels
    return type(default)(patch_size=default.patch_size, temporal_patch_size=default.temporal_patch_size,
                         merge_size=default.merge_size, min_pixels=low, max_pixels=high)


def _image_tokens(adapter, processor, height: int, width: int) -> int:
    image = synthetic_image(height, width, seed=0)
    return adapter.layout(adapter.process_image(image, processor)[1]).num_tokens


def serving_image_sizes(adapter, preset: Preset, batch: int) -> list[tuple[int, int]]:
    """``batch`` raw image sizes ``(height, width)`` whose token counts N_i all differ.

    Areas spread geometrically over the preset's ``serving_pixels`` bounds (a little beyond, so the
    processor's rounding and clamping both act), aspect ratios cycling through :data:`SERVING_ASPECTS`;
    an image whose N the processor maps onto an earlier one's grows by 5 % per side until it differs.
    """
    low, high = preset.serving_pixels
    processor = serving_image_processor(adapter, preset)
    sizes, seen = [], set()
    for i in range(batch):
        area = low * (high / low) ** (i / max(1, batch - 1)) * 1.07
        aspect = SERVING_ASPECTS[i % len(SERVING_ASPECTS)]
        height = max(16, round((area / aspect) ** 0.5))
        for _ in range(100):
            width = max(16, round(height * aspect))
            n = _image_tokens(adapter, processor, height, width)
            if n not in seen:
                break
            height = round(height * 1.05) + 1
        else:
            raise ValueError(f"preset {preset.name!r}: serving_pixels {preset.serving_pixels} leave no room for {batch} distinct token counts")
        seen.add(n)
        sizes.append((height, width))
    return sizes


def serving_visual_tokens(adapter, preset: Preset, batch: int) -> list[int]:
    """N_i of the serving scenario's images (host-side processing only; ``adapter`` may be a meta skeleton)."""
    processor = serving_image_processor(adapter, preset)
    return [_image_tokens(adapter, processor, h, w) for h, w in serving_image_sizes(adapter, preset, batch)]


def serving_requests(engine: AutoSelectEngine, preset: Preset, batch: int, text: tuple[int, int] = SERVING_TEXT) -> list[Request]:
    """The serving scenario's ``batch`` requests: image i of size ``serving_image_sizes(...)[i]`` through
    :func:`serving_image_processor`, prompt lengths from ``text`` spread over the batch in an order that
    does not follow the image sizes (a long prompt may come with a small image and vice versa)."""
    adapter = engine.adapter
    processor = serving_image_processor(adapter, preset)
    lengths = mixed_text_lengths(batch, *text)
    stride = next(s for s in (7, 5, 3, 1) if batch % s or s == 1)  # coprime with batch: a permutation
    lengths = [lengths[(i * stride) % batch] for i in range(batch)]
    requests = []
    for i, ((height, width), length) in enumerate(zip(serving_image_sizes(adapter, preset, batch), lengths)):
        prompt = synthetic_prompt(engine, length, preset.text_before, seed=2000 + i)
        pixel_values, size = adapter.process_image(synthetic_image(height, width, seed=100 + i), processor)
        requests.append(Request(prompt, pixel_values=pixel_values, image_sizes=size))
    return requests


def request_text_tokens(engine: AutoSelectEngine, request: Request) -> int:
    """Text tokens of a request's prompt (image placeholders not counted)."""
    return sum(1 for t in request.prompt if t != engine.adapter.image_token_id)


def request_visual_tokens(engine: AutoSelectEngine, requests: Sequence[Request]) -> list[int]:
    """N per request: visual tokens of its image(s) before pruning."""
    batch = engine.prepare(list(requests))
    out = [0] * len(requests)
    for r, layout in zip(batch.image_request.tolist(), batch.layouts):
        out[r] += layout.num_tokens
    return out
