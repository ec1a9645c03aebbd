"""Qwen2.5-VL's vision tower, run by this project: one varlen attention call per block.

This module owns how the engine executes the tower of a ``Qwen2_5_VLForConditionalGeneration``
(docs/design.md, "Model rules"). transformers' tower loops over attention windows in Python
(``torch.split`` on ``cu_seqlens.tolist()``, one SDPA call per window and block) for every attention
implementation but flash-attn, and rebuilds its window index, rotary tables and ``cu_seqlens`` from
``grid_thw`` on every call. Here:

* **Per-token math is the model's own.** The tower's ``patch_embed``, each block's ``norm1``/``norm2``,
  ``attn.qkv``/``attn.proj`` and ``mlp``, and the modeling file's ``apply_rotary_pos_emb_vision`` run
  unchanged on the model's weights; only the attention dispatch is replaced by
  :func:`autoselect_fast.attention.varlen_attention` (``causal=False``) over all images of the batch:
  ``cu_seqlens`` of the windows for windowed blocks, of whole frames for ``fullatt_block_indexes``.
  The merger is not run here (the adapter merges kept groups only).
* **Metadata depends only on the grid.** :class:`GridMetadata` (window permutation of the merge groups,
  window lengths, rotary positions in window order) is computed on the host once per grid ``(t, h, w)``
  and cached (bounded LRU); a batch's :class:`VisionPlan` concatenates the cached entries with their
  offsets, copies them to the device once and turns the positions into the rotary cos/sin tables there
  with the rotary module's own ``inv_freq`` (transformers' arithmetic, on the model's device: no read of
  the buffer on the host). Plans are cached per (grids, bucket, device).
* **Capture-friendly.** Given a plan, :meth:`QwenVisionTower.forward` reads nothing from the device on
  the host: ``max_seqlen`` values are Python ints of the plan, index tensors live on the device, and
  the SDPA reference backend gets the plan's host copy of the offsets.
* **Patch-budget buckets.** With a :class:`PatchBucket`, the packed patches are padded with zero rows
  up to ``bucket.patches``; the padding rows form their own segments (chunks of at most one window's
  patches, in window and full-attention blocks alike), so they never attend to or from a real patch,
  and both ``cu_seqlens`` are extended with zero-length segments to the bucket's fixed lengths.
  ``max_seqlen`` is then fixed per bucket too (one window's patches; the bucket's patches for full
  attention), so one CUDA graph per bucket can replay any batch that fits it.

Backends (``backend=`` as in :mod:`autoselect_fast.attention`): on CPU the per-segment SDPA reference;
on CUDA flash-attn or ``torch.nn.attention.varlen.varlen_attn`` for fp16/bf16. fp32 on CUDA goes to
the SDPA reference with its fused (memory-efficient) kernels under ``"auto"`` (with a warning), and
is refused with a one-line error for ``"flash_attn"``/``"torch_varlen"``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..attention import resolve_backend, varlen_attention
from ..caching import SharedLRUCache
from ..ragged import to_device
from ..validation import check_tensor, is_int

Grid = tuple[int, int, int]
DEFAULT_GRID_CACHE = 512
DEFAULT_PLAN_CACHE = 32


@dataclass(frozen=True)
class PatchBucket:
    """Fixed shapes of one capture bucket: packed patch rows and the lengths of both ``cu_seqlens``.

    Attributes:
        patches: rows of the packed input (real patches, then zero padding); a multiple of merge².
        window_segments: segments of the windowed blocks' ``cu_seqlens`` (it has this + 1 entries).
        full_segments: segments of the full-attention blocks' ``cu_seqlens`` (frames + padding chunks).
    """

    patches: int
    window_segments: int
    full_segments: int

    def __post_init__(self):
        for name in ("patches", "window_segments", "full_segments"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"PatchBucket.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class GridMetadata:
    """What the tower needs about one image grid ``(t, h, w)``, on the host (window order throughout).

    Attributes:
        grid: ``(t, h, w)`` in patches.
        window_index: ``(G,)`` int64; slot j of the window order holds raster merge group ``window_index[j]``.
        window_lengths: patches of each (non-empty) window, in window order.
        frame_lengths: patches of each frame (``t`` entries of ``h * w``): the full-attention segments.
        positions: ``(P, 2)`` int64 rotary (row, col) of the patches in window order.
    """

    grid: Grid
    window_index: Tensor
    window_lengths: tuple[int, ...]
    frame_lengths: tuple[int, ...]
    positions: Tensor

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def groups(self) -> int:
        return int(self.window_index.numel())


@dataclass(frozen=True)
class VisionPlan:
    """Everything :meth:`QwenVisionTower.forward` needs about one batch of grids, on its device.

    Attributes:
        grids: the images' grids, in batch order.
        patches: rows of the packed input (``real_patches`` plus padding).
        real_patches: patches of the images.
        group_counts: merge groups (LLM visual tokens) per image.
        window_index: ``(patches / merge²,)`` int64 group permutation into window order (padding last).
        raster_index: ``(patches / merge²,)`` int64, its inverse: window order back to raster order.
        cu_window, cu_full: int32 offsets of the windowed / full-attention blocks' segments (device).
        cu_window_host, cu_full_host: the same on the host (the SDPA reference reads them there).
        max_window, max_full: ``max_seqlen`` of each kind of block (fixed per bucket when padded).
        cos, sin: ``(patches, head_dim)`` float32 rotary tables in window order (padding: position 0).
        bucket: the bucket the plan is padded to, ``None`` when unpadded.
    """

    grids: tuple[Grid, ...]
    patches: int
    real_patches: int
    group_counts: tuple[int, ...]
    window_index: Tensor
    raster_index: Tensor
    cu_window: Tensor
    cu_full: Tensor
    cu_window_host: Tensor
    cu_full_host: Tensor
    max_window: int
    max_full: int
    cos: Tensor
    sin: Tensor
    bucket: Optional[PatchBucket] = None

    @property
    def real_groups(self) -> int:
        return sum(self.group_counts)

    def copy_into(self, buffers: "VisionPlan") -> "VisionPlan":
        """This plan with its device tensors copied into ``buffers``' (a plan of the same bucket, e.g. from
        :meth:`QwenVisionTower.plan_buffers`): how a CUDA graph captured on ``buffers`` replays this batch.
        Non-blocking device copies; the returned plan keeps this plan's host fields."""
        if self.bucket is None or buffers.bucket != self.bucket or buffers.cos.device != self.cos.device:
            raise ValueError(f"copy_into needs a plan of the same bucket and device, got bucket {self.bucket} on {self.cos.device} "
                             f"and {buffers.bucket} on {buffers.cos.device}")
        moved = {}
        for name in _PLAN_DEVICE_FIELDS:
            target = getattr(buffers, name)
            target.copy_(getattr(self, name), non_blocking=True)
            moved[name] = target
        return replace(self, **moved)


_PLAN_DEVICE_FIELDS = ("window_index", "raster_index", "cu_window", "cu_full", "cos", "sin")


def check_grid(grid, *, merge: int, name: str = "grid") -> Grid:
    """``(t, h, w)`` as three positive ints with h, w multiples of ``merge``."""
    if isinstance(grid, Tensor):
        grid = grid.tolist()
    if (not isinstance(grid, (list, tuple)) or len(grid) != 3
            or not all(is_int(v) and v > 0 for v in grid)):
        raise ValueError(f"{name} must be an image grid (t, h, w) of three positive ints, got {grid!r}")
    t, h, w = (int(v) for v in grid)
    if h % merge or w % merge:
        raise ValueError(f"{name} {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
    return t, h, w


class QwenVisionTower:
    """The pre-merger vision tower of a Qwen2.5-VL model with one varlen attention call per block.

    Args:
        tower: the model's ``model.model.visual`` (``Qwen2_5_VisionTransformerPretrainedModel``).
        backend: varlen attention backend (:data:`autoselect_fast.attention.ATTENTION_BACKENDS`).
        grid_cache_size / plan_cache_size: entries of the bounded grid and batch-plan caches.
    """

    def __init__(self, tower: nn.Module, *, backend: str = "auto", grid_cache_size: int = DEFAULT_GRID_CACHE,
                 plan_cache_size: int = DEFAULT_PLAN_CACHE):
        for name, value in (("grid_cache_size", grid_cache_size), ("plan_cache_size", plan_cache_size)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.tower = tower
        self.backend = backend
        config = tower.config
        self.merge = int(config.spatial_merge_size)
        self.unit = self.merge**2
        self.patch_size = int(config.patch_size)
        self.hidden = int(config.hidden_size)
        attn = tower.blocks[0].attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = self.hidden // self.num_heads
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        # merge groups per window side, as transformers' get_vision_window_index computes it
        self.window_groups = int(config.window_size) // self.merge // self.patch_size
        if self.window_groups < 1:
            raise ValueError(f"window_size={config.window_size} is smaller than one merge group "
                             f"({self.merge * self.patch_size} px); the tower has no windows")
        self.window_capacity = self.window_groups**2 * self.unit  # patches of a full window
        self.full_blocks = frozenset(int(i) for i in tower.fullatt_block_indexes)
        self._rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        self._grids = SharedLRUCache(grid_cache_size)
        self._plans = SharedLRUCache(plan_cache_size)

    # -- host metadata --------------------------------------------------------------------------
    def grid_metadata(self, grid) -> GridMetadata:
        """The cached :class:`GridMetadata` of ``grid`` (computed on the host the first time)."""
        grid = check_grid(grid, merge=self.merge)
        return self._grids.get_or_build(grid, lambda: _outside_inference_mode(self._build_grid, grid))

    def _build_grid(self, grid: Grid) -> GridMetadata:
        t, h, w = grid
        m, win = self.merge, self.window_groups
        gh, gw = h // m, w // m
        # Window order (transformers' get_vision_window_index for one grid): groups in raster order
        # within a window, windows in raster order, frames in order; windows cut at the grid's edge.
        rows, cols = torch.arange(gh), torch.arange(gw)
        window_of = (rows // win)[:, None] * math.ceil(gw / win) + (cols // win)[None, :]  # (gh, gw)
        window_of = window_of.reshape(-1)
        order = torch.argsort(window_of, stable=True)  # raster groups of frame 0 in window order
        frame_groups = gh * gw
        window_index = (torch.arange(t)[:, None] * frame_groups + order[None, :]).reshape(-1)
        counts = torch.bincount(window_of, minlength=math.ceil(gh / win) * math.ceil(gw / win))
        window_lengths = tuple(int(c) * self.unit for c in counts.tolist() if c > 0) * t
        # Rotary positions of every patch (row, col) in merge-group order, as get_vision_position_ids.
        hpos = torch.arange(h)[:, None].expand(h, w).reshape(gh, m, gw, m).transpose(1, 2).reshape(-1)
        wpos = torch.arange(w)[None, :].expand(h, w).reshape(gh, m, gw, m).transpose(1, 2).reshape(-1)
        positions = torch.stack([hpos, wpos], dim=-1).view(frame_groups, self.unit, 2)[order].reshape(h * w, 2).repeat(t, 1)
        return GridMetadata(grid, window_index, window_lengths, (h * w,) * t, positions)

    # -- batch plans ----------------------------------------------------------------------------
    def plan(self, grids: Sequence, device=None, bucket: Optional[PatchBucket] = None) -> VisionPlan:
        """The cached :class:`VisionPlan` of ``grids`` on ``device`` (default: the tower's), padded to ``bucket``."""
        grids = tuple(check_grid(g, merge=self.merge, name=f"grids[{i}]") for i, g in enumerate(grids))
        if not grids:
            raise ValueError("grids must hold at least one image grid (t, h, w), got none")
        if bucket is not None and not isinstance(bucket, PatchBucket):
            raise TypeError(f"bucket must be a PatchBucket or None, got {type(bucket).__name__}")
        device = torch.device(device) if device is not None else next(self.tower.parameters()).device
        return self._plans.get_or_build((grids, bucket, str(device)), lambda: _outside_inference_mode(self._build_plan, grids, device, bucket))

    def bucket(self, patches: int, frames: int) -> PatchBucket:
        """A bucket of ``patches`` rows (rounded up to a multiple of merge²) that fits every batch of at
        most that many patches in at most ``frames`` frames (images, for still images), and the all-padding
        :meth:`plan_buffers`: windows <= groups + padding chunks <= rows / merge² (every window holds a
        group); full-attention segments <= frames + padding chunks. Pass a :class:`PatchBucket` of your own
        for tighter segment counts (each empty segment is a few idle thread blocks of the kernel)."""
        for name, value in (("patches", patches), ("frames", frames)):
            if not is_int(value) or value < (1 if name == "patches" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'patches' else 0}, got {value!r}")
        rows = -(-patches // self.unit) * self.unit
        return PatchBucket(rows, rows // self.unit, frames + len(self.padding_lengths(rows)))

    def plan_buffers(self, bucket: PatchBucket, device=None) -> VisionPlan:
        """A plan of ``bucket``'s shapes holding padding only (not cached, so its tensors may be overwritten):
        the buffers a CUDA graph is captured on; :meth:`VisionPlan.copy_into` fills them with a real batch."""
        if not isinstance(bucket, PatchBucket):
            raise TypeError(f"bucket must be a PatchBucket, got {type(bucket).__name__}")
        device = torch.device(device) if device is not None else next(self.tower.parameters()).device
        return self._build_plan((), device, bucket)

    def padding_lengths(self, padding: int) -> list[int]:
        """Segments of ``padding`` padding patches: chunks of at most one window's patches."""
        full, rest = divmod(padding, self.window_capacity)
        return [self.window_capacity] * full + ([rest] if rest else [])

    def _build_plan(self, grids: tuple[Grid, ...], device: torch.device, bucket: Optional[PatchBucket]) -> VisionPlan:
        metas = [self.grid_metadata(g) for g in grids]
        real = sum(m.patches for m in metas)
        windows = [n for m in metas for n in m.window_lengths]
        frames = [n for m in metas for n in m.frame_lengths]
        group_offsets = [0]
        for m in metas:
            group_offsets.append(group_offsets[-1] + m.groups)
        pieces = [m.window_index + off for m, off in zip(metas, group_offsets)]
        if bucket is None:
            patches, max_window, max_full = real, max(windows), max(frames)
        else:
            if bucket.patches % self.unit:
                raise ValueError(f"bucket.patches must be a multiple of merge²={self.unit}, got {bucket.patches}")
            if real > bucket.patches:
                raise ValueError(f"the batch has {real} patches, more than bucket.patches={bucket.patches}")
            padding = self.padding_lengths(bucket.patches - real)
            windows, frames = windows + padding, frames + padding
            for name, have, allowed in (("window_segments", len(windows), bucket.window_segments),
                                        ("full_segments", len(frames), bucket.full_segments)):
                if have > allowed:
                    raise ValueError(f"the batch needs {have} {name} (padding chunks included), more than bucket.{name}={allowed}")
            windows += [0] * (bucket.window_segments - len(windows))  # zero-length: fixed cu_seqlens lengths
            frames += [0] * (bucket.full_segments - len(frames))
            pad_groups = (bucket.patches - real) // self.unit
            pieces.append(torch.arange(group_offsets[-1], group_offsets[-1] + pad_groups))
            patches, max_window, max_full = bucket.patches, self.window_capacity, bucket.patches
        window_index = torch.cat(pieces)
        cu_window = _offsets(windows)
        cu_full = _offsets(frames)
        positions = torch.cat([m.positions for m in metas] + [torch.zeros(patches - real, 2, dtype=torch.int64)])
        cos, sin = self._rotary_tables(to_device(positions, device))
        return VisionPlan(
            grids=grids, patches=patches, real_patches=real, group_counts=tuple(m.groups for m in metas),
            window_index=to_device(window_index, device), raster_index=to_device(torch.argsort(window_index), device),
            cu_window=to_device(cu_window, device), cu_full=to_device(cu_full, device),
            cu_window_host=cu_window, cu_full_host=cu_full, max_window=max_window, max_full=max_full,
            cos=cos, sin=sin, bucket=bucket,
        )

    def _rotary_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(P, 2)`` positions on the device -> float32 ``(cos, sin)`` ``(P, head_dim)``: transformers'
        ``Qwen2_5_VLVisionRotaryEmbedding`` arithmetic with its own buffer (padding rows, position 0: cos 1, sin 0)."""
        inv_freq = self.tower.rotary_pos_emb.inv_freq.to(device=positions.device, dtype=torch.float32)
        freqs = positions[..., None].float() * inv_freq  # (P, 2, head_dim / 4)
        half = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        angles = torch.cat([half, half], dim=-1)
        return angles.cos(), angles.sin()

    # -- device ---------------------------------------------------------------------------------
    def forward(self, patches: Tensor, plan: VisionPlan) -> Tensor:
        """``(plan.patches, patch_dim)`` packed patches -> ``(plan.patches, C)`` hidden states in window order.

        The tower's blocks without its merger; no host read of a device value (capture-friendly).
        """
        check_tensor("patches", patches, ndim=2)
        if patches.shape[0] != plan.patches:
            raise ValueError(f"patches must have {plan.patches} rows (the plan's packed patches), got {tuple(patches.shape)}")
        tower = self.tower
        hidden = tower.patch_embed(patches)
        backend = resolve_backend(self.backend, hidden.device, hidden.dtype)
        hidden = hidden.view(-1, self.unit, self.hidden)[plan.window_index].reshape(plan.patches, self.hidden)
        for layer, block in enumerate(tower.blocks):
            if layer in self.full_blocks:
                cu, cu_host, longest = plan.cu_full, plan.cu_full_host, plan.max_full
            else:
                cu, cu_host, longest = plan.cu_window, plan.cu_window_host, plan.max_window
            hidden = self._block(block, hidden, plan, cu_host if backend == "sdpa" else cu, longest, backend)
        return hidden

    __call__ = forward

    def _block(self, block: nn.Module, hidden: Tensor, plan: VisionPlan, cu: Tensor, longest: int, backend: str) -> Tensor:
        """One ``Qwen2_5_VLVisionBlock``: its own norms, linears, rotary and MLP; varlen attention."""
        attn = block.attn
        tokens = hidden.shape[0]
        query, key, value = attn.qkv(block.norm1(hidden)).reshape(tokens, 3, self.num_heads, -1).unbind(1)
        query, key = self._rotate(query, key, plan.cos, plan.sin)
        out = varlen_attention(query, key, value, cu, cu, longest, longest, scale=self.scale, backend=backend, causal=False)
        hidden = hidden + attn.proj(out.reshape(tokens, -1))
        return hidden + block.mlp(block.norm2(hidden))

    def pack(self, pixel_values: Sequence[Tensor], plan: VisionPlan) -> Tensor:
        """The images' patches concatenated (zero rows up to ``plan.patches``) in the tower's dtype and device."""
        weight = self.tower.patch_embed.proj.weight
        rows = sum(int(p.shape[0]) for p in pixel_values)
        if rows != plan.real_patches:
            raise ValueError(f"pixel_values hold {rows} patches but the grids {list(plan.grids)} have {plan.real_patches}")
        parts = [to_device(p, weight.device).to(weight.dtype) for p in pixel_values]
        if plan.patches > rows:
            parts.append(parts[0].new_zeros(plan.patches - rows, parts[0].shape[1]))
        return torch.cat(parts)

    def raster_groups(self, hidden: Tensor, plan: VisionPlan) -> list[Tensor]:
        """Window-order hidden states -> per image ``(G_i, merge²·C)`` merge groups in raster order."""
        groups = hidden.view(-1, self.unit * self.hidden)[plan.raster_index[: plan.real_groups]]
        return list(groups.split(list(plan.group_counts)))

    def encode(self, pixel_values: Sequence[Tensor], grids: Sequence, bucket: Optional[PatchBucket] = None) -> list[Tensor]:
        """Pre-merger features per image, ``(G_i, merge²·C)`` groups in raster order (the adapter's ``encode``)."""
        if len(pixel_values) != len(grids):
            raise ValueError(f"pixel_values and grids must have one entry per image, got {len(pixel_values)} and {len(grids)}")
        plan = self.plan(grids, bucket=bucket)
        return self.raster_groups(self.forward(self.pack(pixel_values, plan), plan), plan)


def _outside_inference_mode(build, *args):
    """A cached entry is built as ordinary tensors: one built inside ``torch.inference_mode`` (the engine's
    stages) could not be used later by a call that records autograd (training's features, a test)."""
    with torch.inference_mode(False):
        return build(*args)


def _offsets(lengths: Sequence[int]) -> Tensor:
    """``[0, l0, l0 + l1, ...]`` int32 on the host."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)
    return out


__all__ = ["GridMetadata", "PatchBucket", "QwenVisionTower", "VisionPlan", "check_grid"]
