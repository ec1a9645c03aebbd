"""The synthetic visual-question task of the learning experiment, and a tiny LLaVA to solve it.

Task ("which colour?"): a 56×56 image is a grid of 8×8 cells of 7×7 pixels, one cell per visual
token of the tiny CLIP tower (N = 64). Exactly one cell holds the target, a solid coloured shape in one
of six colours; ``distractors`` other cells hold high-contrast striped or checkered patterns in random
colours (so the image's mean colour says nothing about the answer, and they carry more signal energy
than the shape); the background is grey noise. The question asks for the target's colour; the answer
is one word. So exactly one of the 64 tokens carries the answer, and we know which: the cell index is
stored with every sample.

Two forms (``decoys``):

* ``decoys=0`` (the first form): the target is a square, plus or diamond, the only solid shape in the
  image, and the question says "the shape". The answer is then the image's most unusual token, which
  a training-free diversity selector (DivPrune) finds without learning anything.
* ``decoys`` > 0 (the learning experiment's default, 8): the target is always a diamond and ``decoys``
  other cells hold solid squares and pluses in random colours of the same six: objects as unusual as
  the target, as in real images where the question concerns one of several salient things. Only the
  diamond answers the question, which names it ("what colour is the diamond ?"). The Scorer never
  sees the question; it can learn that diamonds matter on this task, a diversity rule cannot.

The tiny VLM is made of the real transformers classes (``LlavaForConditionalGeneration``: CLIP vision
tower, LLaVA MLP projector, Llama LLM) with a word-level tokenizer and a chat template built here.
Its CLIP tower has one encoder layer, so the LLaVA default ``vision_feature_layer = -2`` reads the
patch embeddings: no information crosses tokens before the Scorer, which keeps "the token that
carries the answer" well defined (with deeper random towers attention spreads the colour over every
token, and random selection would look good for the wrong reason). :func:`pretrain_vlm` trains
projector + LLM with every visual token (the vision tower stays frozen at its random
initialisation, as LLaVA keeps its CLIP tower frozen), until it answers well.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Sample, tokenize_conversation

GRID = 8
CELL = 7
IMAGE_SIZE = GRID * CELL
COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 235),
    "yellow": (235, 220, 30), "magenta": (220, 40, 220), "cyan": (30, 215, 225),
}
SHAPES = ("square", "plus", "diamond")
QUESTIONS = ("what colour is the shape ?", "which colour does the shape have ?", "name the colour of the shape .")
# With decoys (solid squares and pluses) the target is always a diamond, and the question names it.
TARGET_WITH_DECOYS = "diamond"
DECOY_SHAPES = ("square", "plus")
DECOY_QUESTIONS = tuple(q.replace("shape", TARGET_WITH_DECOYS) for q in QUESTIONS)
# A user turn's content is a string (training data) or a list of items (a multimodal processor's messages,
# e.g. from lmms-eval): both render "USER: <image> <question> ".
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_TOKEN = "<image>"


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the task's words, with the chat template above."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN, "USER:", "ASSISTANT:"]
    for q in QUESTIONS + DECOY_QUESTIONS:
        words += [w for w in q.split() if w not in words]
    words += [c for c in COLOURS if c not in words]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _shape_mask(shape: str) -> np.ndarray:
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    c = CELL // 2
    if shape == "square":
        return (abs(yy - c) <= 2) & (abs(xx - c) <= 2)
    if shape == "plus":
        return (abs(yy - c) <= 1) | (abs(xx - c) <= 1)
    return (abs(yy - c) + abs(xx - c)) <= 3


def _cell(img: np.ndarray, index: int) -> np.ndarray:
    """The view of grid cell ``index`` (row-major, as the visual tokens) in ``img``."""
    r, c = divmod(int(index), GRID)
    return img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]


def _jittered(rng: np.random.RandomState, colour: str) -> np.ndarray:
    """A solid shape's RGB: the named colour, each channel moved by up to ±20."""
    return np.clip(np.array(COLOURS[colour]) + rng.randint(-20, 21, size=3), 0, 255)


def make_image(rng: np.random.RandomState, distractors: int, decoys: int = 0) -> tuple[np.ndarray, int, str, str]:
    """``(image uint8 (56, 56, 3), target cell, colour, shape)``.

    With ``decoys`` > 0 the target is always a diamond and ``decoys`` other cells hold solid squares
    and pluses in random colours of the same six: objects as unusual as the target, of which only the
    diamond answers the question (which then names the diamond, :data:`DECOY_QUESTIONS`). Decoys are
    drawn last, so ``decoys=0`` gives exactly the images of the task without them (``choice`` without
    replacement takes a prefix of one permutation, so the other cells do not move either)."""
    grey = rng.randint(90, 160)
    img = np.clip(grey + rng.randn(IMAGE_SIZE, IMAGE_SIZE, 1) * 8, 0, 255).repeat(3, axis=2)
    cells = rng.choice(GRID * GRID, size=distractors + decoys + 1, replace=False)
    target, others, decoy_cells = int(cells[0]), cells[1:distractors + 1], cells[distractors + 1:]
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    names = list(COLOURS)
    for cell in others:  # coloured, high-contrast patterns: they make the image's mean colour uninformative
        kind = rng.randint(3)
        pattern = ((yy + xx) % 2) if kind == 0 else (yy % 2) if kind == 1 else (xx % 2)
        hue = np.array(COLOURS[names[rng.randint(len(names))]], dtype=np.float64)
        dark = rng.randint(0, 40)
        _cell(img, cell)[...] = np.where(pattern[..., None], hue, dark)
    colour = list(COLOURS)[rng.randint(len(COLOURS))]
    shape = SHAPES[rng.randint(len(SHAPES))]  # drawn even with decoys, so the random stream is the same
    if decoys:
        shape = TARGET_WITH_DECOYS
    _cell(img, target)[_shape_mask(shape)] = _jittered(rng, colour)
    for cell in decoy_cells:
        hue = _jittered(rng, names[rng.randint(len(names))])
        kind = DECOY_SHAPES[rng.randint(len(DECOY_SHAPES))]
        _cell(img, cell)[_shape_mask(kind)] = hue
    return img.astype(np.uint8), target, colour, shape


@dataclass
class TaskSample:
    sample: Sample  # input_ids / labels of the whole conversation, pixel values
    prompt_ids: Tensor  # the prompt up to the generation prompt (for answering)
    answer_id: int
    target_cell: int
    image: np.ndarray
    question: str = ""
    answer: str = ""


def make_samples(count: int, seed: int, tokenizer, image_processor, *, distractors: int = 12, decoys: int = 0) -> list[TaskSample]:
    """``count`` samples of the task, deterministic in ``seed``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = []
    images = [make_image(rng, distractors, decoys) for _ in range(count)]
    pixel_values = image_processor(images=[Image.fromarray(im) for im, *_ in images], return_tensors="pt")["pixel_values"]
    for (im, target, colour, _), pv in zip(images, pixel_values):
        question = (DECOY_QUESTIONS if decoys else QUESTIONS)[rng.randint(len(QUESTIONS))]
        messages = [{"role": "user", "content": f"{IMAGE_TOKEN} {question}"}, {"role": "assistant", "content": colour}]
        ids, labels = tokenize_conversation(tokenizer, messages, IMAGE_TOKEN)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(TaskSample(
            Sample(torch.tensor(ids), torch.tensor(labels), pv, None, "synthetic"),
            torch.tensor(prompt_ids), tokenizer.convert_tokens_to_ids(colour), target, im, question, colour,
        ))
    return out


def build_tiny_llava(tokenizer, seed: int = 0):
    """A LLaVA-1.5-architecture model sized for a CPU: CLIP 2×64 (56 px, patch 7), Llama 2×128."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=CELL)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=GRID * GRID)
    return LlavaForConditionalGeneration(config)


def save_checkpoint(model, tokenizer, directory: str) -> str:
    """``model`` (the tiny LLaVA) with its processor, as a user's checkpoint directory: what
    ``AutoSelectEngine``'s loaders and the lmms-eval model open (``pretrained=DIR``)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    # num_additional_image_tokens=1: CLIP's CLS token, which the "default" strategy drops
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=CELL, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def _expanded(sample: Sample, image_token_id: int, num_tokens: int) -> tuple[Tensor, Tensor]:
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    a = ids.index(image_token_id)
    return (torch.tensor(ids[:a] + [image_token_id] * num_tokens + ids[a + 1:]),
            torch.tensor(labels[:a] + [-100] * num_tokens + labels[a + 1:]))


def pretrain_vlm(model, samples: list[TaskSample], *, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                 log=print) -> list[float]:
    """Train projector + LLM of ``model`` on the task with every visual token; returns the loss curve.

    The vision tower is frozen at its random initialisation. All samples of the task share one
    template length, so batches need no padding.
    """
    model.train().requires_grad_(True)
    model.model.vision_tower.requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    n_tok = GRID * GRID
    token_id = model.config.image_token_id
    pairs = [_expanded(s.sample, token_id, n_tok) for s in samples]
    by_len: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(pairs):
        by_len.setdefault(ids.numel(), []).append(i)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    lengths = sorted(by_len)
    for step in range(steps):
        group = by_len[lengths[int(torch.randint(len(lengths), (1,), generator=g))]]
        pick = [group[int(j)] for j in torch.randint(len(group), (batch_size,), generator=g)]
        ids = torch.stack([pairs[i][0] for i in pick])
        labels = torch.stack([pairs[i][1] for i in pick])
        pixels = torch.stack([samples[i].sample.pixel_values for i in pick])
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"  pretrain step {step + 1}/{steps}: loss {np.mean(losses[-20:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval().requires_grad_(False)
    return losses


def cell_of_token(index: int) -> tuple[int, int]:
    """(row, column) of visual token ``index`` in the grid (LLaVA-1.5 tokens are row-major patches)."""
    return divmod(int(index), GRID)


__all__ = ["build_tokenizer", "build_tiny_llava", "make_samples", "pretrain_vlm", "save_checkpoint", "TaskSample", "COLOURS", "GRID", "CELL"]
