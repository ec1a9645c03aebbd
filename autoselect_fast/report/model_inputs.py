"""The unmodified model's inputs for the transformers baseline, per model family.

Each builder turns the engine's :class:`~autoselect_fast.engine.PreparedBatch` of the report's requests
into what the model's own processor hands ``generate`` for its prefill: every image placeholder
expanded to the image's slots (several images per request included), left padding, the attention
mask, and the family's pixel inputs. Extending: a model family adds its builder to
:data:`MODEL_INPUTS`, keyed by adapter class name.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..engine import PreparedBatch
from ..placeholders import expand


def expanded_sequences(batch: PreparedBatch, image_token_id: int) -> list[list[int]]:
    """Each request's token ids with every image placeholder expanded to the image's slots, as the
    model's processor writes them (the engine's placeholder rule, :func:`autoselect_fast.placeholders.expand`)."""
    sequences = []
    for r, (s, e) in enumerate(zip(batch.text_cu_seqlens[:-1].tolist(), batch.text_cu_seqlens[1:].tolist())):
        images = batch.images_of(r)
        insert_at = [int(batch.insert_at[i]) for i in images]
        spans = [batch.layouts[i].num_slots for i in images]
        sequences.append(expand(batch.text_ids[s:e], insert_at, spans, image_token_id).tolist())
    return sequences


def _left_padded(adapter, batch: PreparedBatch) -> tuple[Tensor, Tensor]:
    """``(B, L)`` input ids of the expanded sequences, padded on the left as ``generate`` wants, and the mask."""
    sequences = expanded_sequences(batch, adapter.image_token_id)
    longest = max(len(seq) for seq in sequences)
    pad = adapter.language_model.config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(seq)) + seq for seq in sequences])
    mask = torch.tensor([[0] * (longest - len(seq)) + [1] * len(seq) for seq in sequences])
    return input_ids, mask


def _on_device(adapter, inputs: dict) -> dict:
    """Every input on the model's device, pixel values in the vision tower's dtype."""
    device, dtype = adapter.device, adapter.vision_dtype
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def llava_model_inputs(adapter, batch: PreparedBatch) -> dict:
    """LLaVA / LLaVA-NeXT: expanded image tokens, left padding, positions from the mask, every image's
    pixel values in sequence order (NeXT: tiles padded to the most tiles, ``image_sizes``)."""
    input_ids, mask = _left_padded(adapter, batch)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if batch.num_images and all(size is None for size in batch.image_sizes):
        inputs["pixel_values"] = torch.stack(batch.pixel_values)
    elif batch.num_images:
        tiles = max(pv.shape[0] for pv in batch.pixel_values)
        inputs["pixel_values"] = torch.stack([torch.cat([pv, pv.new_zeros(tiles - pv.shape[0], *pv.shape[1:])]) for pv in batch.pixel_values])
        inputs["image_sizes"] = torch.tensor([list(size) for size in batch.image_sizes])
    return _on_device(adapter, inputs)


def qwen2_5_vl_model_inputs(adapter, batch: PreparedBatch) -> dict:
    """Qwen2.5-VL, as ``Qwen2_5_VLProcessor`` (left padding) writes them: expanded ``<|image_pad|>``
    runs, ``attention_mask``, ``mm_token_type_ids`` (1 on image tokens: the model's own
    ``get_rope_index`` needs it), every image's patches concatenated and ``image_grid_thw``. No
    ``position_ids``: the model computes its M-RoPE positions itself, as in ``generate``."""
    input_ids, mask = _left_padded(adapter, batch)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "mm_token_type_ids": ((input_ids == adapter.image_token_id) & (mask == 1)).to(torch.int32),
    }
    if batch.num_images:
        inputs["pixel_values"] = torch.cat(batch.pixel_values)
        inputs["image_grid_thw"] = torch.tensor([list(size) for size in batch.image_sizes], dtype=torch.int64)
    return _on_device(adapter, inputs)


# The unmodified model's inputs, per model family (adapter class name).
MODEL_INPUTS: dict[str, Callable[[object, PreparedBatch], dict]] = {
    "LlavaAdapter": llava_model_inputs,
    "LlavaNextAdapter": llava_model_inputs,
    "Qwen2_5_VLAdapter": qwen2_5_vl_model_inputs,
}


def model_inputs(adapter, batch: PreparedBatch) -> dict:
    """The unmodified model's prefill inputs for ``batch`` (see :data:`MODEL_INPUTS`)."""
    family = type(adapter).__name__
    if family not in MODEL_INPUTS:
        raise NotImplementedError(f"no unmodified-model inputs for {family}; add a builder to autoselect_fast.report.model_inputs.MODEL_INPUTS")
    return MODEL_INPUTS[family](adapter, batch)
