"""Tiny random-weight VLM checkpoints saved to disk the way a user has them: ``save_pretrained`` of the
model and of its processor (tokenizer built offline with the ``tokenizers`` library, image processor
from defaults, a chat template), plus a Scorer saved with ``Scorer.save_pretrained``.

Used by the ``generate`` / ``show`` tests; nothing is downloaded.
"""
from __future__ import annotations

import os

import torch

from autoselect_fast.modules import Scorer, ScorerConfig

# LLaVA-1.5-style template: "USER: <image>\n<question> ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
WORDS = ["what", "is", "in", "the", "picture", "a", "red", "blue", "circle", "square", "USER", "ASSISTANT", ":", "?", "."]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS, *(f"w{i}" for i in range(80))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def _configs(tokenizer, image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return vision, text


def save_llava(directory: str, *, image_size: int = 56, patch_size: int = 14) -> str:
    """LLaVA-1.5 (CLIP + Llama), N = (image_size / patch_size)^2 visual tokens."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision, text = _configs(tokenizer, image_size, patch_size)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch_size) ** 2)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    # num_additional_image_tokens=1: CLIP's CLS token, which the "default" strategy drops (as in llava-hf checkpoints)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def save_llava_next(directory: str, *, tile: int = 56, patch_size: int = 14) -> str:
    """LLaVA-NeXT with tiles of ``tile`` pixels and a grid of up to 2x2 crops."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision, text = _configs(tokenizer, tile, patch_size)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default", vision_feature_layer=-2)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size, num_additional_image_tokens=1,
                       vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


# Qwen-style template: images render as <|vision_start|><|image_pad|><|vision_end|> (one placeholder per image).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %} {{ item['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def save_qwen2_5_vl(directory: str, *, min_pixels: int = 28 * 28, max_pixels: int = 28 * 28 * 32, for_vllm: bool = False,
                    text_overrides: dict | None = None, vision_overrides: dict | None = None) -> str:
    """Qwen2.5-VL with a 2-block vision tower (14 px patches, 2x2 merge, 56 px windows) and a text model of
    head dim 16 (``mrope_section`` [2, 3, 3]); images keep their resolution between the pixel limits.

    The image processor and the tokenizer (with the chat template) are saved one by one:
    ``Qwen2_5_VLProcessor.save_pretrained`` needs its video processor, which needs torchvision.

    ``for_vllm``: the shapes vLLM's CPU backend takes (text head dim 32, ``mrope_section`` [4, 6, 6];
    a 4-block tower of width 64 with windows of 112 px, so images of more than 4x4 groups span several
    windows), weights drawn with a larger spread (greedy tokens of a random model then vary instead of
    repeating one token), and the whole ``Qwen2_5_VLProcessor`` with its video processor, which vLLM loads
    (needs torchvision). ``text_overrides`` / ``vision_overrides`` change the shapes (benchmarks use a
    larger model).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *QWEN_SPECIAL]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    if for_vllm:
        vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, spatial_merge_size=2,
                      patch_size=14, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])
        text = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                    initializer_range=0.1)
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, spatial_merge_size=2,
                      patch_size=14, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    text.update(vocab_size=len(tokenizer), num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    text.update(text_overrides or {})
    vision.update(vision_overrides or {})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                              bos_token_id=1, eos_token_id=2, pad_token_id=3)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(directory)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    if for_vllm:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(directory)
        return directory
    image_processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_scorer(directory: str, input_dim: int = 32) -> str:
    torch.manual_seed(1)
    Scorer(ScorerConfig(input_dim=input_dim, hidden_dim=32, num_layers=1, num_heads=2)).save_pretrained(directory)
    return directory


def save_picture(path: str, size=(112, 112), colour=None) -> str:
    """A generated picture: one colour (``colour``), or a circle and a square on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, colour or "white")
    if colour is None:
        draw = ImageDraw.Draw(image)
        w, h = size
        draw.ellipse((w * 0.1, h * 0.1, w * 0.5, h * 0.5), fill="red")
        draw.rectangle((w * 0.55, h * 0.4, w * 0.9, h * 0.9), fill="blue")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return path
