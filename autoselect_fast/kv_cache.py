"""The decode KV cache: static key/value buffers of every layer, filled once from a packed prefill.

This module owns where the keys and values of a batch live while it decodes, and the attention that
reads them. :class:`DecodeCache` allocates, once per batch, one key and one value buffer of shape
``(layers, batch, kv heads, capacity, head dim)``, where capacity covers the longest pruned prefill plus
the new tokens; ``keys[l]`` / ``values[l]`` are layer l's ``(batch, kv heads, capacity, head dim)`` views
of them. Row r holds request r's tokens left-aligned: columns ``0 .. lengths[r]-1`` are valid, the rest
is never read (masked). Only the kept tokens of the prefill are in it (docs/design.md, "Position ids").

* **Prefill** (:meth:`DecodeCache.prefill_writer`): the writer knows where each packed token goes (token
  t of request r to row r, column t - cu_seqlens[r]; indices built on the host, copied without a
  synchronisation) and fills the cache in one of two ways. Eagerly, as the cache of the packed varlen
  prefill: each layer's packed keys/values ``(1, Hkv, T, d)`` are scattered in one indexed copy per layer
  (:meth:`PrefillWriter.update`) and handed back unchanged to the varlen attention. From the runner's
  padded / CUDA-graph prefill (``engine.runner``, ``engine.prefill_buffers``): the step copies every
  layer's packed keys/values into static ``(layers, bucket, Hkv, d)`` buffers, and after it
  :meth:`PrefillWriter.scatter` writes the real tokens of all layers at once, one indexed copy for the
  keys and one for the values (the padding tokens after them are not written). No other copy of the
  prefill's cache exists.
* **Decode step** (the cache itself is the ``cache`` of the language model call, with
  :attr:`DecodeCache.mask` as its 4-D ``attention_mask``): :meth:`DecodeCache.prepare_step` sets the
  mask in place to ``column <= lengths[r]``; every layer's :meth:`DecodeCache.update` writes the new
  key/value of row r at column ``lengths[r]`` (one indexed copy) and returns the layer's whole buffers;
  :func:`decode_attention` attends with that mask; :meth:`DecodeCache.advance` adds one to every length.
  Every tensor the step touches is allocated here once, and nothing reads a device value on the host,
  so the step can be captured in a CUDA graph and replayed.

transformers (5.17 and 5.24) give an already 4-D ``attention_mask`` to the attention function as it is,
so the mask is never rebuilt or concatenated per step. :func:`decode_attention` is routed to by the
engine through :func:`autoselect_fast.attention.attention_call` (the model's configured attention
implementation is not used for these calls): query ``(B, Hq, 1, d)``, the buffers ``(B, Hkv, C, d)``,
grouped-query heads as views (no repeated K/V), softmax in float32 (float64 inputs: float64).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .ragged import to_device
from .validation import is_int


def text_config_shapes(config) -> tuple[int, int, int]:
    """``(layers, kv heads, head dim)`` of a language model's config; ValueError for layers this cache cannot serve."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    other = sorted({t for t in layer_types[:layers] if t != "full_attention"})
    if other:
        raise ValueError(f"the decode cache serves full-attention layers only; the language model has layer types {other}")
    return layers, kv_heads, int(head_dim)


class DecodeCache:
    """K/V buffers ``(num_layers, batch_size, kv_heads, capacity, head_dim)`` plus the per-row lengths and mask.

    Args:
        num_layers, kv_heads, head_dim: the language model's attention shapes (:meth:`for_config`).
        batch_size: rows (requests; a CUDA-graph bucket may have more rows than requests, the extra
            rows stay at length 0 and their results are never read).
        capacity: columns per row: at least the longest prefill + the decode steps that follow.
        dtype, device: of the language model's keys and values.

    Attributes:
        key_buffer, value_buffer: ``(num_layers, batch_size, kv_heads, capacity, head_dim)``, every layer at once.
        keys, values: per layer ``(batch_size, kv_heads, capacity, head_dim)``, views of the buffers.
        lengths: ``(batch_size,)`` int64 on the device, valid columns per row.
        mask: ``(batch_size, 1, 1, capacity)`` bool, the attention mask of the next decode step
            (valid columns plus the one the step writes), set by :meth:`prepare_step`.
    """

    def __init__(self, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.device = torch.device(device)
        self.batch_size, self.capacity = batch_size, capacity
        shape = (num_layers, batch_size, kv_heads, capacity, head_dim)
        # one tensor for all layers: a prefill from the runner's static buffers fills every layer in one indexed copy
        self.key_buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        self.value_buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        self.keys, self.values = list(self.key_buffer.unbind(0)), list(self.value_buffer.unbind(0))
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.mask = torch.zeros(batch_size, 1, 1, capacity, dtype=torch.bool, device=self.device)
        self._rows = torch.arange(batch_size, device=self.device)
        self._columns = torch.arange(capacity, device=self.device)

    @classmethod
    def for_config(cls, config, batch_size: int, capacity: int, *, dtype: torch.dtype, device) -> "DecodeCache":
        """A cache for the language model whose config is ``config`` (see :func:`text_config_shapes`)."""
        layers, kv_heads, head_dim = text_config_shapes(config)
        return cls(layers, batch_size, kv_heads, head_dim, capacity, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_buffer, self.value_buffer))

    # ---------------------------------------------------------------------------------------------
    # Filling from a packed prefill
    # ---------------------------------------------------------------------------------------------
    def prefill_writer(self, sequence_lengths: Sequence[int]) -> "PrefillWriter":
        """The writer of the packed prefill of requests with these (pruned) lengths, in order: the ``cache``
        of an eager prefill call, or the target of :meth:`PrefillWriter.scatter`.

        Request r goes to row r. Sets :attr:`lengths` (rows past the requests: 0); the lengths and
        scatter indices are built on the host and copied without a synchronisation.
        """
        lengths = [int(n) for n in sequence_lengths]
        if not 1 <= len(lengths) <= self.batch_size:
            raise ValueError(f"sequence_lengths must have 1 to {self.batch_size} entries (the cache's rows), got {len(lengths)}")
        if min(lengths) < 1 or max(lengths) > self.capacity:
            raise ValueError(f"sequence_lengths must lie in [1, {self.capacity}] (the cache's capacity), got {lengths}")
        host_lengths = torch.tensor(lengths + [0] * (self.batch_size - len(lengths)), dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(self.batch_size), host_lengths)
        starts = torch.cumsum(host_lengths, 0) - host_lengths
        columns = torch.arange(int(host_lengths.sum())) - starts[rows]
        self.lengths.copy_(to_device(host_lengths, self.device))
        return PrefillWriter(self, to_device(rows, self.device), to_device(columns, self.device))

    # ---------------------------------------------------------------------------------------------
    # One decode step (every call below is capturable in a CUDA graph)
    # ---------------------------------------------------------------------------------------------
    def prepare_step(self) -> Tensor:
        """Set :attr:`mask` in place for the next step (columns ``<= lengths[r]``) and return it."""
        torch.le(self._columns, self.lengths[:, None], out=self.mask.view(self.batch_size, self.capacity))
        return self.mask

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """transformers' cache call of one decode step: write ``(B, Hkv, 1, d)`` at column ``lengths[r]`` of
        row r, return the layer's whole buffers (the attention masks what is not valid)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if key_states.shape != (self.batch_size, keys.shape[1], 1, keys.shape[3]):
            raise ValueError(f"decode step of layer {layer_idx}: expected keys of shape {(self.batch_size, keys.shape[1], 1, keys.shape[3])}, "
                             f"got {tuple(key_states.shape)} (one new token per row)")
        keys[self._rows, :, self.lengths] = key_states[:, :, 0]
        values[self._rows, :, self.lengths] = value_states[:, :, 0]
        return keys, values

    def advance(self) -> None:
        """After a step: every row holds one more token."""
        self.lengths.add_(1)

    # What transformers may ask a cache besides update (only when the call gives no positions or no 4-D mask).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("DecodeCache holds a different length per row; call the language model with explicit position_ids and DecodeCache.mask")


class PackedPrefillCache:
    """What transformers' mask code may ask the cache of a packed prefill besides ``update`` (5.24 asks none
    of it when given a 4-D mask such as ``attention.PACKED_NO_MASK`` and explicit positions, as the engine
    calls it): no offset, the prefill is the whole sequence; with the varlen attention the mask itself is
    never built."""

    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return length, 0


class PrefillWriter(PackedPrefillCache):
    """Writes a packed prefill's keys/values into a :class:`DecodeCache`: as the prefill's ``cache``
    (:meth:`update`, once per layer, eager) or all layers at once from static buffers (:meth:`scatter`).

    ``rows`` / ``columns``: ``(T,)`` device indices of packed token t in the cache (built on the host).
    """

    def __init__(self, cache: DecodeCache, rows: Tensor, columns: Tensor):
        self.cache, self.rows, self.columns = cache, rows, columns

    @property
    def tokens(self) -> int:
        """Packed tokens of the prefill (known on the host)."""
        return self.rows.numel()

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if key_states.shape[0] != 1 or key_states.shape[2] != self.tokens:
            raise ValueError(f"packed prefill of layer {layer_idx}: expected keys of shape (1, Hkv, {self.tokens}, d), got {tuple(key_states.shape)}")
        self.cache.keys[layer_idx][self.rows, :, self.columns] = key_states[0].transpose(0, 1)
        self.cache.values[layer_idx][self.rows, :, self.columns] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def scatter(self, keys: Tensor, values: Tensor) -> None:
        """Write every layer's packed keys/values at once: ``(layers, T', Hkv, d)`` with ``T' >= tokens``,
        the prefill's tokens first in packed order (a padded bucket's padding after them is not written).

        One indexed copy for the keys and one for the values; nothing is read on the host.
        """
        buffer = self.cache.key_buffer
        want = (buffer.shape[0], buffer.shape[2], buffer.shape[4])
        for name, t in (("keys", keys), ("values", values)):
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != want or t.shape[1] < self.tokens:
                raise ValueError(f"scatter: {name} must be (layers, T >= {self.tokens}, Hkv, d) with (layers, Hkv, d) = {want}, got {tuple(t.shape)}")
        # dst[:, rows, :, columns] is (T, layers, Hkv, d): the advanced indices go first
        self.cache.key_buffer[:, self.rows, :, self.columns] = keys[:, :self.tokens].transpose(0, 1).to(buffer.dtype)
        self.cache.value_buffer[:, self.rows, :, self.columns] = values[:, :self.tokens].transpose(0, 1).to(buffer.dtype)


def decode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                     dropout: float = 0.0, scaling: Optional[float] = None, **kwargs) -> tuple[Tensor, None]:
    """One-token attention over a :class:`DecodeCache` layer, called as transformers calls an attention function.

    query ``(B, Hq, 1, d)``; key/value ``(B, Hkv, C, d)`` (the cache buffers); ``attention_mask``
    ``(B, 1, 1, C)`` bool (:attr:`DecodeCache.mask`). Grouped-query heads attend through a
    ``(B, Hkv, Hq/Hkv, d)`` view of the query, so K/V are never repeated. Returns ``((B, 1, Hq, d), None)``.
    """
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise ValueError("decode_attention needs the DecodeCache's (B, 1, 1, C) bool mask as attention_mask")
    if dropout:
        raise ValueError(f"decode_attention is for inference and has no dropout, got dropout={dropout}")
    if kwargs.get("softcap") is not None:
        raise ValueError("decode_attention does not support softcap")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > int(window):
        raise ValueError(f"decode_attention has no sliding window; a cache of {key.shape[2]} columns exceeds sliding_window={window}")
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads % kv_heads:
        raise ValueError(f"decode_attention takes one query token and Hq divisible by Hkv, got query {tuple(query.shape)} and key {tuple(key.shape)}")
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)  # float32 for half precision, float64 stays
    scores = torch.matmul(grouped * scale, key.transpose(-1, -2)).to(softmax_dtype)  # (B, Hkv, groups, C)
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, groups, d)
    return out.reshape(batch, 1, heads, dim), None
