"""Caches keyed by images: one LRU store and one image fingerprint.

Used by the engine (its per-image score cache and the default score-cache key) and by the vLLM
plugin (kept indices and embeddings found again by the pixels of an image). :class:`LRUCache` is not
locked: a caller shared between threads holds its own lock around it (the engine does).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Generic, Hashable, Optional, TypeVar

import torch
from torch import Tensor

from .validation import is_int

__all__ = ["LRUCache", "SharedLRUCache", "image_fingerprint"]

V = TypeVar("V")


class LRUCache(Generic[V]):
    """At most ``capacity`` entries; storing beyond it drops the least recently used (0: stores nothing)."""

    def __init__(self, capacity: int):
        if not is_int(capacity) or capacity < 0:
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable) -> Optional[V]:
        """The value of ``key`` (marked as recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> None:
        if not self.capacity:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def pop(self, key: Hashable, default: Optional[V] = None) -> Optional[V]:
        return self._entries.pop(key, default)

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class SharedLRUCache(LRUCache[V]):
    """An :class:`LRUCache` for values built on a miss, shared between threads (each access is locked)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._lock = threading.Lock()

    def get_or_build(self, key: Hashable, build) -> V:
        """The value of ``key``, built by ``build()`` on a miss (outside the lock: two threads may build
        the same entry, both equal)."""
        with self._lock:
            value = self.get(key)
        if value is None:
            value = build()
            with self._lock:
                self.put(key, value)
        return value


def image_fingerprint(pixel_values: Tensor, *, meta: Any = None, dtype: Optional[torch.dtype] = None) -> str:
    """A hash of an image's pixel bytes (cast to ``dtype`` first when given), their dtype and shape,
    and ``repr(meta)`` (what else tells images apart: the model's image size or grid)."""
    data = pixel_values.detach()
    if dtype is not None:
        data = data.to(dtype)
    data = data.contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}|{tuple(data.shape)}|{meta!r}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
