"""``AutoSelectQwen2_5_VL``: vLLM's Qwen2.5-VL with AutoSelect pruning of every image's visual tokens.

How a request goes through vLLM (0.32) with this class:

1. **Processor** (frontend process): vLLM's Qwen2.5-VL processor, except that each image's prompt
   placeholder expands to K_i tokens instead of N_i (:meth:`AutoSelectQwen2_5_VLProcessor._get_prompt_updates`).
   K_i = ``budget.image_budget(N_i, keep, keep_ratio, clip=True)``, the engine's rule; N_i follows
   from the image grid alone, so it is known before any encoder runs. The scheduler, the KV cache and
   the encoder cache therefore only ever see K_i tokens per image.
2. **Positions** (worker, when the request is added): vLLM asks the model for the request's M-RoPE
   positions (:meth:`get_mrope_input_positions`) before the encoder has run, with the image pixels at
   hand. The selection is decided here: vision tower up to the merger, Scorer, hard top-K
   (``ops.select``), the kept groups through the merger. The positions are vLLM's own positions of the
   *unpruned* sequence, taken at the kept columns (``original``, as ``AutoSelectEngine`` does), or
   0..L-1 on all three rows (``compact``).
   An image whose placeholders vLLM's prefix cache already covers comes without its pixels (vLLM
   strips them): its selection is then looked up by vLLM's item identifier.
3. **Embeddings** (worker, encoder step): :meth:`embed_multimodal` returns the K_i embeddings decided in
   step 2. They are found again by a fingerprint of the image's pixels (vLLM passes no request or item
   id to the encoder call); if they were evicted or never computed (a request re-encoded after
   preemption), the tower runs again and the *remembered* kept indices are gathered, so positions and
   embeddings always describe the same tokens.

An image whose budget keeps every token (K_i = N_i) skips the selection: its embeddings come from
vLLM's batched tower with the merger, and its positions are vLLM's own (in ``original`` mode).

Why positions are decided in step 2 and not through vLLM's ``SupportsMultiModalPruning`` protocol
(``recompute_mrope_positions``, after the encoder): vLLM 0.32 calls that hook only when video pruning
is switched on (``video_pruning_rate > 0``), and its CPU model runner never calls it. Step 2 needs no
change to vLLM and gives the exact ``original`` positions on every backend. Its cost: the vision tower
runs when the request is added rather than in the encoder batch, one request at a time.

What is reused from ``autoselect_fast``: the Scorer (``modules.Scorer``), the selection kernel
(``ops.select``), the budget rule (``budget.image_budget``) and the raster order of the pre-merger
groups (vLLM's tower puts its merger output back in raster order with its ``reverse_indices``; the
merger is swapped for a plain ``view`` of each group, so the tower returns the pre-merger groups in
raster order, the Scorer's input in the engine too). What is vLLM's: the tower, the merger, the
positions of the unpruned sequence, the processor.

Not supported, refused with a message: videos (by vLLM's frontend: this model declares images only),
image embeddings given instead of pixels; at load: vLLM's video pruning (EVS), the encoder CUDA graph
(``cudagraph_mm_encoder``), data-parallel vision encoding (``mm_encoder_tp_mode="data"``), pipeline
parallelism, LoRA on the tower (``enable_tower_connector_lora``), disaggregated serving
(``kv_transfer_config``, ``ec_transfer_config``), and a checkpoint that is not Qwen2.5-VL.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import vllm
from torch import Tensor, nn

from . import check_vllm_version

check_vllm_version(vllm.__version__)  # before importing the private classes this module subclasses

from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.processing import PromptReplacement  # noqa: E402

from .. import ops  # noqa: E402
from ..caching import LRUCache, image_fingerprint  # noqa: E402
from ..ragged import cu_seqlens_from_lengths  # noqa: E402
from .settings import MESSAGE_PREFIX, PluginSettings, check_vllm_config  # noqa: E402

_KEPT_CACHE_SIZE = 65536  # remembered selections (int32 indices, 4·K_i bytes each), least recently used dropped
_EMBED_CACHE_SIZE = 64  # embeddings computed at request add and not yet taken by the encoder step


def _fail(message: str) -> ValueError:
    """An error while serving (the settings were checked before the engine started)."""
    return ValueError(f"{MESSAGE_PREFIX}{message}")


class AutoSelectQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Images only: vLLM then refuses a video in the frontend, with a message, before it reaches the
    model (an error raised in the worker would stop the whole engine)."""

    def get_supported_mm_limits(self):
        return {"image": None}


class AutoSelectQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with K_i instead of N_i placeholders per image."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        settings = PluginSettings.from_config(self.info.get_hf_config())
        updates = []
        for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            if update.modality == "image":
                update = PromptReplacement(modality="image", target=update.target, replacement=_pruned_replacement(update.replacement, settings))
            updates.append(update)
        return updates


def _pruned_replacement(full_replacement, settings: PluginSettings):
    def replacement(item_idx: int):
        tokens = full_replacement(item_idx)  # vLLM's N_i placeholder tokens of this image
        return tokens[: settings.budget(len(tokens))]

    return replacement


def _first_index(indexed_keys) -> dict:
    """Each distinct key (a picture's fingerprint) of ``(index, key)`` pairs, with its first index."""
    first: dict = {}
    for i, key in indexed_keys:
        first.setdefault(key, i)
    return first


class _GroupView(nn.Module):
    """Stands in for the merger while the tower runs: each spatial-merge group's patches, concatenated."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden.reshape(-1, self.width)


def pixels_fingerprint(pixel_values: Tensor, grid: Sequence[int], dtype: torch.dtype) -> str:
    """Identifies an image's pixels across the positions and encoder steps (after the cast to the
    tower's dtype, the cast both steps' tensors go through)."""
    return image_fingerprint(pixel_values, meta=tuple(int(v) for v in grid), dtype=dtype)


@MULTIMODAL_REGISTRY.register_processor(
    AutoSelectQwen2_5_VLProcessor, info=AutoSelectQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class AutoSelectQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Registered as ``AutoSelectQwen2_5_VL`` by :func:`autoselect_fast.vllm_plugin.register`."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        # The checks vLLM already ran through settings.ConfigCheck when it built its configuration, again
        # here (they are cheap, and the Scorer is needed anyway): before vLLM builds or loads the model.
        settings, scorer = check_vllm_config(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Not a submodule: vLLM's weight loader must neither expect nor load the Scorer's weights from
        # the model checkpoint. Moved to the tower's device at the first image; it keeps its own dtype
        # (its checkpoint's), and the features are cast to it.
        self.__dict__["autoselect_scorer"] = scorer.eval().requires_grad_(False)
        self.autoselect = settings
        vision = vllm_config.model_config.hf_config.vision_config
        self._group_width = vision.spatial_merge_size**2 * vision.hidden_size  # the Scorer's input: one merge group
        self._kept: LRUCache[Tensor] = LRUCache(_KEPT_CACHE_SIZE)  # fingerprint -> kept raster indices (CPU)
        self._kept_by_identifier: LRUCache[Tensor] = LRUCache(_KEPT_CACHE_SIZE)  # vLLM's item identifier -> the same
        # What happened to the images so far (read it with llm.collective_rpc("autoselect_counts"), one dict per worker).
        # selected_at_add: selections made when a request was added (the normal way); selected_at_encoder:
        # images the encoder step met first (vLLM's warm-up or memory profiling with dummy images, or a forgotten
        # fingerprint); without_pixels: images vLLM sent without pixels; reencoded: known selections
        # gathered again from a fresh tower pass.
        self.autoselect_counts = {"selected_at_add": 0, "selected_at_encoder": 0, "without_pixels": 0, "reencoded": 0}
        self._embeds: LRUCache[Tensor] = LRUCache(_EMBED_CACHE_SIZE)  # fingerprint -> (K_i, H) embeddings

    # -- the selection ---------------------------------------------------------------------------
    def _tower_dtype(self) -> torch.dtype:
        return self.visual.dtype

    def _num_groups(self, grid: Sequence[int]) -> int:
        t, h, w = grid
        return t * h * w // self.visual.spatial_merge_size**2

    def _keeps_all(self, grid: Sequence[int]) -> bool:
        n = self._num_groups(grid)
        return self.autoselect.budget(n) == n

    def _pre_merger_groups(self, pixel_values: Tensor, grids: list[list[int]]) -> list[Tensor]:
        """The tower up to its merger, per image ``(N_i, merge²·C)`` in raster order of the groups."""
        merger = self.visual.merger
        self.visual.merger = _GroupView(self._group_width)
        try:
            groups = self.visual(pixel_values, grid_thw=grids)
        finally:
            self.visual.merger = merger
        return list(groups.split([self._num_groups(g) for g in grids]))

    def _merge(self, groups: Tensor) -> Tensor:
        """vLLM's merger on ``(K, merge²·C)`` kept groups (it works group by group)."""
        return self.visual.merger(groups.reshape(-1, 1, self.config.vision_config.hidden_size))

    def _select(self, groups: list[Tensor]) -> list[Tensor]:
        """Kept raster indices per image: Scorer + hard top-K in one ``ops.select`` call (only images that
        drop tokens come here; the others take vLLM's own path)."""
        budgets = [self.autoselect.budget(g.shape[0]) for g in groups]
        scorer = self.__dict__["autoselect_scorer"]
        device = groups[0].device
        if next(scorer.parameters()).device != device:
            scorer.to(device)
        dtype = next(scorer.parameters()).dtype
        lengths = [g.shape[0] for g in groups]
        flat = torch.cat(groups).to(dtype)
        host_cu = cu_seqlens_from_lengths(lengths)  # built on the host: the offsets are never read back
        cu = host_cu.to(device)
        scores = scorer(flat, cu).float()
        selection = ops.select(scores, None, budgets, cu, max_seqlen=max(lengths), validate=False)
        per_image = selection.indices.cpu().split(budgets)  # the positions need them on the host anyway
        return [(idx - start).to(torch.int32) for idx, start in zip(per_image, host_cu[:-1].tolist())]

    @torch.inference_mode()
    def _prepare_images(self, pixels: list[Tensor], grids: list[list[int]], keys: list[str], where: str) -> None:
        """Select and embed the images not seen before (one tower pass for all of them; a picture that
        comes twice, once)."""
        new = [i for key, i in _first_index(enumerate(keys)).items() if self._kept.get(key) is None]
        if not new:
            return
        self.autoselect_counts[f"selected_at_{where}"] += len(new)
        device, dtype = self.visual.device, self._tower_dtype()
        batch = torch.cat([pixels[i] for i in new]).to(device=device, dtype=dtype)
        groups = self._pre_merger_groups(batch, [grids[i] for i in new])
        for i, g, kept in zip(new, groups, self._select(groups)):
            self._kept.put(keys[i], kept)
            self._embeds.put(keys[i], self._merge(g[kept.to(device=g.device, dtype=torch.int64)]))

    # -- positions (request add) -----------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[Tensor, int]:
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for f in features:
            if f.modality != "image":
                raise _fail(f"{f.modality} inputs are not supported (only images are pruned)")
        if not features:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        dtype = self._tower_dtype()
        grids = [f.data["image_grid_thw"].data.tolist() for f in features]
        # Images that keep every token need no selection: vLLM's own path, batched in the encoder step.
        pruned = [i for i, g in enumerate(grids) if not self._keeps_all(g)]
        # vLLM strips the pixels of an image whose placeholders its prefix cache already covers
        # (strip_covered_mm_data: a later turn of the same chat, say): its selection is then found by
        # vLLM's item identifier.
        with_pixels = [i for i in pruned if "pixel_values" in features[i].data]
        pixels = [features[i].data["pixel_values"].data for i in with_pixels]
        keys = [pixels_fingerprint(p, grids[i], dtype) for p, i in zip(pixels, with_pixels)]
        self._prepare_images(pixels, [grids[i] for i in with_pixels], keys, where="add")
        for i, key in zip(with_pixels, keys):
            self._kept_by_identifier.put(features[i].identifier, self._kept.get(key))
        self.autoselect_counts["without_pixels"] += len(pruned) - len(with_pixels)
        if self.autoselect.position_mode == "compact":  # needs no selection: 0..L-1 on every row
            length = len(input_tokens)
            return torch.arange(length).view(1, -1).expand(3, -1).clone(), 0
        kept = [torch.arange(self._num_groups(g)) for g in grids]
        for i in pruned:
            remembered = self._kept_by_identifier.get(features[i].identifier)
            if remembered is None:  # only after 65,536 other images since this one was last used
                raise _fail(f"vLLM gave image {features[i].identifier!r} without its pixels, and its selection is no longer remembered")
            kept[i] = remembered
        return self._original_positions(input_tokens, features, kept)

    def _original_positions(self, input_tokens: list[int], features: list, kept: list[Tensor]) -> tuple[Tensor, int]:
        """vLLM's own positions of the unpruned sequence, at the columns the pruned sequence keeps."""
        full_tokens: list[int] = []
        full_features, columns = [], []
        cursor, shift = 0, 0  # cursor: next pruned column to copy; shift: full column - pruned column
        for f, kept_i in zip(features, kept):
            offset, k = f.mm_position.offset, f.mm_position.length
            n = self._num_groups(f.data["image_grid_thw"].data.tolist())
            if k != kept_i.numel():
                raise _fail(f"an image has {k} placeholders but its selection keeps {kept_i.numel()} tokens")
            columns.extend(range(cursor + shift, offset + shift))  # text before the image
            full_tokens.extend(input_tokens[cursor:offset])
            full_features.append(dataclasses.replace(f, mm_position=dataclasses.replace(f.mm_position, offset=offset + shift, length=n)))
            columns.extend((offset + shift + kept_i.to(torch.int64)).tolist())
            full_tokens.extend([input_tokens[offset]] * n)
            cursor, shift = offset + k, shift + n - k
        columns.extend(range(cursor + shift, len(input_tokens) + shift))
        full_tokens.extend(input_tokens[cursor:])
        full, _ = super().get_mrope_input_positions(full_tokens, full_features)
        positions = full[:, torch.tensor(columns, dtype=torch.int64)]
        return positions, int(positions.max()) + 1 - len(input_tokens)

    # -- embeddings (encoder step) ---------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if "video" in inputs:
            raise _fail("video inputs are not supported (only images are pruned)")
        image_input = inputs.get("image")
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise _fail("images must come as pixels (the Scorer reads the vision tower's features), not as precomputed embeddings")
        return self._image_embeddings(image_input["pixel_values"], image_input["image_grid_thw"].tolist())

    @torch.inference_mode()
    def _image_embeddings(self, pixel_values: Tensor, grids: list[list[int]]) -> tuple[Tensor, ...]:
        dtype = self._tower_dtype()
        pixels = list(pixel_values.split([t * h * w for t, h, w in grids]))
        out: list[Optional[Tensor]] = [None] * len(grids)
        whole = [i for i, g in enumerate(grids) if self._keeps_all(g)]
        if whole:  # every token kept: the tower with its merger, as vLLM's own Qwen2.5-VL does
            batch = torch.cat([pixels[i] for i in whole]).to(device=self.visual.device, dtype=dtype)
            merged = self.visual(batch, grid_thw=[grids[i] for i in whole])
            for i, e in zip(whole, merged.split([self._num_groups(grids[i]) for i in whole])):
                out[i] = e
        keys = {i: pixels_fingerprint(pixels[i], grids[i], dtype) for i in range(len(grids)) if i not in whole}
        # Each picture once, also when the batch holds it twice (a repeated picture, vLLM's dummy images).
        first = _first_index(keys.items())
        embeds = {key: self._embeds.pop(key, None) for key in first}
        missing = [i for key, i in first.items() if embeds[key] is None]
        if missing:  # images whose positions were not computed here first (vLLM's warm-up and profiling): select them now
            self._prepare_images([pixels[i] for i in missing], [grids[i] for i in missing], [keys[i] for i in missing], where="encoder")
            for i in missing:
                embeds[keys[i]] = self._embeds.pop(keys[i], None)
        again = [i for key, i in first.items() if embeds[key] is None]
        if again:
            # Re-encoding a known image (after preemption, say): the remembered selection is gathered,
            # so the embeddings match the positions the request already has.
            self.autoselect_counts["reencoded"] += len(again)
            batch = torch.cat([pixels[i] for i in again]).to(device=self.visual.device, dtype=dtype)
            groups = self._pre_merger_groups(batch, [grids[i] for i in again])
            for i, g in zip(again, groups):
                embeds[keys[i]] = self._merge(g[self._kept.get(keys[i]).to(device=g.device, dtype=torch.int64)])
        for i, key in keys.items():
            out[i] = embeds[key]
        return tuple(out)
