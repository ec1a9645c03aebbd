"""Quickstart: AutoSelect pruning on a (tiny, random-weight) LLaVA-1.5, end to end on the CPU.

Run it as is:

    python examples/llava_quickstart.py

It builds a real ``LlavaForConditionalGeneration`` from a small config (no download: the weights are
random, so the generated tokens are meaningless), draws a picture with Pillow, attaches an untrained
``Scorer``, then runs a pruned prefill and greedy generation, once keeping every visual token and
once keeping 16 of 64. With a real checkpoint the calls are the same: load the model with
``LlavaForConditionalGeneration.from_pretrained(...)``, the Scorer with ``Scorer.from_pretrained(...)``,
and pass the checkpoint's processor as ``image_processor=`` / ``tokenizer=``.
"""
import statistics
import time

import torch
from PIL import Image, ImageDraw
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.modules import Scorer, ScorerConfig

IMAGE_TOKEN = 255


def tiny_llava() -> LlavaForConditionalGeneration:
    """CLIP vision tower (56x56 pixels, 7x7 patches -> 64 visual tokens) + a 2-layer Llama with GQA."""
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN, image_seq_length=64)
    return LlavaForConditionalGeneration(config).eval()


def picture() -> Image.Image:
    image = Image.new("RGB", (96, 72), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill="red")
    draw.rectangle((55, 20, 90, 65), fill="blue")
    return image


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = tiny_llava()
    # The Scorer reads the vision features before the projector: width d_v = vision hidden size (64).
    scorer = Scorer(ScorerConfig(input_dim=64, hidden_dim=64, num_layers=2, num_heads=4))
    image = picture()
    # Token ids with ONE image placeholder; the engine expands it to the image's 64 tokens.
    prompt = [1, 10, 11, IMAGE_TOKEN, 12, 13, 14]
    requests = [Request(prompt, image=image), Request([1, 20, IMAGE_TOKEN, 21], image=image)]

    for keep in (None, 16):
        engine = AutoSelectEngine(model, scorer, keep=keep)  # keep=None: every token, same code path
        engine.prefill(requests)  # warm-up (first calls allocate)
        runs = [engine.prefill(requests, timings=True) for _ in range(5)]
        out = runs[-1]
        timings = {k: statistics.median(run.timings_ms[k] for run in runs) for k in out.timings_ms}
        tokens = engine.generate(requests, max_new_tokens=8).token_ids
        label = "all tokens" if keep is None else f"keep={keep}"
        print(f"\n== {label}: kept {out.kept_tokens} of {out.visual_tokens} visual tokens, "
              f"sequence lengths {out.sequence_lengths}")
        print("   selection backend:", engine.selection_backend, "| attention backend:", engine.attention_backend,
              "| packer:", engine.packer_backend)
        print("   prefill timings, median of 5 (ms):", ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
        print("   first-token logits:", tuple(out.logits.shape), "| next positions:", out.next_positions.tolist())
        for r, new in enumerate(tokens):
            print(f"   request {r}: generated {new}")
        # Scores are prompt-independent and cached per image: the second request and every later
        # turn about the same picture skipped the Scorer.
        print("   Scorer calls:", engine.scorer_calls)

    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
