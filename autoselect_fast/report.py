"""The benchmark report: the engine against the unmodified transformers model, timed in one run.

``autoselect-fast bench`` builds a preset (``autoselect_fast.presets``: real transformers classes,
random weights) and times, interleaved (A B C A B C ...: every contender sees the same machine
state), these **contenders** on the same requests:

* ``transformers`` — the **baseline**: the unmodified model, ``model(input_ids, pixel_values,
  attention_mask, position_ids, logits_to_keep=1)`` with its own attention implementation and its
  own (left-)padded batch, as ``generate`` runs its prefill; every visual token;
* ``peers`` — how research forks prune: vision, the same Scorer and selection, then the kept tokens
  through the model's language model as a right-padded ``inputs_embeds`` batch with explicit position
  ids and the model's own attention;
* ``engine`` — :class:`autoselect_fast.engine.AutoSelectEngine`: packed varlen prefill of the kept
  tokens. ``engine`` with every token kept is the check that the engine's path itself is as fast as
  transformers'.

Up to three **scenarios**: ``single`` (``--batch`` requests of the preset's prompt shape; the full model
and every budget K), ``mixed`` (B requests whose prompts hold 10-200 text tokens, at the smallest
budget: what packing buys over padding, with tokens processed against padded) and ``serving`` (presets
with ``serving_batch``, Qwen2.5-VL: 16 requests whose images have different resolutions, so different
N_i through the image processor's ``min_pixels`` / ``max_pixels``, and whose prompts have different
lengths; transformers' padded batch, the engine with every token, and the engine at keep ratios
1/3, 2/9 and 1/9, i.e. K_i = max(1, round(r * N_i)) per image).

A configuration's ``keep`` is ``None`` (every token), an int K (a fixed budget per image) or a float
r in (0, 1) (a keep ratio: the engine's ``keep_ratio``).

Per contender and configuration the report gives vision, pruning, glue, LLM prefill and TTFT
(medians with min-max over the repeats), LLM prefill FLOPs as executed (``torch.utils.flop_counter``;
attention counted as full L x L products, padding included) and speedups against the baseline of the
same scenario. A speedup above the FLOP ratio is flagged as suspect (the baseline is slower than its
FLOPs explain), and a spread of max/min above ``timing.NOISE_MAX_OVER_MIN`` as noisy.

Extending: a contender is a function ``(setup, requests, keep) -> Contender`` in :data:`CONTENDERS`;
a model family needs its unmodified-model inputs in :data:`MODEL_INPUTS` (keyed by adapter class);
a scenario is a list of ``(contender name, keep)`` pairs over a list of requests.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .engine import AutoSelectEngine, PreparedBatch, Request
from .modules import Scorer
from .presets import Preset, build_model, get_preset
from .progress import heartbeat
from .timing import NOISE_MAX_OVER_MIN, Stopwatch, environment, is_noisy, measure, summarize

STAGES = ("vision", "prune", "pack", "prefill", "total")
# Keep ratios of the serving scenario: 66.7, 77.8 and 88.9 % pruning (AutoSelect's Table 3 rates).
SERVING_RATIOS = (1 / 3, 2 / 9, 1 / 9)
# Prompt text tokens of the serving scenario's requests, from LOW to HIGH.
SERVING_TEXT = (10, 120)
# Aspect ratios (width / height) the serving scenario's images cycle through.
SERVING_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 1 / 2)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINE = "transformers"
# A speedup more than this factor above the FLOP ratio is flagged: less work cannot explain it.
SUSPECT_MARGIN = 1.05
LEGEND = (
    "legend: config = visual tokens kept per image (all N, or K); seq = longest LLM sequence of the batch "
    "(text + kept visual tokens); padded = tokens the LLM runs over (batch x longest for padded contenders, "
    "the sum of the sequences for the packed engine); vision = vision tower; pruning = Scorer + top-K selection; "
    "glue = everything between (projector, embeddings, positions, packing or padding, merging); LLM prefill = "
    "language model + lm_head on the last token; TTFT = time to first-token logits (sum of the stages); "
    "GFLOPs = LLM prefill FLOPs as executed; TTFT x / prefill x = baseline time / this time; FLOP x = "
    "baseline FLOPs / these FLOPs (the speedup less work explains); '!' = speedup above FLOP x (suspect); "
    "all times: median [min-max] over the repeats, ms."
)


@dataclass
class ReportSettings:
    preset: str = "default"
    keeps: Sequence[int] = ()  # budgets K; empty: the preset's
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Optional[str] = None  # default: the preset's
    batch: int = 1  # requests of the `single` scenario
    mixed_batch: Optional[int] = None  # requests of the `mixed` scenario; None: the preset's, 0: skip it
    mixed_text: tuple[int, int] = (10, 200)  # text tokens per prompt of the `mixed` scenario
    serving_batch: Optional[int] = None  # requests of the `serving` scenario; None: the preset's, 0: skip it
    serving_ratios: Sequence[float] = SERVING_RATIOS  # keep ratios of the `serving` scenario
    warmup: int = 2
    repeats: int = 5
    out_dir: str = "bench/out"
    plot: bool = True
    progress: bool = True


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------
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


def synthetic_requests(engine: AutoSelectEngine, preset: Preset, batch: int, text_lengths: Optional[Sequence[int]] = None) -> list[Request]:
    """``batch`` requests, processed by the model's real image processor.

    Each prompt is BOS, ``text_before - 1`` words, the image placeholder, then the remaining words;
    ``text_lengths`` gives each prompt's text tokens (default: the preset's ``text_before + text_after``).
    """
    vocab = engine.adapter.language_model.config.vocab_size
    image_token = engine.adapter.image_token_id
    processor = engine.adapter.default_image_processor()
    if text_lengths is None:
        text_lengths = [preset.text_before + preset.text_after] * batch
    requests = []
    for i, length in enumerate(text_lengths):
        gen = torch.Generator().manual_seed(1000 + i)
        before = max(1, min(preset.text_before, length - 1))
        words = torch.randint(3, min(vocab, image_token) - 1, (length - 1,), generator=gen).tolist()
        prompt = [1] + words[: before - 1] + [image_token] + words[before - 1 :]
        pixel_values, size = engine.adapter.process_image(synthetic_image(*preset.image_size, seed=i), processor)
        requests.append(Request(prompt, pixel_values=pixel_values, image_sizes=size))
    return requests


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


def _image_tokens(adapter, processor, height: int, width: int) -> int:
    image = synthetic_image(height, width, seed=0)
    return adapter.layout(adapter.process_image(image, processor)[1]).num_tokens


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
    vocab, image_token = adapter.language_model.config.vocab_size, adapter.image_token_id
    requests = []
    for i, ((height, width), length) in enumerate(zip(serving_image_sizes(adapter, preset, batch), lengths)):
        gen = torch.Generator().manual_seed(2000 + i)
        before = max(1, min(preset.text_before, length - 1))
        words = torch.randint(3, min(vocab, image_token) - 1, (length - 1,), generator=gen).tolist()
        prompt = [1] + words[: before - 1] + [image_token] + words[before - 1 :]
        pixel_values, size = adapter.process_image(synthetic_image(height, width, seed=100 + i), processor)
        requests.append(Request(prompt, pixel_values=pixel_values, image_sizes=size))
    return requests


def mixed_text_lengths(batch: int, low: int, high: int) -> list[int]:
    """``batch`` prompt lengths evenly spread over ``[low, high]`` text tokens, shortest first."""
    if batch == 1:
        return [low]
    return [round(low + (high - low) * i / (batch - 1)) for i in range(batch)]


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V as full L x L products (torch's convention for its CUDA SDPA kernels), per query head."""
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[-2] * (d + value_shape[-1])


def _varlen_flops(query, key, value, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """``torch.nn.attention.varlen`` (the engine's CUDA attention): the same convention per segment."""
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()  # a host read: counting runs untimed
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    _, heads, d = query.shape  # (T, H, d) packed; per segment the (1, H, L, d) shapes of _sdpa_flops
    return sum(_sdpa_flops((1, heads, lq, d), (1, heads, lk, d), (1, heads, lk, value.shape[-1])) for lq, lk in zip(lengths_q, lengths_k))


_varlen_flops._get_raw = True  # FlopCounterMode passes the tensors themselves (their offsets are needed)


def _flop_counter() -> FlopCounterMode:
    # torch does not count its CPU flash kernel nor the varlen custom op, and its own CUDA SDPA formulas
    # reject grouped-query shapes (torch 2.11: "query/key/value shapes are incompatible" for Qwen's
    # 28 query / 4 key heads): one formula, per query head, for all of them.
    aten = torch.ops.aten
    ops = [aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
           aten._scaled_dot_product_efficient_attention, getattr(aten, "_scaled_dot_product_cudnn_attention", None)]
    mapping = {op: _sdpa_flops for op in ops if op is not None}
    try:
        importlib.import_module("torch.nn.attention.varlen")  # registers torch.ops.torch_attn._varlen_attn
    except ImportError:  # torch < 2.9
        pass
    varlen = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
    if varlen is not None:
        mapping[varlen] = _varlen_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    with _flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def _module_flops(counter: FlopCounterMode, root: nn.Module, modules: Sequence[nn.Module]) -> int:
    """FLOPs the counter attributed to ``modules`` (submodules of ``root``), by their qualified names."""
    names = {id(m): name for name, m in root.named_modules()}
    counts = counter.get_flop_counts()
    total = 0
    for m in modules:
        key = f"{type(root).__name__}.{names[id(m)]}"
        if key not in counts:
            raise RuntimeError(f"the FLOP counter saw no module {key!r}; the model's structure is not what the report expects")
        total += sum(counts[key].values())
    return total


# --------------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------------
Keep = Optional[Union[int, float]]  # every token, a fixed K, or a keep ratio


@dataclass
class BenchSetup:
    """A built preset: the model, the Scorer and an engine that keeps every token (for shared stages)."""

    preset: Preset
    model: nn.Module
    scorer: Scorer
    device: torch.device
    dtype: torch.dtype
    engine: AutoSelectEngine = field(init=False)

    def __post_init__(self):
        self.engine = AutoSelectEngine(self.model, self.scorer, keep=None, score_cache_size=0)

    @classmethod
    def build(cls, preset: Preset, device: torch.device, dtype: torch.dtype) -> "BenchSetup":
        """The preset's model and Scorer with random weights (seed 0), in ``dtype`` on ``device``."""
        from .models import get_adapter

        torch.manual_seed(0)
        model = build_model(preset, device, dtype)
        scorer = Scorer(preset.scorer(get_adapter(model).feature_dim)).to(device=device, dtype=dtype).eval()
        return cls(preset, model, scorer, device, dtype)

    def engine_for(self, keep: Keep) -> AutoSelectEngine:
        """An engine keeping every token (None), K per image (int) or ``max(1, round(r * N_i))`` (float r)."""
        if isinstance(keep, float):
            return AutoSelectEngine(self.model, self.scorer, keep_ratio=keep, score_cache_size=0)
        return AutoSelectEngine(self.model, self.scorer, keep=keep, score_cache_size=0)


@dataclass
class Contender:
    """One way of getting first-token logits for a batch of requests.

    ``run()`` does one timed prefill and returns its stage times in ms (keys of :data:`STAGES`,
    ``total`` included) and the ``(B, vocab)`` logits; ``flops()`` counts the LLM prefill's FLOPs;
    ``sequence_lengths`` are the real tokens per request the LLM sees, ``llm_tokens`` what it runs over.
    """

    name: str
    keep: Optional[int]
    run: Callable[[], tuple[dict, Tensor]]
    flops: Callable[[], int]
    sequence_lengths: list[int]
    llm_tokens: int


def engine_contender(setup: BenchSetup, requests: list[Request], keep: Optional[int]) -> Contender:
    engine = setup.engine_for(keep)

    def run():
        out = engine.prefill(requests, timings=True)
        return dict(out.timings_ms), out.logits

    def flops():
        batch = engine.prepare(requests)
        features = engine.encode_images(batch.pixel_values, batch.image_sizes)
        packed = engine.pack(batch, engine.prune(features, batch.budgets, positions=batch.token_positions))
        return count_flops(lambda: engine.prefill_packed(packed))

    lengths = _engine_sequence_lengths(engine, requests)
    return Contender("engine", keep, run, flops, lengths, sum(lengths))


def _engine_sequence_lengths(engine: AutoSelectEngine, requests: list[Request]) -> list[int]:
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    return engine.pack(batch, engine.prune(features, batch.budgets, positions=batch.token_positions)).cu_seqlens.diff().tolist()


def _right_padded(packed) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed ``(T, H)`` rows -> right-padded ``(B, L, H)`` embeds, ``(B, L)`` mask, positions, last index."""
    lengths = packed.cu_seqlens.diff().tolist()
    b, longest = len(lengths), max(lengths)
    device = packed.embeds.device
    row = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lengths, device=device))
    col = torch.arange(packed.embeds.shape[0], device=device) - packed.cu_seqlens.to(device).long()[row]
    embeds = packed.embeds.new_zeros(b, longest, packed.embeds.shape[-1])
    embeds[row, col] = packed.embeds
    mask = torch.zeros(b, longest, dtype=torch.long, device=device)
    mask[row, col] = 1
    pos = packed.position_ids
    if pos.dim() == 1:
        positions = torch.zeros(b, longest, dtype=pos.dtype, device=device)
        positions[row, col] = pos
    else:  # M-RoPE (3, T) -> (3, B, L)
        positions = torch.zeros(pos.shape[0], b, longest, dtype=pos.dtype, device=device)
        positions[:, row, col] = pos
    return embeds, mask, positions, torch.tensor(lengths, device=device) - 1


def peers_contender(setup: BenchSetup, requests: list[Request], keep: Optional[int]) -> Contender:
    """Kept tokens through the model's own language model as a padded ``inputs_embeds`` batch."""
    engine = setup.engine_for(keep)
    lm, lm_head = engine.adapter.language_model, engine.adapter.lm_head

    def padded_batch(clock: Optional[Stopwatch] = None):
        clock = clock or Stopwatch(setup.device)
        batch = engine.prepare(requests)
        with clock.stage("vision"):
            features = engine.encode_images(batch.pixel_values, batch.image_sizes)
        with clock.stage("prune"):
            pruned = engine.prune(features, batch.budgets, positions=batch.token_positions)
        with clock.stage("pack"):
            padded = _right_padded(engine.pack(batch, pruned))
        return padded

    def prefill(padded):
        embeds, mask, positions, last = padded
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        return lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    @torch.inference_mode()
    def run():
        clock = Stopwatch(setup.device)
        padded = padded_batch(clock)
        with clock.stage("prefill"):
            logits = prefill(padded)
        clock.ms["total"] = sum(clock.ms.values())
        return clock.ms, logits

    @torch.inference_mode()
    def flops():
        padded = padded_batch()
        return count_flops(lambda: prefill(padded))

    lengths = _engine_sequence_lengths(engine, requests)
    return Contender("peers", keep, run, flops, lengths, len(lengths) * max(lengths))


def llava_model_inputs(setup: BenchSetup, batch: PreparedBatch) -> dict:
    """What a LLaVA / LLaVA-NeXT processor + ``generate`` hand the model for the prefill: expanded image
    tokens, left padding, positions from the mask, pixel values (NeXT: tiles padded, ``image_sizes``)."""
    adapter = setup.engine.adapter
    sequences = []
    for r, (s, e) in enumerate(zip(batch.text_cu_seqlens[:-1].tolist(), batch.text_cu_seqlens[1:].tolist())):
        text, a = batch.text_ids[s:e].tolist(), int(batch.insert_at[r])
        sequences.append(text[:a] + [adapter.image_token_id] * batch.layouts[r].num_slots + text[a:])
    longest = max(len(seq) for seq in sequences)
    pad = adapter.language_model.config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(seq)) + seq for seq in sequences])
    mask = torch.tensor([[0] * (longest - len(seq)) + [1] * len(seq) for seq in sequences])
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if all(size is None for size in batch.image_sizes):
        inputs["pixel_values"] = torch.stack(batch.pixel_values)
    else:
        tiles = max(pv.shape[0] for pv in batch.pixel_values)
        inputs["pixel_values"] = torch.stack([torch.cat([pv, pv.new_zeros(tiles - pv.shape[0], *pv.shape[1:])]) for pv in batch.pixel_values])
        inputs["image_sizes"] = torch.tensor([list(size) for size in batch.image_sizes])
    dtype = adapter.vision_dtype
    return {k: v.to(setup.device, dtype) if v.is_floating_point() else v.to(setup.device) for k, v in inputs.items()}


def _expanded_sequences(batch: PreparedBatch, image_token_id: int) -> list[list[int]]:
    """Each request's token ids with every image placeholder expanded to the image's slots, as the
    model's processor writes them."""
    sequences = []
    for r, (s, e) in enumerate(zip(batch.text_cu_seqlens[:-1].tolist(), batch.text_cu_seqlens[1:].tolist())):
        text, seq, done = batch.text_ids[s:e].tolist(), [], 0
        for i in batch.images_of(r):
            a = int(batch.insert_at[i])
            seq += text[done:a] + [image_token_id] * batch.layouts[i].num_slots
            done = a
        sequences.append(seq + text[done:])
    return sequences


def qwen2_5_vl_model_inputs(setup: BenchSetup, batch: PreparedBatch) -> dict:
    """What ``Qwen2_5_VLProcessor`` (left padding) hands ``generate`` for the prefill: expanded
    ``<|image_pad|>`` runs, ``attention_mask``, ``mm_token_type_ids`` (1 on image tokens: the model's
    own ``get_rope_index`` needs it), every image's patches concatenated and ``image_grid_thw``. No
    ``position_ids``: the model computes its M-RoPE positions itself, as in ``generate``."""
    adapter = setup.engine.adapter
    sequences = _expanded_sequences(batch, adapter.image_token_id)
    longest = max(len(seq) for seq in sequences)
    pad = adapter.language_model.config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(seq)) + seq for seq in sequences])
    mask = torch.tensor([[0] * (longest - len(seq)) + [1] * len(seq) for seq in sequences])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": ((input_ids == adapter.image_token_id) & (mask == 1)).to(torch.int32),
        "pixel_values": torch.cat(batch.pixel_values).to(adapter.tower.patch_embed.proj.weight.dtype),
        "image_grid_thw": torch.tensor([list(size) for size in batch.image_sizes], dtype=torch.int64),
    }
    return {k: v.to(setup.device) for k, v in inputs.items()}


# The unmodified model's inputs, per model family (adapter class name).
MODEL_INPUTS: dict[str, Callable[[BenchSetup, PreparedBatch], dict]] = {
    "LlavaAdapter": llava_model_inputs,
    "LlavaNextAdapter": llava_model_inputs,
    "Qwen2_5_VLAdapter": qwen2_5_vl_model_inputs,
}


def vision_tower(adapter) -> nn.Module:
    """The model's vision tower (LLaVA: ``vision_tower``; Qwen2.5-VL: ``visual``)."""
    return getattr(adapter, "tower", None) or adapter.inner.vision_tower


class _ModuleTimer:
    """Wall time spent inside some modules during one call, via forward hooks (removed on exit)."""

    def __init__(self, device: torch.device, modules: dict[str, Sequence[nn.Module]]):
        self.device, self.modules, self.ms, self._t0, self._handles = device, modules, {}, {}, []

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        for stage, modules in self.modules.items():
            self.ms[stage] = 0.0
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(lambda mod, args, stage=stage: self._start(mod)))
                self._handles.append(m.register_forward_hook(lambda mod, args, out, stage=stage: self._stop(mod, stage)))
        return self

    def _start(self, module):
        self._sync()
        self._t0[id(module)] = time.perf_counter()

    def _stop(self, module, stage):
        self._sync()
        self.ms[stage] += (time.perf_counter() - self._t0.pop(id(module))) * 1e3

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


def transformers_contender(setup: BenchSetup, requests: list[Request], keep: Optional[int] = None) -> Contender:
    """The unmodified model's forward over its own padded batch (every visual token; ``keep`` must be None)."""
    if keep is not None:
        raise ValueError(f"the transformers baseline keeps every visual token, got keep={keep}")
    model, adapter = setup.model, setup.engine.adapter
    family = type(adapter).__name__
    if family not in MODEL_INPUTS:
        raise NotImplementedError(f"no unmodified-model inputs for {family}; add a builder to report.MODEL_INPUTS")
    batch = setup.engine.prepare(requests)
    inputs = MODEL_INPUTS[family](setup, batch)
    stage_modules = {"vision": [vision_tower(adapter)], "prefill": [adapter.language_model, adapter.lm_head]}

    @torch.inference_mode()
    def forward():
        return model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]

    def run():
        clock = Stopwatch(setup.device)
        with _ModuleTimer(setup.device, stage_modules) as inside, clock.stage("total"):
            logits = forward()
        ms = {"vision": inside.ms["vision"], "prune": 0.0, "prefill": inside.ms["prefill"], "total": clock.ms["total"]}
        ms["pack"] = ms["total"] - ms["vision"] - ms["prefill"]
        return ms, logits

    def flops():
        with _flop_counter() as counter:
            forward()
        return _module_flops(counter, model, stage_modules["prefill"])

    lengths = [len(seq) for seq in _expanded_sequences(batch, adapter.image_token_id)]
    return Contender(BASELINE, None, run, flops, lengths, inputs["input_ids"].numel())


CONTENDERS: dict[str, Callable[[BenchSetup, list[Request], Optional[int]], Contender]] = {
    "transformers": transformers_contender,
    "peers": peers_contender,
    "engine": engine_contender,
}


# --------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    description: str
    requests: list[Request]
    configs: list[tuple[str, Keep]]  # (contender, keep); the first is the baseline


def run_scenario(setup: BenchSetup, scenario: Scenario, settings: ReportSettings, bar) -> dict:
    """Time every contender interleaved (one run of each per round), then compute ratios to the baseline."""
    contenders = [CONTENDERS[name](setup, scenario.requests, keep) for name, keep in scenario.configs]
    samples: list[dict[str, list[float]]] = [{stage: [] for stage in STAGES} for _ in contenders]
    for round_ in range(settings.warmup + settings.repeats):
        for c, store in zip(contenders, samples):
            bar.set_postfix_str(f"{scenario.name}: {c.name} {_keep_label(c.keep)}")
            with torch.inference_mode():
                ms, _ = c.run()
            if round_ >= settings.warmup:
                for stage in STAGES:
                    store[stage].append(ms[stage])
            bar.update(1)
    rows = []
    for c, store in zip(contenders, samples):
        rows.append({
            "contender": c.name,
            "keep": c.keep,
            "sequence_lengths": c.sequence_lengths,
            "llm_tokens": c.llm_tokens,
            "stages": {stage: summarize(store[stage]) for stage in STAGES},
            "prefill_flops": c.flops(),
        })
    base = rows[0]
    for r in rows:
        r["speedup"] = {
            "ttft": base["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"],
            "prefill": base["stages"]["prefill"]["median_ms"] / r["stages"]["prefill"]["median_ms"],
            "flops_ratio": base["prefill_flops"] / r["prefill_flops"],
        }
        limit = r["speedup"]["flops_ratio"] * SUSPECT_MARGIN
        r["suspect"] = [k for k in ("ttft", "prefill") if r["speedup"][k] > limit]
        r["noisy"] = [stage for stage in ("prefill", "total") if is_noisy(r["stages"][stage])]
        peers = next((p for p in rows if p["contender"] == "peers" and p["keep"] == r["keep"]), None)
        if r["contender"] == "engine" and peers is not None:
            r["ttft_speedup_vs_peers"] = peers["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"]
    return {
        "name": scenario.name,
        "description": scenario.description,
        "batch": len(scenario.requests),
        "text_tokens": [_text_tokens(setup, req) for req in scenario.requests],
        "visual_tokens": _visual_tokens(setup, scenario.requests),
        "baseline": base["contender"],
        "rows": rows,
    }


def _visual_tokens(setup: BenchSetup, requests: list[Request]) -> list[int]:
    """N per request: visual tokens of its image(s) before pruning."""
    batch = setup.engine.prepare(requests)
    out = [0] * len(requests)
    for r, layout in zip(batch.image_request.tolist(), batch.layouts):
        out[r] += layout.num_tokens
    return out


def _text_tokens(setup: BenchSetup, request: Request) -> int:
    return sum(1 for t in request.prompt if t != setup.engine.adapter.image_token_id)


def build_scenarios(setup: BenchSetup, settings: ReportSettings, keeps: list[int], mixed_batch: int, serving_batch: int = 0) -> list[Scenario]:
    preset = setup.preset
    single = synthetic_requests(setup.engine, preset, settings.batch)
    configs = [("transformers", None), ("engine", None), ("peers", None)]
    configs += [(name, k) for k in keeps for name in ("engine", "peers")]
    scenarios = [Scenario(
        "single", f"batch {settings.batch}, {preset.text_before + preset.text_after} text tokens per prompt; full model and every K",
        single, configs,
    )]
    if mixed_batch:
        low, high = settings.mixed_text
        lengths = mixed_text_lengths(mixed_batch, low, high)
        k = min(keeps) if keeps else None
        configs = [("transformers", None), ("engine", None)] + ([("engine", k), ("peers", k)] if k is not None else [])
        scenarios.append(Scenario(
            "mixed", f"batch {mixed_batch}, prompts of {low}-{high} text tokens ({', '.join(map(str, lengths))}); K = {k}",
            synthetic_requests(setup.engine, preset, mixed_batch, lengths), configs,
        ))
    if serving_batch:
        scenarios.append(serving_scenario(setup, serving_batch, settings.serving_ratios))
    return scenarios


def serving_scenario(setup: BenchSetup, batch: int, ratios: Sequence[float] = SERVING_RATIOS) -> Scenario:
    """``batch`` requests of mixed image sizes and prompt lengths: (a) transformers' padded batch, (b)
    the engine with every token, (c) the engine at each keep ratio."""
    requests = serving_requests(setup.engine, setup.preset, batch)
    n = [setup.engine.adapter.layout(r.image_sizes).num_tokens for r in requests]
    configs = [("transformers", None), ("engine", None)] + [("engine", float(r)) for r in ratios]
    low, high = SERVING_TEXT
    return Scenario(
        "serving",
        f"batch {batch}, images of N = {min(n)}-{max(n)} tokens, prompts of {low}-{high} text tokens; keep ratios "
        + ", ".join(f"{r:.3f}" for r in ratios),
        requests, configs,
    )


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
def report_stem(preset: str, device: torch.device, dtype_name: str, batch: int, mixed_batch: int, serving_batch: int = 0) -> str:
    """File name stem: preset, device, dtype and batch scenarios, so different runs do not overwrite each other."""
    return (f"report-{preset}-{device.type}-{dtype_name}-b{batch}" + (f"-mixed{mixed_batch}" if mixed_batch else "")
            + (f"-serving{serving_batch}" if serving_batch else ""))


def run_report(settings: ReportSettings) -> dict:
    """Build the preset, time every scenario, print the tables, write JSON and PNG."""
    preset = get_preset(settings.preset)
    dtype_name = settings.dtype or preset.default_dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    dtype, device = DTYPES[dtype_name], torch.device(settings.device)
    mixed_batch = preset.mixed_batch if settings.mixed_batch is None else settings.mixed_batch
    serving_batch = preset.serving_batch if settings.serving_batch is None else settings.serving_batch
    if settings.batch < 1 or settings.repeats < 1 or settings.warmup < 0 or mixed_batch < 0 or serving_batch < 0:
        raise ValueError(f"batch and repeats must be >= 1, warmup, mixed_batch and serving_batch >= 0, got batch={settings.batch}, "
                         f"repeats={settings.repeats}, warmup={settings.warmup}, mixed_batch={mixed_batch}, serving_batch={serving_batch}")
    if serving_batch and not supports_serving(preset):
        raise ValueError(f"serving_batch={serving_batch}: the serving scenario needs a native-resolution model (a Qwen2.5-VL preset); "
                         f"preset {preset.name!r} has fixed-size images (use serving_batch=0)")
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1 for r in settings.serving_ratios):
        raise ValueError(f"serving_ratios must be keep ratios in (0, 1), got {list(settings.serving_ratios)}")
    low, high = settings.mixed_text
    if not 2 <= low <= high:
        raise ValueError(f"mixed_text must be (low, high) text tokens with 2 <= low <= high, got {tuple(settings.mixed_text)}")
    keeps = sorted(set(settings.keeps or preset.default_keeps), reverse=True)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in keeps):
        raise ValueError(f"keeps must be ints >= 1, got {list(settings.keeps)}")

    say = print if settings.progress else (lambda *a, **k: None)
    say(f"[1/3] building preset {preset.name!r} on {device} in {dtype_name}: {preset.description}")
    with heartbeat("building the model with random weights", enabled=settings.progress):
        setup = BenchSetup.build(preset, device, dtype)
    n_tokens = setup.engine.prepare(synthetic_requests(setup.engine, preset, 1)).layouts[0].num_tokens
    too_big = [k for k in keeps if k >= n_tokens]
    if too_big:
        raise ValueError(f"keep must be below the image's N = {n_tokens} visual tokens (all of them is the full model, always timed), got {too_big}")
    scenarios = build_scenarios(setup, settings, keeps, mixed_batch, serving_batch)

    runs = sum(len(s.configs) for s in scenarios) * (settings.warmup + settings.repeats)
    say(f"[2/3] timing {runs} prefills, contenders interleaved: {settings.warmup} warm-up + {settings.repeats} timed rounds per scenario")
    results = []
    with tqdm(total=runs, desc="prefills", disable=not settings.progress, leave=False) as bar:
        for scenario in scenarios:
            results.append(run_scenario(setup, scenario, settings, bar))
    pruning_alone = _pruning_module_alone(setup, scenarios[0].requests, keeps, settings)

    engine = setup.engine
    report = {
        "benchmark": "ttft_report",
        "preset": preset.name,
        "description": preset.description,
        "environment": environment(device),
        "dtype": dtype_name,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "baseline": (f"transformers: unmodified {type(setup.model).__name__}.forward (attn_implementation="
                     f"{setup.model.config._attn_implementation}, its own left-padded batch, logits_to_keep=1, no KV cache)"),
        "shapes": {
            "image_size": list(preset.image_size),
            "visual_tokens_per_image": n_tokens,
            "text_tokens_per_request": preset.text_before + preset.text_after,
            "scorer": vars(setup.scorer.config),
        },
        "backends": {"selection": engine.selection_backend, "attention": engine.attention_backend, "packer": engine.packer_backend},
        "scenarios": results,
        "pruning_module_alone": pruning_alone,
        "noise_threshold_max_over_min": NOISE_MAX_OVER_MIN,
    }
    report["summary"] = report_summary(report)
    report["warnings"] = report_warnings(report)
    say("[3/3] results")
    print(format_report(report))
    os.makedirs(settings.out_dir, exist_ok=True)
    stem = os.path.join(settings.out_dir, report_stem(preset.name, device, dtype_name, settings.batch, mixed_batch, serving_batch))
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    with open(stem + ".md", "w") as fh:
        fh.write(format_markdown(report))
    print(f"JSON: {stem}.json\nmarkdown tables: {stem}.md")
    if settings.plot:
        plot_report(report, stem + ".png")
        print(f"plot: {stem}.png")
    return report


def _pruning_module_alone(setup: BenchSetup, requests: list[Request], keeps: list[int], settings: ReportSettings) -> list[dict]:
    """Scorer + selection timed on its own (no score cache) at every K, on the single scenario's images."""
    out = []
    for k in keeps:
        engine = setup.engine_for(k)
        batch = engine.prepare(requests)
        features = engine.encode_images(batch.pixel_values, batch.image_sizes)
        alone = measure(lambda: engine.prune(features, batch.budgets, positions=batch.token_positions),
                        device=setup.device, warmup=settings.warmup, repeats=max(settings.repeats, 10))
        out.append({"keep": k, **alone.as_dict()})
    return out


def _row(scenario: dict, contender: str, keep) -> Optional[dict]:
    return next((r for r in scenario["rows"] if r["contender"] == contender and r["keep"] == keep), None)


def report_summary(report: dict) -> list[str]:
    """The headline ratios, one line each: the engine's own path against transformers, pruning against
    the baseline and its FLOP ratio, packing against the peers' padding."""
    lines = []
    for s in report["scenarios"]:
        base = s["rows"][0]
        full = _row(s, "engine", None)
        if full is not None:
            lines.append(f"{s['name']}: engine with every token kept takes {full['stages']['total']['median_ms'] / base['stages']['total']['median_ms']:.2f}x "
                         f"the TTFT of {base['contender']} (LLM prefill {full['stages']['prefill']['median_ms'] / base['stages']['prefill']['median_ms']:.2f}x)")
        for r in s["rows"]:
            if r["contender"] == "engine" and r["keep"] is not None:
                x = r["speedup"]
                vs_peers = f"; against the peers' padded batch: TTFT {r['ttft_speedup_vs_peers']:.2f}x (theirs / ours)" if "ttft_speedup_vs_peers" in r else ""
                lines.append(f"{s['name']}: engine {_config(r)}: prefill {x['prefill']:.2f}x, TTFT {x['ttft']:.2f}x faster than {base['contender']}; "
                             f"FLOP ratio {x['flops_ratio']:.2f}x (prefill speedup = {x['prefill'] / x['flops_ratio']:.2f} of it){vs_peers}")
    return lines


def report_warnings(report: dict) -> list[str]:
    """One NOISY line per scenario with spread-out measurements, one SUSPECT line per speedup above its FLOP ratio."""
    lines = []
    threshold = report["noise_threshold_max_over_min"]
    for s in report["scenarios"]:
        noisy = [f"{r['contender']} {_config(r)} (" + ", ".join(
            f"{'TTFT' if stage == 'total' else 'prefill'} {r['stages'][stage]['max_ms'] / r['stages'][stage]['min_ms']:.2f}" for stage in r["noisy"]) + ")"
            for r in s["rows"] if r["noisy"]]
        if noisy:
            lines.append(f"NOISY {s['name']}: max/min above {threshold} for {'; '.join(noisy)}. The machine was busy: "
                         "re-run on a quiet machine (or with more --repeats) before quoting these numbers.")
        for r in s["rows"]:
            if r["suspect"]:
                which = ", ".join(f"{kind} {r['speedup'][kind]:.2f}x" for kind in r["suspect"])
                lines.append(f"SUSPECT {s['name']}: {r['contender']} {_config(r)}: speedup ({which}) above the FLOP ratio "
                             f"{r['speedup']['flops_ratio']:.2f}x: less work cannot explain it; the baseline was slow (or the run noisy).")
    return lines


def _config(r: dict) -> str:
    return _keep_label(r["keep"])


def _keep_label(keep: Keep) -> str:
    if keep is None:
        return "all"
    return f"r={keep:.3f}" if isinstance(keep, float) else f"K={keep}"


def format_scenario(scenario: dict) -> str:
    lines = [
        f"scenario {scenario['name']}: {scenario['description']}; baseline = {scenario['baseline']}",
        f"{'config':>7} {'contender':>12} {'seq':>5} {'padded':>7} {'vision':>17} {'pruning':>15} {'glue':>15} {'LLM prefill':>21} "
        f"{'TTFT':>21} {'GFLOPs':>7} {'prefill x':>9} {'TTFT x':>7} {'FLOP x':>6}",
    ]

    def cell(stage: dict, width: int) -> str:
        digits = 2 if stage["median_ms"] < 10 else 1
        return f"{stage['median_ms']:.{digits}f} [{stage['min_ms']:.{digits}f}-{stage['max_ms']:.{digits}f}]".rjust(width)

    for r in scenario["rows"]:
        s, x = r["stages"], r["speedup"]
        mark = {k: "!" if k in r["suspect"] else " " for k in ("ttft", "prefill")}
        lines.append(
            f"{_config(r):>7} {r['contender']:>12} {max(r['sequence_lengths']):>5} {r['llm_tokens']:>7} {cell(s['vision'], 17)} "
            f"{cell(s['prune'], 15)} {cell(s['pack'], 15)} {cell(s['prefill'], 21)} {cell(s['total'], 21)} "
            f"{r['prefill_flops'] / 1e9:>7.1f} {x['prefill']:>8.2f}{mark['prefill']} {x['ttft']:>6.2f}{mark['ttft']} {x['flops_ratio']:>6.2f}"
        )
    for r in scenario["rows"]:
        if "ttft_speedup_vs_peers" in r:
            lines.append(f"engine {_config(r)} against the peers' padded batch at the same K: TTFT {r['ttft_speedup_vs_peers']:.2f}x (peers' TTFT / engine's)")
    if scenario["batch"] > 1:
        lines.append("per request (a batched prefill gives every request its first token when the batch ends: "
                     "per-request TTFT = the batch's TTFT above):")
        seqs = {(r["contender"], r["keep"]): r["sequence_lengths"] for r in scenario["rows"]}
        keys = list(seqs)
        lines.append(f"{'request':>8} {'text':>5} {'N':>5} " + " ".join(f"{name + ' ' + _keep_label(k):>16}" for name, k in keys)
                     + "   (LLM tokens of the request)")
        for i, (text, n) in enumerate(zip(scenario["text_tokens"], scenario.get("visual_tokens", ["?"] * len(scenario["text_tokens"])))):
            lines.append(f"{i:>8} {text:>5} {n:>5} " + " ".join(f"{seqs[key][i]:>16}" for key in keys))
        for r in scenario["rows"]:
            real = sum(r["sequence_lengths"])
            lines.append(f"  {r['contender']} {_config(r)}: {real} real tokens, LLM runs over {r['llm_tokens']} "
                         f"({100 * (r['llm_tokens'] - real) / r['llm_tokens']:.0f} % padding)")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"{report['preset']} | {env['device']} | torch {env['torch']} | {report['dtype']} | N = {report['shapes']['visual_tokens_per_image']} | "
        f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up [min-max], ms",
        f"baseline: {report['baseline']}",
        LEGEND,
    ]
    for scenario in report["scenarios"]:
        lines += ["", format_scenario(scenario)]
    single = report["scenarios"][0]
    lines.append("")
    for p in report["pruning_module_alone"]:
        inside = next(r for r in single["rows"] if r["contender"] == "engine" and r["keep"] == p["keep"])
        share = inside["stages"]["prune"]["median_ms"] / inside["stages"]["total"]["median_ms"]
        lines.append(f"pruning module at K={p['keep']}: {p['median_ms']:.3f} ms timed alone, "
                     f"{inside['stages']['prune']['median_ms']:.3f} ms inside the engine's TTFT = {100 * share:.2f} % of TTFT")
    lines += ["", "summary (medians):", *(f"  {line}" for line in report["summary"])]
    if report["warnings"]:
        lines += ["", *report["warnings"]]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The README's tables: one per scenario, medians in ms, then the summary and any warnings."""
    env = report["environment"]
    out = [
        f"`{report['preset']}` preset, {env['device']}, torch {env['torch']}, transformers {env['transformers']}, {report['dtype']}; "
        f"median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up (min-max in the JSON). "
        f"Baseline: {report['baseline']}.",
    ]
    for s in report["scenarios"]:
        out += ["", f"**{s['name']}** ({s['description']}):", "",
                "| config | contender | LLM seq | LLM tokens | vision ms | pruning ms | glue ms | LLM prefill ms | TTFT ms | prefill GFLOPs | prefill × | TTFT × | FLOP × |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            st, x = r["stages"], r["speedup"]
            mark = {k: " (!)" if k in r["suspect"] else "" for k in ("ttft", "prefill")}
            out.append(
                f"| {_config(r)} | {r['contender']} | {max(r['sequence_lengths'])} | {r['llm_tokens']} | {st['vision']['median_ms']:.1f} | "
                f"{st['prune']['median_ms']:.2f} | {st['pack']['median_ms']:.1f} | {st['prefill']['median_ms']:.1f} | {st['total']['median_ms']:.1f} | "
                f"{r['prefill_flops'] / 1e9:.1f} | {x['prefill']:.2f}×{mark['prefill']} | {x['ttft']:.2f}×{mark['ttft']} | {x['flops_ratio']:.2f}× |"
            )
    out += ["", *(f"* {line}" for line in report["summary"])]
    if report["warnings"]:
        out += ["", "Warnings of this run:", "", *(f"* {line}" for line in report["warnings"])]
    return "\n".join(out) + "\n"


# Kept for callers of the previous API: the whole report as text.
format_table = format_report


def plot_report(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = report["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4), squeeze=False)
    single = scenarios[0]
    ax = axes[0][0]
    colours = {"transformers": "tab:gray", "engine": "tab:blue", "peers": "tab:orange"}
    for name in ("engine", "peers"):
        pruned = [r for r in single["rows"] if r["contender"] == name and r["keep"] is not None]
        if pruned:
            ax.plot([r["keep"] for r in pruned], [r["stages"]["total"]["median_ms"] for r in pruned], "o-", color=colours[name], label=f"{name}, pruned")
    for r in single["rows"]:
        if r["keep"] is None:
            ax.axhline(r["stages"]["total"]["median_ms"], color=colours[r["contender"]], linestyle="--" if r["contender"] != BASELINE else "-",
                       label=f"{r['contender']}, all {report['shapes']['visual_tokens_per_image']} tokens")
    ax.set_xlabel("visual tokens kept (K)")
    ax.set_ylabel("TTFT, ms (median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{single['description'][:60]}", fontsize=8)
    ax.legend(fontsize=7)
    for scenario, ax in zip(scenarios[1:], axes[0][1:]):
        rows = scenario["rows"]
        labels = [f"{r['contender']}\n{_config(r)}" for r in rows]
        medians = [r["stages"]["total"]["median_ms"] for r in rows]
        errors = [[m - r["stages"]["total"]["min_ms"] for m, r in zip(medians, rows)], [r["stages"]["total"]["max_ms"] - m for m, r in zip(medians, rows)]]
        ax.bar(labels, medians, yerr=errors, color=[colours[r["contender"]] for r in rows], capsize=3)
        ax.set_ylabel("batch TTFT, ms (median, min-max)")
        ax.set_title(scenario["description"][:70], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{report['preset']} on {report['environment']['device']}, {report['dtype']}; baseline: unmodified transformers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
