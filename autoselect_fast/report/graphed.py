"""The ``transformers + CUDA graph`` contender's machinery: the unmodified model with its vision tower and
its language model each replayed from one CUDA graph, the best a user gets without pruning.

This module owns the static buffers, the two captured steps and how one batch goes through them
(:class:`GraphedModel`); :func:`autoselect_fast.report.contenders.graphed_contender` times it. Families:
LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL (:data:`FAMILIES`).

Inputs are the unmodified model's own (:func:`.model_inputs.model_inputs`, built before the timer as for
the ``transformers`` baseline): every image token, the left-padded batch, its attention mask and, for
LLaVA, its positions from the mask. One timed run, in the report's stages:

* ``vision`` — host preparation of the tower's input, as the model does it inside its forward: LLaVA-NeXT
  takes each image's real tiles out of the padded pixel batch (``get_image_features``); Qwen2.5-VL derives
  its tower's metadata from ``image_grid_thw`` (rotary positions, window permutation, window and frame
  ``cu_seqlens``) with transformers' own ``vision_utils`` helpers (:func:`qwen_vision_metadata`). Then the
  copy into the static inputs and the **vision graph**: for the LLaVA family the vision tower over every
  tile of the batch, the feature layer(s) (CLS dropped under the ``"default"`` strategy) and
  ``multi_modal_projector``; for Qwen2.5-VL the whole ``visual`` forward (patch embedding, windowed and
  full-attention blocks, merger) given that metadata.
* ``pack`` — eager: the token embeddings, LLaVA-NeXT's ``pack_image_features`` (unpadding, newline
  tokens), the placeholder merge (the model's ``get_placeholder_mask`` and ``masked_scatter``) and
  Qwen2.5-VL's M-RoPE positions (the model's ``get_rope_index``).
* ``prefill`` — the merged ``inputs_embeds``, the mask and the positions copied into the static inputs,
  then the **LLM graph**: the language model over the full sequence (its own causal/padding mask built
  from the 2-D mask, rotary embeddings, every layer, the final norm) and ``lm_head`` on the last column
  (left padding: every request's last token), as ``logits_to_keep=1``; then the logits are copied out.

Not timed: building the inputs (the processor's work) and the capture (two eager warm-up calls and the
capture of each graph, once, when the contender is built). A graph replays the shapes it was captured
with, so each contender (one fixed batch) captures its own. Under SDPA, Qwen2.5-VL's tower splits its
windows by sizes it reads on the host (``cu_seqlens.tolist()``): those ``cu_seqlens`` stay on the host
and the split is fixed in the graph (the same batch every repeat); with flash attention they are device
buffers.

The captured steps are plain functions over the static buffers (:meth:`GraphedModel.vision_step`,
:meth:`GraphedModel.lm_step`); without :meth:`GraphedModel.capture` :meth:`GraphedModel.logits` calls
them eagerly, which is how the CPU tests check them against the unmodified model.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..engine.runner import capture_graph
from ..ragged import copy_into

GRAPHED = "transformers + CUDA graph"
GRAPHED_DESCRIPTION = (f"{GRAPHED}: the same unmodified model and inputs, its vision tower (LLaVA: with the "
                       "projector) and its language model + lm_head each replayed from one CUDA graph; the host "
                       "preparation its forward does (tile selection, tower metadata, embeddings, placeholder merge, "
                       "M-RoPE positions) runs eagerly inside the TTFT; CUDA only")
GRAPHS_NEED_CUDA = "CUDA graphs need a CUDA device; this run is on {device}"

# Adapter class name -> family.
FAMILIES = {"LlavaAdapter": "llava", "LlavaNextAdapter": "llava_next", "Qwen2_5_VLAdapter": "qwen2_5_vl"}


def qwen_vision_metadata(tower, grid_thw: Tensor) -> dict:
    """What Qwen2.5-VL's tower derives from ``grid_thw`` at the start of its forward, computed on the host
    by transformers' own helpers, keyed as the tower's forward accepts them precomputed: ``position_ids``,
    ``cu_seqlens``, ``window_index``, ``cu_window_seqlens`` and, with flash attention, both ``max_*seqlen``."""
    from transformers.utils.generic import get_max_seqlen, is_flash_attention_requested
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    grid = grid_thw.cpu()
    merge = tower.spatial_merge_size
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid, tower.config)
    window_index, cu_window_seqlens = get_vision_window_index(grid, spatial_merge_size=merge, window_size=tower.window_size,
                                                              patch_size=tower.patch_size)
    meta = {"position_ids": get_vision_position_ids(grid, merge), "cu_seqlens": cu_seqlens, "window_index": window_index,
            "cu_window_seqlens": cu_window_seqlens}
    if is_flash_attention_requested(tower.config):
        meta.update(max_seqlen=max_seqlen, max_window_seqlen=get_max_seqlen(cu_window_seqlens, tower.config))
    return meta


def _fill(static: dict, fresh: dict) -> None:
    """Copy ``fresh`` into the static buffers; a non-tensor value is fixed in the graph and must not change."""
    for key, value in fresh.items():
        if isinstance(value, Tensor):
            copy_into(static[key], value)
        elif value != static[key]:
            raise ValueError(f"{key} = {value!r}, but the graph was captured with {static[key]!r}")


class GraphedModel:
    """The unmodified model's prefill of one batch as two steps over static buffers (see the module docstring).

    Args:
        model: the ``...ForConditionalGeneration`` model.
        adapter: its :class:`~autoselect_fast.models.VLMAdapter`.
        inputs: the unmodified model's inputs of the batch (:func:`.model_inputs.model_inputs`).

    Building runs both steps once eagerly (to size the static buffers); :meth:`capture` then captures them.
    """

    def __init__(self, model, adapter, inputs: dict):
        family = type(adapter).__name__
        if family not in FAMILIES:
            raise NotImplementedError(f"no {GRAPHED} contender for {family}; add it to autoselect_fast.report.graphed.FAMILIES")
        if "pixel_values" not in inputs:
            raise ValueError(f"the {GRAPHED} contender needs a batch with images")
        self.model, self.adapter, self.inputs, self.family = model, adapter, inputs, FAMILIES[family]
        self.device = adapter.device
        self._graphs: Optional[dict] = None  # step name -> (graph, static output), once captured
        on_device = {"pixel_values", "grid_thw", "position_ids", "window_index"}
        if self.family == "qwen2_5_vl":
            from transformers.utils.generic import is_flash_attention_requested

            if is_flash_attention_requested(adapter.tower.config):
                on_device |= {"cu_seqlens", "cu_window_seqlens"}
        with torch.inference_mode():
            vision = self.vision_inputs()
            self.vision_static = {k: v.to(self.device).clone() if k in on_device else v.clone() if isinstance(v, Tensor) else v
                                  for k, v in vision.items()}
            self.lm_static = {k: v.clone() for k, v in self.lm_inputs(self.vision_step()).items()}

    # -- host preparation and the eager merge (timed, outside the graphs) --------------------------------
    def _tiles(self) -> list[int]:
        """LLaVA-NeXT: each image's real tile count, from its original size (as ``get_image_features``)."""
        return [self.adapter.num_tiles(tuple(size)) for size in self.inputs["image_sizes"].tolist()]

    def vision_inputs(self) -> dict:
        """What the vision step reads, prepared on the host as the model prepares it inside its forward."""
        x = self.inputs
        if self.family == "llava_next":
            return {"pixel_values": torch.cat([pv[:t] for pv, t in zip(x["pixel_values"], self._tiles())])}
        if self.family == "qwen2_5_vl":
            return {"pixel_values": x["pixel_values"], "grid_thw": x["image_grid_thw"],
                    **qwen_vision_metadata(self.adapter.tower, x["image_grid_thw"])}
        return {"pixel_values": x["pixel_values"]}

    def lm_inputs(self, features: Tensor) -> dict:
        """The language model's ``inputs_embeds`` (image features merged into the token embeddings by the
        model's own placeholder rule), ``attention_mask`` and ``position_ids`` for ``features``, the vision step's output."""
        x, inner = self.inputs, self.adapter.inner
        embeds = self.model.get_input_embeddings()(x["input_ids"])
        if self.family == "llava_next":
            packed, _ = inner.pack_image_features(list(torch.split(features, self._tiles())), x["image_sizes"],
                                                  self.adapter.config.vision_feature_select_strategy, image_newline=inner.image_newline)
            features = torch.cat(packed)
        features = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        mask = inner.get_placeholder_mask(x["input_ids"], inputs_embeds=embeds, image_features=features)
        if self.family == "qwen2_5_vl":
            mask = mask[0]  # (image mask, video mask)
            positions = inner.get_rope_index(x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"],
                                             attention_mask=x["attention_mask"])[0]
        else:
            positions = x["position_ids"]
        return {"inputs_embeds": embeds.masked_scatter(mask, features), "attention_mask": x["attention_mask"], "position_ids": positions}

    # -- the captured steps: plain functions of the static buffers ----------------------------------------
    def vision_step(self) -> Tensor:
        """Image features of every image of the batch from :attr:`vision_static` (the vision graph's body)."""
        s = self.vision_static
        if self.family == "qwen2_5_vl":
            meta = {k: v for k, v in s.items() if k not in ("pixel_values", "grid_thw")}
            return self.adapter.tower(s["pixel_values"], grid_thw=s["grid_thw"], **meta).pooler_output
        return self.adapter.project(self.adapter.tower_features(s["pixel_values"]))

    def lm_step(self) -> Tensor:
        """``(B, vocab)`` last-token logits from :attr:`lm_static` (the LLM graph's body)."""
        hidden = self.adapter.language_model(**self.lm_static, use_cache=False).last_hidden_state
        return self.adapter.lm_head(hidden[:, -1])

    # -- one prefill ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture both steps (CUDA): each graph after two eager warm-up calls, each with its own memory pool."""
        self._graphs = {name: capture_graph(step, self.device) for name, step in (("vision", self.vision_step), ("lm", self.lm_step))}

    @property
    def captured(self) -> bool:
        return self._graphs is not None

    def _call(self, name: str, step) -> Tensor:
        if self._graphs is None:
            return step()
        graph, output = self._graphs[name]
        graph.replay()
        return output

    def encode(self) -> Tensor:
        """Vision: host preparation, copy into the static inputs, the vision graph (its static output)."""
        _fill(self.vision_static, self.vision_inputs())
        return self._call("vision", self.vision_step)

    def prefill(self, lm_inputs: dict) -> Tensor:
        """Copy ``lm_inputs`` into the static inputs, run the LLM graph, copy the logits out."""
        _fill(self.lm_static, lm_inputs)
        logits = self._call("lm", self.lm_step)
        return logits.clone() if self.captured else logits

    @torch.inference_mode()
    def logits(self) -> Tensor:
        """``(B, vocab)`` first-token logits of the batch: :meth:`encode`, :meth:`lm_inputs`, :meth:`prefill`."""
        return self.prefill(self.lm_inputs(self.encode()))
