"""The shared pieces under the engine: the LRU store and image fingerprint (``autoselect_fast.caching``) and
the image-placeholder rule (``autoselect_fast.placeholders``)."""
import pytest
import torch

from autoselect_fast.caching import LRUCache, image_fingerprint
from autoselect_fast.placeholders import expand, image_runs, strip_runs, text_columns


def test_lru_drops_the_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    cache.put("a", 10)  # storing again refreshes the value and the recency
    cache.put("d", 4)
    assert cache.get("c") is None and cache.get("a") == 10 and cache.get("d") == 4
    assert cache.pop("a") == 10 and cache.pop("a") is None and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_lru_of_capacity_zero_stores_nothing():
    cache = LRUCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0
    with pytest.raises(ValueError, match="capacity must be an int >= 0, got -1"):
        LRUCache(-1)


def test_image_fingerprint():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 4, 4, generator=gen)
    key = image_fingerprint(pixels, meta=(1, 2, 2))
    assert key == image_fingerprint(pixels.clone(), meta=(1, 2, 2)) and len(key) == 32
    assert key == image_fingerprint(pixels.transpose(1, 2).contiguous().transpose(1, 2), meta=(1, 2, 2))  # values, not the layout
    changed = pixels.clone()
    changed[0, 0, 0] += 1e-3
    assert key != image_fingerprint(changed, meta=(1, 2, 2))
    assert key != image_fingerprint(pixels, meta=(1, 4, 1))  # the model's image size tells images apart
    assert key != image_fingerprint(pixels.view(3, 16), meta=(1, 2, 2))  # so does the shape
    # Cast first: tensors equal after the cast (the vLLM plugin's two steps) get one key.
    base = pixels.half().float()  # exact in fp16
    nudged = base * (1 + 1e-5)  # a change fp32 keeps and fp16 rounds away
    assert image_fingerprint(nudged) != image_fingerprint(base)
    assert image_fingerprint(nudged, dtype=torch.float16) == image_fingerprint(base, dtype=torch.float16)
    assert image_fingerprint(pixels.bfloat16()) != image_fingerprint(pixels.half())


def test_placeholder_rule():
    ids = [1, 9, 9, 2, 9, 3, 9, 9, 9]
    runs = image_runs(ids, 9)
    assert runs == [(1, 2), (4, 1), (6, 3)]
    text, insert_at = strip_runs(ids, runs)
    assert text == [1, 2, 3] and insert_at == [1, 2, 3]
    columns, starts = text_columns(3, insert_at, [2, 1, 4])
    assert columns.tolist() == [0, 3, 5] and starts == [1, 4, 6]
    assert expand(text, insert_at, [2, 1, 4], fill=-1).tolist() == [1, -1, -1, 2, -1, 3, -1, -1, -1, -1]
    assert expand([5, 6], [0, 0], [1, 2], fill=7).tolist() == [7, 7, 7, 5, 6]  # two images before any text
    assert image_runs([1, 2], 9) == [] and strip_runs([1, 2], []) == ([1, 2], [])
