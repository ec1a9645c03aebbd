"""The static buffers of the runner's padded / CUDA-graph prefill, and the K/V capture that lets ``generate`` use it.

This module owns the memory a padded or graphed prefill (``engine.runner``, ``docs/engine.md``,
"Runner") reads and writes, and the copy of a batch into it:

* **Inputs** (:class:`PrefillBuffers`), allocated on the first padded prefill at the largest token
  bucket and request bucket: ``embeds`` ``(T_max, hidden)``, ``positions`` ``(rows, T_max)``,
  ``cu_seqlens`` ``(B_max + 2,)`` and ``last`` ``(B_max,)``. Each (token bucket, request bucket) shape reads
  views of them (:meth:`PrefillBuffers.inputs`); :func:`fill_inputs` copies a packed batch in and closes
  the padding segment.
* **K/V capture** (for ``generate`` only), allocated the first time a padded prefill fills a decode
  cache (:meth:`PrefillBuffers.kv`): one key and one value buffer ``(layers, T_max, Hkv, d)`` in the
  decode cache's dtype. The padded step gives the language model a :class:`KVCapture` as its cache,
  which copies each layer's packed keys/values (the whole bucket, padding included) into them, inside
  the CUDA graph; after the step (outside the graph) ``kv_cache.PrefillWriter.scatter`` writes the real
  tokens of all layers into the decode cache, one indexed copy for the keys and one for the values.
  Size: ``2 × layers × T_max × Hkv × d × element size``: at the default largest bucket of 4096 tokens in
  fp16, 2 GiB for a LLaVA-1.5-7B / LLaVA-NeXT-Vicuna-7B language model (32 layers, 32 KV heads of 128),
  512 MiB for Mistral-7B (8 KV heads), 224 MiB for Qwen2.5-VL-7B (28 layers, 4 KV heads). A runner that
  only ever prefills never allocates them (:meth:`PrefillBuffers.kv_bytes` stays 0).

:func:`autoselect_fast.ragged.copy_into` copies the batch in without blocking the host.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kv_cache import DecodeCache, PackedPrefillCache
from ..packing import PackedBatch
from ..ragged import copy_into


class KVCapture(PackedPrefillCache):
    """The cache of the padded prefill step that fills a decode cache: each layer's packed keys/values
    ``(1, Hkv, T, d)`` (T: the token bucket) copied into static ``(layers, T, Hkv, d)`` views, handed back
    unchanged to the varlen attention. One per shape, so a captured graph (or a compiled step) always
    sees the same object and the same buffers."""

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        want = (1, self.keys.shape[2], self.keys.shape[1], self.keys.shape[3])
        if tuple(key_states.shape) != want or layer_idx >= self.keys.shape[0]:
            raise ValueError(f"padded prefill of layer {layer_idx} (of {self.keys.shape[0]}): expected keys of shape {want}, got {tuple(key_states.shape)}")
        self.keys[layer_idx].copy_(key_states[0].transpose(0, 1))
        self.values[layer_idx].copy_(value_states[0].transpose(0, 1))
        return key_states, value_states


class PrefillBuffers:
    """The padded prefill's static tensors, shared by every bucket (see the module docstring).

    Args:
        largest_tokens, most_requests: the largest token bucket and request bucket.
        hidden, dtype: of the packed embeddings.
        position_rows: 1, or 3 for M-RoPE.
    """

    def __init__(self, largest_tokens: int, most_requests: int, hidden: int, dtype: torch.dtype, position_rows: int, device: torch.device):
        self.embeds = torch.zeros(largest_tokens, hidden, dtype=dtype, device=device)
        # padding rows keep whatever positions they last held: valid values that no real token sees
        self.positions = torch.arange(largest_tokens, device=device).expand(position_rows, largest_tokens).contiguous()
        self.cu_seqlens = torch.zeros(most_requests + 2, dtype=torch.int32, device=device)
        self.last = torch.zeros(most_requests, dtype=torch.int64, device=device)
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self._captures: dict[int, KVCapture] = {}

    def check(self, packed: PackedBatch) -> None:
        hidden, dtype = packed.embeds.shape[1], packed.embeds.dtype
        if self.embeds.shape[1] != hidden or self.embeds.dtype != dtype:
            raise ValueError(f"packed.embeds must be (T, {self.embeds.shape[1]}) {self.embeds.dtype} as earlier batches, got (T, {hidden}) {dtype}")

    def inputs(self, token_bucket: int, request_bucket: int) -> dict:
        """The static inputs of one (token bucket, request bucket): views of the shared buffers."""
        positions = self.positions[:, :token_bucket]
        return {
            "embeds": self.embeds[:token_bucket],
            "positions": positions[0] if positions.shape[0] == 1 else positions,
            "cu_seqlens": self.cu_seqlens[:request_bucket + 2],
            "last": self.last[:request_bucket],
            "max_seqlen": token_bucket,
        }

    def kv(self, cache: DecodeCache, token_bucket: int) -> KVCapture:
        """The K/V capture of a token bucket for prefills into caches like ``cache`` (allocating the K/V
        buffers at the largest bucket on first use; later caches must have the same shapes and dtype)."""
        layers, _, kv_heads, _, head_dim = cache.key_buffer.shape
        dtype = cache.key_buffer.dtype
        if self.keys is None:
            shape = (layers, self.embeds.shape[0], kv_heads, head_dim)
            self.keys = torch.zeros(shape, dtype=dtype, device=self.embeds.device)
            self.values = torch.zeros(shape, dtype=dtype, device=self.embeds.device)
        have = (self.keys.shape[0], self.keys.shape[2], self.keys.shape[3], self.keys.dtype)
        if have != (layers, kv_heads, head_dim, dtype):
            raise ValueError(f"the decode cache must have (layers, kv heads, head dim, dtype) = {have} as earlier ones, "
                             f"got {(layers, kv_heads, head_dim, dtype)}")
        if token_bucket not in self._captures:
            self._captures[token_bucket] = KVCapture(self.keys[:, :token_bucket], self.values[:, :token_bucket])
        return self._captures[token_bucket]

    def kv_bytes(self) -> int:
        """Bytes of the K/V capture buffers (0 until a padded prefill first fills a decode cache)."""
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def tensors(self) -> list[Tensor]:
        """Every buffer (for inspection: ``Runner.static_tensors``)."""
        kv = [] if self.keys is None else [self.keys, self.values]
        return [self.embeds, self.positions, self.cu_seqlens, self.last, *kv]


def fill_inputs(inputs: dict, packed: PackedBatch) -> None:
    """Copy the real batch into one shape's static inputs (:meth:`PrefillBuffers.inputs`) and close the padding segment."""
    tokens, requests, bucket = packed.embeds.shape[0], packed.cu_seqlens.numel() - 1, inputs["max_seqlen"]
    copy_into(inputs["embeds"][:tokens], packed.embeds)
    copy_into(inputs["positions"][..., :tokens], packed.position_ids.view(inputs["positions"].shape[:-1] + (tokens,)))
    copy_into(inputs["cu_seqlens"][:requests + 1], packed.cu_seqlens)
    inputs["cu_seqlens"][requests + 1:].fill_(bucket)  # the padding segment [T, bucket), then empty segments
    copy_into(inputs["last"][:requests], packed.last_token_index)
    inputs["last"][requests:].fill_(bucket - 1)  # rows nobody reads
