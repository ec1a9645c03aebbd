"""Next-token choice for generation: greedy, or sampling with temperature, top-k and top-p.

This module owns the sampling arguments' checks, the logits filter (the order and rules of
transformers' temperature, top-k and top-p warpers) and the per-request generators that make a seeded
request's samples independent of the rest of its batch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..validation import is_int, is_number

__all__ = ["filter_logits", "sample_next_tokens", "check_sampling", "request_generators"]


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits for sampling: divided by ``temperature``, then all but the ``top_k`` best and all outside
    the ``top_p`` nucleus set to -inf (the order and rules of transformers' temperature, top-k and
    top-p warpers; the best token always survives)."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(x, dim=-1)
        cumulative = ascending.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return x


def sample_next_tokens(logits: Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> Tensor:
    """``(B,)`` next tokens: argmax, or one draw per row from the filtered distribution with that row's generator."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    generators = generators or [None] * probs.shape[0]
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def check_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if not is_number(temperature) or not 0 < temperature < math.inf:  # inf would flatten every distribution silently
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed must be None or an int, got {seed!r}")


def request_generators(own_seeds: Sequence[Optional[int]], seed: Optional[int], device: torch.device) -> list[Optional[torch.Generator]]:
    """Per request: a generator seeded with its own seed, else ``seed + r``; None (torch's global one) with neither."""
    seeds = [own if own is not None else None if seed is None else seed + r for r, own in enumerate(own_seeds)]
    return [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]
