"""Decoding after the packed prefill: the KV cache turned into a padded batch, then one token per step.

The packed prefill fills a transformers ``DynamicCache`` with ``(1, Hkv, T, d)`` keys/values of all
requests back to back; :func:`padded_cache` lays them out left-padded ``(B, Hkv, L_max, d)`` with a 2-D
attention mask, and :func:`decode` runs the language model one token per step until every request has
met a stop token or its limit. The cache holds the kept tokens only; decoding continues at each
request's largest position + 1 (every M-RoPE row), one more per step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..reference import cu_seqlens_from_lengths
from ..models import VLMAdapter
from .sampling import sample_next_tokens

__all__ = ["padded_cache", "decode"]


def padded_cache(packed_cache, lengths: Sequence[int], device: torch.device):
    """Packed (1, Hkv, T, d) keys/values of requests of ``lengths`` tokens -> a left-padded
    (B, Hkv, L_max, d) DynamicCache + 2-D mask."""
    from transformers import DynamicCache

    bounds = reference.segment_bounds(cu_seqlens_from_lengths(lengths))
    longest = max(e - s for s, e in bounds)
    mask = torch.zeros(len(bounds), longest, dtype=torch.int64, device=device)
    for r, (s, e) in enumerate(bounds):
        mask[r, longest - (e - s):] = 1
    padded = DynamicCache()
    for layer_idx, layer in enumerate(packed_cache.layers):
        kv = []
        for t in (layer.keys, layer.values):
            out = t.new_zeros(len(bounds), t.shape[1], longest, t.shape[3])
            for r, (s, e) in enumerate(bounds):
                out[r, :, longest - (e - s):] = t[0, :, s:e]
            kv.append(out)
        padded.update(kv[0], kv[1], layer_idx)
    return padded, mask


def decode(
    adapter: VLMAdapter,
    cache_kwarg: str,
    first_logits: Tensor,
    next_positions: Tensor,
    cache,
    attention_mask: Tensor,
    *,
    limits: Sequence[int],
    stops: Sequence[frozenset],
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: Sequence[Optional[torch.Generator]],
) -> list[list[int]]:
    """New token ids per request; a request stops after one of its ``stops`` (kept) or ``limits[r]`` tokens."""
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
    b = len(limits)
    positions = next_positions.clone()
    tokens = sample_next_tokens(first_logits, **sampling)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    lm, embed = adapter.language_model, adapter.embed_tokens
    for _ in range(max(limits)):
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                outputs[r].append(t)
                done[r] = t in stops[r] or len(outputs[r]) >= limits[r]
        if all(done):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        hidden = lm(
            inputs_embeds=embed(tokens)[:, None],
            attention_mask=attention_mask,
            position_ids=positions[:, None],  # the same position on every M-RoPE row
            use_cache=True,
            **{cache_kwarg: cache},
        ).last_hidden_state
        tokens = sample_next_tokens(adapter.lm_head(hidden[:, -1]), **sampling)
        positions = positions + 1
    return outputs
