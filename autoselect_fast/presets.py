"""Model presets for the benchmark report: real transformers classes with random weights.

Timing needs no trained weights, so each preset builds the architecture from a config and initialises
it randomly. ``default`` is a LLaVA-1.5-shaped model scaled down to run in about a minute on a 2-core
CPU while keeping the published model's proportions (N = 576 visual tokens; vision tower, Scorer and
LLM scaled by the same factor in per-token FLOPs); ``llava-next-cpu`` is its LLaVA-NeXT counterpart
(N = 2,880); ``qwen2.5-vl-cpu`` is a Qwen2.5-VL-shaped model for the serving scenario (16 requests,
each image at its own resolution); ``tiny`` and ``qwen-tiny`` are smoke tests; the others are the
full-size architectures, meant for a GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from .modules import ScorerConfig


@dataclass
class Preset:
    name: str
    description: str
    build_config: Callable[[], object]  # -> transformers config of the VLM
    scorer: Callable[[int], ScorerConfig]  # vision width -> Scorer config
    image_size: tuple[int, int]  # (height, width) of the benchmark image
    text_before: int  # prompt tokens before the image placeholder
    text_after: int  # prompt tokens after it
    default_dtype: str = "fp16"
    default_keeps: tuple[int, ...] = (192, 128, 64)
    mixed_batch: int = 8  # requests of the report's mixed-prompt batch scenario (0: none)
    # The serving scenario (Qwen2.5-VL: every image at its own resolution): requests, and the image
    # processor's (min_pixels, max_pixels) bounds that turn the mixed image sizes into mixed N_i.
    serving_batch: int = 0
    serving_pixels: tuple[int, int] = (28 * 28 * 16, 28 * 28 * 256)
    notes: list[str] = field(default_factory=list)


def _llava_15_config(vision: dict, text: dict, image_token_index: int = 32000):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )
    return config


# CLIP ViT-L/14-336 and Llama-2-7B (Vicuna-7B) as in llava-hf/llava-1.5-7b-hf.
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)


def _default_config():
    # Per-token FLOPs scaled by ~1/64 from LLaVA-1.5-7B for the LLM (hidden 1024, 8 layers), with the
    # vision tower and Scorer scaled alike (per-token FLOPs relative to the LLM: vision ~6 %, Scorer
    # ~0.3 %; 0.4 % in the full-size model); N stays 576 (336 px / patch 14).
    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256)
    text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
    return _llava_15_config(vision, text)


def _llava_next_7b_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_336),
        text_config=LlamaConfig(**LLAMA_7B),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def _llava_next_cpu_config():
    # The default preset's vision tower and LLM width on LLaVA-NeXT's any-resolution layout: a 672x672
    # image is a base tile plus a 2x2 grid of 336 px crops, N = 5 x 576 = 2880 visual tokens (+ 48
    # newlines). 4 LLM layers keep one unpruned prefill of ~2,930 tokens to a few seconds on 2 cores;
    # attention is a larger share of the prefill than at N = 576, which is what this preset checks.
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=336, patch_size=14, projection_dim=256)
    text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_index=32000,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )


def _tiny_config():
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    # The image token must be inside the vocabulary: the unmodified model embeds it before replacing it.
    return _llava_15_config(vision, text, image_token_index=511)


# Qwen2.5-VL-7B-Instruct's architecture (vision: 32 blocks, windowed but for 4; text: Qwen2-7B with M-RoPE).
QWEN_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, spatial_merge_size=2,
                      patch_size=14, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
QWEN_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0)
QWEN_7B_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _qwen2_5_vl_config(vision: dict, text: dict, tokens: dict):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)


def _qwen_cpu_config():
    # Qwen2.5-VL's layout (14-px patches, 2x2 merge, 112-px attention windows with one full-attention
    # block, GQA, M-RoPE) scaled for a 2-core CPU: vision 256 x 4 blocks, LLM 1024 x 4 layers with 16
    # heads of 64 (M-RoPE sections [8, 12, 12] = head dim / 2, as [16, 24, 24] is for 128) and 4 KV
    # heads. A 32k vocabulary keeps the weights small; the special tokens sit above the words.
    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=1024, spatial_merge_size=2,
                  patch_size=14, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])
    text = dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    return _qwen2_5_vl_config(vision, text, dict(image_token_id=32001, video_token_id=32002, vision_start_token_id=32003, vision_end_token_id=32004))


def _qwen_tiny_config():
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, spatial_merge_size=2,
                  patch_size=14, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    return _qwen2_5_vl_config(vision, text, dict(image_token_id=504, video_token_id=505, vision_start_token_id=502, vision_end_token_id=503))


PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        description="LLaVA-1.5-shaped, scaled down for a CPU (vision 256x6, LLM 1024x8, Scorer 64x2), N = 576, random weights",
        build_config=_default_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v, hidden_dim=64, num_layers=2, num_heads=2),
        image_size=(336, 336),
        text_before=8,
        text_after=40,
        default_dtype="fp32",
    ),
    "tiny": Preset(
        name="tiny",
        description="a few-second smoke test of the report itself (LLaVA-1.5 classes, N = 16), random weights",
        build_config=_tiny_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v, hidden_dim=32, num_layers=1, num_heads=2),
        image_size=(56, 56),
        text_before=4,
        text_after=8,
        default_dtype="fp32",
        default_keeps=(8, 4),
        mixed_batch=3,
    ),
    "llava-next-cpu": Preset(
        name="llava-next-cpu",
        description="LLaVA-NeXT-shaped, scaled down for a CPU (vision 256x6, LLM 1024x4), 672x672 image: N = 2880, random weights",
        build_config=_llava_next_cpu_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v, hidden_dim=64, num_layers=2, num_heads=2),
        image_size=(672, 672),
        text_before=8,
        text_after=40,
        default_dtype="fp32",
        default_keeps=(640, 160),
        mixed_batch=0,  # eight requests of ~2,900 tokens each take minutes per round on a CPU
    ),
    "llava-1.5-7b": Preset(
        name="llava-1.5-7b",
        description="LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-2-7B), N = 576, random weights",
        build_config=lambda: _llava_15_config(CLIP_VIT_L_336, LLAMA_7B),
        scorer=lambda d_v: ScorerConfig(input_dim=d_v),
        image_size=(336, 336),
        text_before=8,
        text_after=40,
    ),
    "llava-next-7b": Preset(
        name="llava-next-7b",
        description="LLaVA-NeXT-7B architecture (any-resolution, 672x672 image: N = 2880), random weights",
        build_config=_llava_next_7b_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v),
        image_size=(672, 672),
        text_before=8,
        text_after=40,
        default_keeps=(640, 320, 160),
    ),
    "qwen2.5-vl-cpu": Preset(
        name="qwen2.5-vl-cpu",
        description="Qwen2.5-VL-shaped, scaled down for a CPU (vision 256x4, LLM 1024x4, GQA 16/4 heads), serving batch of 16 "
                    "requests with images of 16-196 tokens each, random weights",
        build_config=_qwen_cpu_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v, hidden_dim=64, num_layers=2, num_heads=2),
        image_size=(336, 336),  # the single scenario's image: 12 x 12 groups, N = 144
        text_before=8,
        text_after=40,
        default_dtype="fp32",
        default_keeps=(48, 16),
        mixed_batch=0,  # the serving scenario mixes prompt lengths and image sizes
        serving_batch=16,
        serving_pixels=(28 * 28 * 16, 28 * 28 * 196),
    ),
    "qwen-tiny": Preset(
        name="qwen-tiny",
        description="a few-second smoke test of the report on Qwen2.5-VL classes (N = 4-64 per image), random weights",
        build_config=_qwen_tiny_config,
        scorer=lambda d_v: ScorerConfig(input_dim=d_v, hidden_dim=32, num_layers=1, num_heads=2),
        image_size=(112, 112),  # 4 x 4 groups, N = 16
        text_before=4,
        text_after=8,
        default_dtype="fp32",
        default_keeps=(8, 4),
        mixed_batch=0,
        serving_batch=16,
        serving_pixels=(28 * 28 * 4, 28 * 28 * 64),
    ),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b",
        description="Qwen2.5-VL-7B architecture (ViT 1280x32 with window attention + Qwen2-7B, M-RoPE), serving batch of 16 "
                    "requests with images of 64-1024 tokens each, random weights",
        build_config=lambda: _qwen2_5_vl_config(QWEN_VISION_7B, QWEN_TEXT_7B, QWEN_7B_TOKENS),
        scorer=lambda d_v: ScorerConfig(input_dim=d_v),
        image_size=(672, 672),  # 24 x 24 groups, N = 576
        text_before=8,
        text_after=40,
        default_keeps=(192, 64),
        mixed_batch=0,
        serving_batch=16,
        serving_pixels=(28 * 28 * 64, 28 * 28 * 1024),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def parameter_count(config) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory used)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(preset: Preset, config, device: torch.device, dtype: torch.dtype) -> int:
    """Raise a clear MemoryError when the weights (plus 20 % headroom) exceed free memory."""
    needed = int(parameter_count(config) * torch.finfo(dtype).bits // 8 * 1.2)
    free = available_memory_bytes(device)
    if needed > free:
        raise MemoryError(
            f"preset {preset.name!r} needs about {needed / 2**30:.1f} GiB for its weights in {dtype} on {device}, "
            f"but only {free / 2**30:.1f} GiB is free; use a smaller preset (e.g. 'default') or a larger device"
        )
    return needed


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype):
    """Instantiate the preset's VLM with random weights directly in ``dtype`` on ``device``."""
    from transformers import AutoModelForImageTextToText

    config = preset.build_config()
    check_fits(preset, config, device, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
