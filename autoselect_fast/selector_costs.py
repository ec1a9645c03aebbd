"""What each selector costs: its work between the vision tower and the packer, timed side by side.

Used by ``autoselect-fast pruning`` (the selector table). Every selector is timed on LLaVA-1.5-7B
shapes (N visual tokens of width d_v = 1024 per image, K kept), each call ending in the engine's
selection (``ops.select``: top-K, gathered rows, positions), with the work that selector adds:

* ``scorer``: the Scorer of the published size (2 blocks, width 1024, 16 heads) on the features;
* ``random``: one seeded draw per image (CPU generator, copied to the device);
* ``norm``: the feature norms;
* ``divprune``: LLaVA-1.5-7B's projector (1024 -> 4096 -> 4096, GELU) over all N tokens (DivPrune
  compares projected tokens; the Scorer path projects only the K kept ones), the N x N cosine
  distances and K greedy steps;
* ``visionzip``: the [CLS] attention of one CLIP ViT-L/14 encoder layer (width 1024, 16 heads) over
  the N + 1 tokens (``models.llava.clip_cls_attention``; the tower's own forward is not counted).

The calls are interleaved: each round times every selector once, in a rotating order, so a slow
phase of a shared machine hits all of them alike. Times are per call of ``batch`` images; the table
divides by ``batch`` for ms per image.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from .selectors import SELECTORS, SelectorInputs, make_selector
from .timing import turning_order

LLAVA_7B_HIDDEN = 4096  # the LLM width LLaVA-1.5-7B's projector maps to


def _clip_l_layer(dim: int):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    return CLIPEncoderLayer(CLIPVisionConfig(hidden_size=dim, intermediate_size=4 * dim, num_attention_heads=16 if dim % 16 == 0 else 1))


def build_selector_calls(names: Sequence[str], *, tokens: int, dim: int, keep: int, batch: int, dtype: torch.dtype,
                         device: torch.device) -> dict[str, Callable[[], object]]:
    """One zero-argument call per selector name: scores for ``batch`` images of N = ``tokens``, then selection."""
    from .ops import resolve_backend, select

    torch.manual_seed(0)
    features = [torch.randn(tokens, dim, device=device, dtype=dtype) for _ in range(batch)]
    flat = torch.cat(features)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int64) * tokens
    backend = resolve_backend("auto", device)  # the engine's choice: Triton kernels on CUDA, reference on CPU
    budgets = [keep] * batch

    def selection_call(scores_of: Callable[[], list]) -> Callable[[], object]:
        def call():
            with torch.inference_mode():
                return select(torch.cat(scores_of()), flat, budgets, cu, max_seqlen=tokens, backend=backend, validate=False)
        return call

    return {name: selection_call(_scores_of(name, features, budgets, dim=dim, dtype=dtype, device=device)) for name in names}


def _scores_of(name: str, features: list, budgets: list, *, dim: int, dtype: torch.dtype, device: torch.device) -> Callable[[], list]:
    """The selector's scores of ``features``, with what the engine would hand it (projector, [CLS] attention)."""
    from .models.llava import clip_cls_attention
    from .modules import Scorer, ScorerConfig

    keys = [None] * len(features)
    if name == "scorer":
        selector = make_selector("scorer", scorer=Scorer(ScorerConfig(input_dim=dim)).to(device=device, dtype=dtype).eval())
    else:
        selector = make_selector(name, seed=0)
    if name == "divprune":
        projector = torch.nn.Sequential(torch.nn.Linear(dim, LLAVA_7B_HIDDEN), torch.nn.GELU(),
                                        torch.nn.Linear(LLAVA_7B_HIDDEN, LLAVA_7B_HIDDEN)).to(device=device, dtype=dtype).eval()
        return lambda: selector(SelectorInputs(features, budgets, keys, project=projector))
    if name == "visionzip":
        layer = _clip_l_layer(dim).to(device=device, dtype=dtype).eval()
        hidden = torch.randn(len(features), features[0].shape[0] + 1, dim, device=device, dtype=dtype)  # [CLS] + N tokens
        return lambda: selector(SelectorInputs(features, budgets, keys, cls_attention=list(clip_cls_attention(layer, hidden)[:, 1:].unbind(0))))
    return lambda: selector(SelectorInputs(features, budgets, keys))


def time_interleaved(calls: dict[str, Callable[[], object]], *, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """ms per call of every entry: ``warmup`` untimed rounds, then ``repeats`` rounds, each timing every
    call once, starting one further along each round (CUDA: events, synchronised after each call)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in turning_order(len(names), r):
            name = names[i]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                calls[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                calls[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def selector_cost_table(names: Sequence[str] = SELECTORS, *, tokens: int = 576, dim: int = 1024, keep: int = 64, batch: int = 1,
                        dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"), warmup: int = 3,
                        repeats: int = 20) -> dict[str, dict]:
    """``{name: {"median_ms_per_image", "min_ms_per_image", "max_ms_per_image", "repeats"}}``, interleaved."""
    unknown = [n for n in names if n not in SELECTORS]
    if unknown:
        raise ValueError(f"selectors must be among {list(SELECTORS)}, got {unknown}")
    samples = time_interleaved(build_selector_calls(names, tokens=tokens, dim=dim, keep=keep, batch=batch, dtype=dtype, device=device),
                               device=device, warmup=warmup, repeats=repeats)
    return {name: {"median_ms_per_image": statistics.median(s) / batch, "min_ms_per_image": min(s) / batch,
                   "max_ms_per_image": max(s) / batch, "repeats": len(s)} for name, s in samples.items()}


__all__ = ["build_selector_calls", "time_interleaved", "selector_cost_table"]
