"""The image-placeholder rule, shared by the engine (``autoselect_fast.engine``) and the model adapters.

A prompt holds one run of the model's image token per image, in order, images separated by other
tokens: a single placeholder token or the already expanded run of ``layout.num_slots`` tokens. This
module finds those runs (:func:`image_runs`), splits a prompt into its text tokens and the images'
insertion points (:func:`strip_runs`), and lays text and image slots out in the full (unpruned)
sequence ``text[:a_0], image 0, text[a_0:a_1], image 1, ...`` (:func:`text_columns`, :func:`expand`).
It imports nothing from the package, so both the engine and ``autoselect_fast.models`` can use it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["image_runs", "strip_runs", "text_columns", "expand"]


def image_runs(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of every maximal run of ``image_token_id`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    for j, t in enumerate(ids):
        if t != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def strip_runs(ids: Sequence[int], runs: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``(text, insert_at)``: ``ids`` without the runs, and per run the count of text tokens before it."""
    text: list[int] = []
    insert_at, done = [], 0
    for start, length in runs:
        text.extend(ids[done:start])
        insert_at.append(len(text))
        done = start + length
    text.extend(ids[done:])
    return text, insert_at


def text_columns(text_len: int, insert_at: Sequence[int], spans: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Columns of the text tokens and first column of each image in the sequence
    ``text[:a_0], image 0 (spans[0] columns), text[a_0:a_1], image 1, ...``."""
    shift = torch.zeros(text_len + 1, dtype=torch.int64)
    starts, before = [], 0
    for a, span in zip(insert_at, spans):
        shift[a] += span
        starts.append(a + before)
        before += span
    return torch.arange(text_len) + shift.cumsum(0)[:text_len], starts


def expand(text: Sequence[int] | Tensor, insert_at: Sequence[int], spans: Sequence[int], fill: int) -> Tensor:
    """The full sequence (int64): ``text`` with ``spans[i]`` copies of ``fill`` at ``insert_at[i]``."""
    text = torch.as_tensor(text, dtype=torch.int64)
    columns, _ = text_columns(text.numel(), insert_at, spans)
    out = torch.full((text.numel() + sum(spans),), fill, dtype=torch.int64)
    out[columns] = text
    return out
