"""Quickstart: a serving batch on a (tiny, random-weight) Qwen2.5-VL, pruned before the merger, on the CPU.

Run it as is:

    python examples/qwen_quickstart.py

It builds a real ``Qwen2_5_VLForConditionalGeneration`` from a small config (no download: the weights
are random, so the generated tokens are meaningless), processes pictures of different sizes with the
real ``Qwen2VLImageProcessor`` (each image keeps its native resolution, so its own token count),
attaches an untrained ``Scorer`` and serves one batch holding a text-only request, single-image
requests and a two-image request: first keeping every visual token, then keeping 2/9 of each image's
tokens (77.8 % pruning), greedy and sampled. With a real checkpoint the calls are the same: load the
model with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(...)``, the Scorer with
``Scorer.from_pretrained(...)``, and pass ``AutoProcessor.from_pretrained(...)`` as ``tokenizer=`` (string
prompts from its chat template) and its ``image_processor``.
"""
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.modules import Scorer, ScorerConfig

IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 500, 501, 502, 503, 504, 505


def tiny_qwen() -> Qwen2_5_VLForConditionalGeneration:
    """Vision: 4 blocks (block 3 full attention, the others windowed), hidden 64, 14-px patches, 2x2 merge.
    Text: 2 layers, hidden 128, 4 heads of 32 (M-RoPE sections [4, 6, 6]), 2 kv heads, vocab 512."""
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, spatial_merge_size=2,
                  patch_size=14, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def chat(*words: int, images: int = 0) -> list[int]:
    """Token ids of a chat turn: <|im_start|> user, one <|vision_start|><|image_pad|><|vision_end|> per
    image (the engine expands each <|image_pad|> to the image's token count), the words, then the
    assistant's turn."""
    ids = [IM_START, 1]
    for _ in range(images):
        ids += [VISION_START, IMAGE_PAD, VISION_END]
    return ids + list(words) + [IM_END, IM_START, 2]


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = tiny_qwen()
    # The Scorer reads the pre-merger groups: 4 patches x vision hidden 64 = 256 features per token.
    scorer = Scorer(ScorerConfig(input_dim=4 * 64, hidden_dim=64, num_layers=2, num_heads=4))
    processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 256)  # 16..256 tokens per image
    requests = [
        Request(chat(10, 11, 12, images=1), image=picture(0, 448, 224)),              # wide
        Request(chat(20, 21, 22, 23, 24, 25)),                                         # text only
        Request(chat(30, 31, images=2), images=[picture(1, 112, 112), picture(2, 200, 380)], max_new_tokens=4),
        Request(chat(40, images=1), image=picture(3, 300, 300), stop_token_ids=[IM_END]),
    ]
    for keep_ratio in (None, 2 / 9):
        engine = AutoSelectEngine(model, scorer, keep_ratio=keep_ratio, image_processor=processor)
        out = engine.prefill(requests, timings=True)
        tokens = engine.generate(requests, max_new_tokens=8).token_ids
        sampled = engine.generate(requests, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=0).token_ids
        label = "every token" if keep_ratio is None else f"keep_ratio={keep_ratio:.3f}"
        print(f"\n== {label}: kept {out.kept_tokens} of {out.visual_tokens} visual tokens per request, "
              f"sequence lengths {out.sequence_lengths}")
        print("   selection backend:", engine.selection_backend, "| attention backend:", engine.attention_backend,
              "| packer:", engine.packer_backend)
        print("   prefill timings (ms):", ", ".join(f"{k} {v:.1f}" for k, v in out.timings_ms.items()))
        print("   next M-RoPE positions:", out.next_positions.tolist())
        for r, (greedy, sample) in enumerate(zip(tokens, sampled)):
            print(f"   request {r}: greedy {greedy} | sampled {sample}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
