"""The inference engine: pruned, packed prefill and generation on LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

This module owns the request flow around a frozen transformers VLM (DESIGN.md sections 1, 3 and 5).
Every model goes through the same stages; what differs per model (image processing, features, token
layout, projector/merger, 1-D or M-RoPE positions) is asked of its adapter in ``autoselect_fast.models``:

1. :meth:`AutoSelectEngine.prepare` (host work, untimed): argument checks, tokenisation, image
   processing, expansion of every image placeholder, the full-sequence (unpruned) positions of every
   request as the unmodified model computes them (``adapter.sequence_positions``).
2. :meth:`AutoSelectEngine.encode_images`: pre-projector features of every image of the batch, tokens
   in sequence order, one vision call (``adapter.encode``).
3. :meth:`AutoSelectEngine.prune`: Scorer (scores cached per image) + hard top-K selection per image.
4. :meth:`AutoSelectEngine.pack`: projector on the kept tokens only, LLaVA-NeXT newlines, text
   embeddings, position ids (``original``: the full-sequence positions gathered at the kept columns;
   ``compact``: renumbered), one varlen batch (``autoselect_fast.packing``).
5. :meth:`AutoSelectEngine.prefill_packed`: the language model over the packed batch with the varlen
   attention backend (``autoselect_fast.attention``); ``lm_head`` only on each request's last token.

:meth:`AutoSelectEngine.prefill` runs 1-5 and reports a timing breakdown; :meth:`AutoSelectEngine.generate`
decodes (greedy or sampling, per-request stop tokens and lengths) from the packed prefill's KV cache,
which holds the kept tokens only. An engine may be called from several threads at once (see
``docs/engine.md``, "Threads").
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import reference
from ._validation import check_choice
from .attention import ATTENTION_BACKENDS, install_dispatch, resolve_backend, varlen_call
from .budget import check_budget_args, image_budget
from .models import ImageLayout, VLMAdapter, get_adapter
from .packing import PackedBatch
from .ragged import cu_seqlens_from_lengths, segment_bounds, to_device
from .reference import POSITION_MODES, Selection
from .timing import Stopwatch

SELECTION_BACKENDS = ("auto", "ops", "reference")
DEFAULT_SCORE_CACHE_SIZE = 1024

Prompt = Union[str, Sequence[int], Tensor]


# --------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageInput:
    """One already processed image for :attr:`Request.images`.

    ``pixel_values`` as the model's image processor returns them for this one image, ``image_size`` what
    the model needs besides (LLaVA-1.5: nothing; LLaVA-NeXT: the original ``(height, width)``;
    Qwen2.5-VL: ``image_grid_thw`` ``(t, h, w)``), ``image_id`` the score-cache key (default: pixel hash).
    """

    pixel_values: Tensor
    image_size: Any = None
    image_id: Optional[Hashable] = None


@dataclass
class Request:
    """One prompt with zero, one or several images, and its generation limits.

    One image: ``image`` (a Pillow image, processed by the engine's image processor) or processed
    ``pixel_values`` of that image plus ``image_sizes`` (see :class:`ImageInput` for what each model
    needs) and an optional ``image_id``. Several images: ``images=[...]``, each a Pillow image or an
    :class:`ImageInput`, in the order of their placeholders. No image: a text-only request.

    ``prompt`` is a list/tensor of token ids or a string (with a tokenizer/processor given to the
    engine). It holds one run of the model's image token per image, in order: one placeholder token
    (the engine expands it) or the already expanded run. ``max_new_tokens`` and ``stop_token_ids``
    override / extend the defaults of :meth:`AutoSelectEngine.generate` for this request; ``seed``
    seeds this request's own sampling generator (its samples then depend on nothing else in the batch).
    """

    prompt: Prompt
    image: Any = None
    pixel_values: Optional[Tensor] = None
    image_sizes: Any = None
    image_id: Optional[Hashable] = None
    images: Optional[Sequence[Any]] = None
    max_new_tokens: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None
    seed: Optional[int] = None
    videos: Any = None


@dataclass
class PreparedBatch:
    """Output of :meth:`AutoSelectEngine.prepare`: everything host-side the later stages need.

    Requests: ``text_ids`` are all requests' text tokens with the image placeholders removed, request
    after request (``text_cu_seqlens``); ``full_positions[r]`` ``(rows, L_r)`` are the positions the
    unmodified model gives request r's full (unpruned) sequence (rows = 1, or 3 for M-RoPE).
    Images (all images of the batch, request after request): image i belongs to request
    ``image_request[i]`` and goes after ``insert_at[i]`` of its request's text tokens.
    ``token_positions`` ``(ΣN,)`` or ``(3, ΣN)`` are the full-sequence positions of every visual token.
    """

    text_ids: Tensor
    text_cu_seqlens: Tensor
    image_request: Tensor
    insert_at: Tensor
    pixel_values: list[Tensor]
    image_sizes: list[Any]
    layouts: list[ImageLayout]
    image_keys: list[Hashable]
    budgets: list[int]
    token_positions: Tensor
    full_positions: list[Tensor]
    max_new_tokens: list[Optional[int]] = field(default_factory=list)
    stop_token_ids: list[frozenset] = field(default_factory=list)
    seeds: list[Optional[int]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.text_cu_seqlens.numel() - 1

    @property
    def num_images(self) -> int:
        return len(self.layouts)

    def images_of(self, request: int) -> list[int]:
        """Indices of request ``request``'s images, in sequence order."""
        return [i for i, r in enumerate(self.image_request.tolist()) if r == request]


@dataclass
class PruneResult:
    """Output of :meth:`AutoSelectEngine.prune`.

    ``scores`` ``(ΣN,)`` per token (``token_cu_seqlens`` per image); ``selection`` is what the
    selection backend returned: flat ``indices`` into the ΣN tokens (ascending per image), the kept
    ``features`` ``(ΣK, d_v)``, their ``position_ids`` (the positions passed in, ``original`` mode)
    and ``cu_seqlens`` of the kept tokens.
    """

    scores: Tensor
    token_cu_seqlens: Tensor
    selection: Selection

    def kept_indices(self) -> list[Tensor]:
        """Per image: indices of the kept tokens in ``[0, N_i)``, ascending (sequence order)."""
        starts = self.token_cu_seqlens[:-1].tolist()
        bounds = self.selection.cu_seqlens.tolist()
        return [self.selection.indices[b:e] - s for s, b, e in zip(starts, bounds[:-1], bounds[1:])]


@dataclass
class PrefillOutput:
    """Result of :meth:`AutoSelectEngine.prefill`.

    Attributes:
        logits: ``(B, vocab)`` logits of the first generated token.
        kept_tokens: per request, visual tokens kept over all its images (ΣK; newlines not counted).
        visual_tokens: per request, visual tokens of its images before pruning (ΣN).
        sequence_lengths: per request, tokens in the pruned LLM sequence (text + kept tokens + kept newlines).
        next_positions: ``(B,)`` position id of the first generated token (largest position + 1, over
            all rows for M-RoPE); decoding uses it on every row and counts up by one.
        kept_indices: per image of the batch (request after request), ascending kept token indices in ``[0, N_i)``.
        image_request: per image of the batch, the request it belongs to.
        timings_ms: ``vision`` (vision tower + feature arrangement), ``prune`` (Scorer + selection),
            ``pack`` (projector on kept tokens, embeddings, positions, packing), ``prefill`` (LLM forward
            + lm_head on the last tokens), ``total``. Measured with CUDA synchronisation on a GPU.
    """

    logits: Tensor
    kept_tokens: list[int]
    visual_tokens: list[int]
    sequence_lengths: list[int]
    next_positions: Tensor
    kept_indices: list[Tensor]
    image_request: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


def build_requests(prompts: Sequence[Prompt], images: Sequence[Any], *, image_sizes=None, image_ids=None) -> list[Request]:
    """Pair prompts with images (Pillow images or pixel tensors); ValueError when the counts differ."""
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    if isinstance(images, Tensor) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list with one image per prompt, got {type(images).__name__}")
    if len(prompts) != len(images):
        raise ValueError(f"images and prompts must pair up one to one: got {len(images)} image(s) and {len(prompts)} prompt(s)")
    for name, extra in (("image_sizes", image_sizes), ("image_ids", image_ids)):
        if extra is not None and len(extra) != len(prompts):
            raise ValueError(f"{name} must have one entry per prompt ({len(prompts)}), got {len(extra)}")
    out = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        is_tensor = isinstance(image, Tensor)
        out.append(Request(
            prompt=prompt,
            image=None if is_tensor else image,
            pixel_values=image if is_tensor else None,
            image_sizes=None if image_sizes is None else image_sizes[i],
            image_id=None if image_ids is None else image_ids[i],
        ))
    return out


# --------------------------------------------------------------------------------------------------
# Backend choices (one place each)
# --------------------------------------------------------------------------------------------------
SelectFn = Callable[..., Selection]


def resolve_selection_backend(name: str, device: torch.device) -> tuple[str, SelectFn]:
    """``(chosen name, select function)``; the function is called as
    ``select(scores, features, budgets: list[int], cu_seqlens, positions=, position_mode=)``.

    Both choices are ``autoselect_fast.ops.select`` with the data checks off (the engine builds its
    own inputs and checks budgets on the host), so with the budgets given as a host list the selection
    makes no device→host synchronisation: ``"ops"`` runs the Triton kernels (backend resolved once
    here), ``"reference"`` runs ``reference.select_tokens`` inside the same custom op. ``"auto"`` picks
    ``"ops"``, except on a CPU without Triton's interpreter, where there are no kernels to run.
    A GPU never falls back: when the kernels cannot run (not importable, interpreted, or wrong on a
    tiny smoke test) ``"auto"`` and ``"ops"`` raise ``RuntimeError``.
    """
    check_choice("selection_backend", name, SELECTION_BACKENDS)
    from . import ops

    if name == "reference":  # through ops too: the same call, traceable as a custom op
        return "reference", functools.partial(ops.select, backend="reference", validate=False)
    try:
        kernel_backend = ops.resolve_backend("auto", device)
    except Exception as exc:  # noqa: BLE001 - reported with the device it failed on
        raise RuntimeError(f"selection_backend={name!r} is not usable on {device}: {exc}") from exc
    if name == "auto" and kernel_backend == "reference":
        return "reference", functools.partial(ops.select, backend="reference", validate=False)
    select = functools.partial(ops.select, backend=kernel_backend, validate=False)
    try:  # smoke test, with the data checks on
        scores = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0, 1.0, -2.0], device=device)
        feats = torch.arange(14.0, device=device).view(7, 2)
        cu = torch.tensor([0, 4, 7], device=device)
        pos = torch.arange(7, device=device) + 10
        got = ops.select(scores, feats, [2, 2], cu, positions=pos, backend=kernel_backend, validate=True)
        want = reference.select_tokens(scores, feats, 2, cu, positions=pos)
        if not (torch.equal(got.indices.cpu(), want.indices.cpu()) and torch.equal(got.position_ids.cpu(), want.position_ids.cpu())
                and torch.equal(got.features.cpu(), want.features.cpu())):
            raise RuntimeError("ops.select disagrees with reference.select_tokens on a smoke test")
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here", said loudly
        raise RuntimeError(f"selection_backend={name!r} is not usable on {device}: {exc}") from exc
    return "ops", select


def resolve_packer(device: torch.device) -> tuple[str, Callable[..., PackedBatch]]:
    """``("extension", packing.pack_varlen)`` when the C++ packer runs on ``device``, else the reference.

    Only a CPU without the built extension gets the plain PyTorch reference. On CUDA the extension
    must be built with its CUDA path and pass a smoke test, else ``RuntimeError``: a GPU run never
    falls back to the slow packer. A built extension that fails its smoke test raises on any device.
    """
    from . import packing

    if not packing.extension_available():
        if device.type == "cuda":
            try:
                packing._extension()
            except ImportError as exc:
                raise RuntimeError(f"the C++ packer cannot run on {device}: {exc}") from exc
        return "reference", packing.pack_varlen_reference
    try:  # smoke test: the extension may be built without the CUDA path
        one = torch.ones(1, 1, device=device)
        cu = torch.tensor([0, 1])
        pos = torch.zeros(1, dtype=torch.int64, device=device)
        got = packing.pack_varlen(one, cu, pos, 2 * one, cu, pos + 1, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        if got.embeds.flatten().tolist() != [2.0, 1.0] or got.position_ids.tolist() != [1, 0]:
            raise RuntimeError(f"pack_varlen gave embeds {got.embeds.flatten().tolist()} and positions {got.position_ids.tolist()}, expected [2.0, 1.0] and [1, 0]")
    except (RuntimeError, ImportError) as exc:
        raise RuntimeError(f"the C++ packer cannot run on {device}: {exc}") from exc
    return "extension", packing.pack_varlen


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
_INTERPRETER_LOCK = threading.Lock()


def _one_at_a_time(fn: Callable) -> Callable:
    """Serialise ``fn`` across threads: Triton's CPU interpreter (TRITON_INTERPRET=1, the test setting)
    keeps per-launch global state and fails when two threads launch kernels at once."""
    @functools.wraps(fn)
    def serialised(*args, **kwargs):
        if torch.compiler.is_compiling():  # tracing runs no kernel, and Dynamo cannot trace a lock
            return fn(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return serialised


def _check_budgets(budgets: Sequence[int], features: Sequence[Tensor]) -> None:
    if len(budgets) != len(features):
        raise ValueError(f"budgets must have one entry per image ({len(features)}), got {len(budgets)}")
    for i, (k, f) in enumerate(zip(budgets, features)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= f.shape[0]:
            raise ValueError(f"budgets[{i}] must be an int with 1 <= K <= {f.shape[0]} (the image's tokens), got {k!r}")


def pixel_key(pixel_values: Tensor, image_size) -> str:
    """Cache key of an image: a hash of its pixel bytes, dtype, shape (and the model's image size)."""
    t = pixel_values.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|{image_size}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(prompt: Prompt, tokenizer, index: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise TypeError(f"prompt of request {index} is a string, which needs a tokenizer (or processor) given to the engine; pass token ids instead")
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise TypeError(f"prompt of request {index} must be a 1-D integer tensor of token ids, got {prompt.dtype} of shape {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, Sequence) and all(_is_int(t) for t in prompt):
        return list(prompt)
    raise TypeError(f"prompt of request {index} must be a string, a list of int token ids or an integer tensor, got {type(prompt).__name__}")


def _check_token_ids(ids: list[int], vocab_size: int, refused: dict[int, str], image_token_id: int, index: int) -> None:
    """Every id must be embeddable; the image token is replaced by features, so it may lie outside the vocabulary."""
    if not ids:
        raise ValueError(f"prompt of request {index} is empty; every request needs at least one token")
    for j, t in enumerate(ids):
        if not 0 <= t < vocab_size and t != image_token_id:
            raise ValueError(f"prompt of request {index} holds token id {t} at index {j}, outside the vocabulary: allowed 0 <= id < {vocab_size}")
        if t in refused:
            raise ValueError(f"prompt of request {index} holds token id {t} at index {j}: {refused[t]}")


def _image_runs(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of every maximal run of image tokens in ``ids``."""
    runs: list[tuple[int, int]] = []
    for j, t in enumerate(ids):
        if t != image_token_id:
            continue
        if runs and runs[-1][0] + runs[-1][1] == j:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((j, 1))
    return runs


def _check_max_new_tokens(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _stop_set(name: str, value) -> frozenset:
    """Stop tokens as a set of ints: ``None``, one int or a sequence of ints."""
    if value is None:
        return frozenset()
    if _is_int(value):
        return frozenset([value])
    if isinstance(value, Tensor):
        value = value.tolist() if not value.dtype.is_floating_point else [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(_is_int(t) for t in value):
        raise TypeError(f"{name} must be an int token id or a list of int token ids, got {value!r}")
    return frozenset(value)


def _text_columns(text_len: int, insert_at: Sequence[int], spans: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Columns of a request's text tokens and first columns of its images in the sequence
    ``text[:a_0], image 0 (spans[0] columns), text[a_0:a_1], image 1, ...``."""
    shift = torch.zeros(text_len + 1, dtype=torch.int64)
    starts, before = [], 0
    for a, span in zip(insert_at, spans):
        shift[a] += span
        starts.append(a + before)
        before += span
    return torch.arange(text_len) + shift.cumsum(0)[:text_len], starts


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits for sampling: divided by ``temperature``, then all but the ``top_k`` best and all outside
    the ``top_p`` nucleus set to -inf (the order and rules of transformers' temperature, top-k and
    top-p warpers; the best token always survives)."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(x, dim=-1)
        cumulative = ascending.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - top_p
        remove[..., -1] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return x


def sample_next_tokens(logits: Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> Tensor:
    """``(B,)`` next tokens: argmax, or one draw per row from the filtered distribution with that row's generator."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    generators = generators or [None] * probs.shape[0]
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _check_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be None or an int, got {seed!r}")


@dataclass
class _ImageEntry:
    image: Any
    pixel_values: Optional[Tensor]
    image_size: Any
    image_id: Optional[Hashable]


def _image_entries(req: Request, index: int) -> list[_ImageEntry]:
    """The request's images, in placeholder order (no processing yet)."""
    if req.videos is not None:
        raise ValueError(f"request {index} has videos: video input is not supported yet; give still images")
    if req.images is not None:
        if req.image is not None or req.pixel_values is not None or req.image_sizes is not None:
            raise ValueError(f"request {index} gives images=[...] and image/pixel_values/image_sizes; give several images as images=[...] only (ImageInput for processed pixels)")
        if isinstance(req.images, (str, Tensor)) or not isinstance(req.images, Sequence):
            raise TypeError(f"images of request {index} must be a list of Pillow images / ImageInput, got {type(req.images).__name__}")
        entries = []
        for item in req.images:
            if isinstance(item, ImageInput):
                entries.append(_ImageEntry(None, item.pixel_values, item.image_size, item.image_id))
            elif isinstance(item, Tensor):
                entries.append(_ImageEntry(None, item, None, None))
            else:
                entries.append(_ImageEntry(item, None, None, None))
        return entries
    if req.image is not None and req.pixel_values is not None:
        raise ValueError(f"request {index} must carry each image once: give image (Pillow) or pixel_values, not both")
    if req.image is not None:
        return [_ImageEntry(req.image, None, None, req.image_id)]
    if req.pixel_values is not None:
        return [_ImageEntry(None, req.pixel_values, req.image_sizes, req.image_id)]
    return []


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class AutoSelectEngine:
    """AutoSelect pruning around a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL model (``autoselect_fast.models``).

    Args:
        model: the transformers model (any device / dtype; put in eval mode by the engine).
        scorer: a :class:`autoselect_fast.modules.Scorer` reading the model's pre-projector features
            (``adapter.feature_dim`` wide; moved to the model's device, features are cast to its dtype).
        keep: visual tokens to keep per image (K), or ``None``. LLaVA: ``keep > N`` is an error;
            Qwen2.5-VL (N follows the resolution): clipped to N.
        keep_ratio: alternatively a fraction of each image's N: ``K = max(1, round(keep_ratio * N))``.
            With neither, every token is kept (the full model through the same path).
        position_mode: ``"original"`` (kept tokens and later text keep their full-sequence positions)
            or ``"compact"`` (the pruned sequence is renumbered 0, 1, 2, ..., on every M-RoPE row).
        selection_backend: ``"auto"`` | ``"ops"`` | ``"reference"`` (see :func:`resolve_selection_backend`).
        attention_backend: ``"auto"`` | ``"flash_attn"`` | ``"torch_varlen"`` | ``"sdpa"`` for the packed prefill.
        image_processor: processor for Pillow images; default: the model's processor class built from its config.
        tokenizer: tokenizer (or a processor with ``.tokenizer``) for string prompts.
        score_cache_size: images whose scores are kept (LRU); 0 disables the cache.

    The language model's config is pointed once at a dispatching attention implementation
    (``autoselect_fast.attention.install_dispatch``): the model's own implementation for every ordinary
    call, the varlen backend inside this engine's packed prefill only, decided per call and thread.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: nn.Module,
        keep: Optional[int] = None,
        *,
        keep_ratio: Optional[float] = None,
        position_mode: str = "original",
        selection_backend: str = "auto",
        attention_backend: str = "auto",
        image_processor=None,
        tokenizer=None,
        score_cache_size: int = DEFAULT_SCORE_CACHE_SIZE,
    ):
        self.adapter: VLMAdapter = get_adapter(model)
        self.model = model.eval()
        if not callable(getattr(scorer, "check_input_dim", None)):
            raise TypeError(f"scorer must be an autoselect_fast.modules.Scorer (with check_input_dim), got {type(scorer).__name__}")
        scorer.check_input_dim(self.adapter.feature_dim)
        self.device = self.adapter.device
        self.scorer = scorer.to(self.device).eval()
        check_budget_args(keep, keep_ratio, required=False)
        self.keep, self.keep_ratio = keep, keep_ratio
        self.position_mode = check_choice("position_mode", position_mode, POSITION_MODES)
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.attention_backend = resolve_backend(attention_backend, self.device, self.adapter.language_model.dtype)
        install_dispatch(self.adapter.language_model.config)
        self.selection_backend, self._select = resolve_selection_backend(selection_backend, self.device)
        if self.selection_backend == "ops" and os.environ.get("TRITON_INTERPRET") == "1":
            self._select = _one_at_a_time(self._select)
        self.packer_backend, self._pack = resolve_packer(self.device)
        self.image_processor = image_processor
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if not _is_int(score_cache_size) or score_cache_size < 0:
            raise ValueError(f"score_cache_size must be an int >= 0, got {score_cache_size!r}")
        self.score_cache_size = score_cache_size
        self._score_cache: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._lock = threading.Lock()  # guards the score cache, its counters and the lazy image processor
        self.scorer_calls = 0  # forward calls of the Scorer (one per batch of uncached images)
        self.scored_images = 0  # images the Scorer has scored
        self.last_prefill: Optional[PrefillOutput] = None  # the prefill of the latest generate() call (any thread)
        lm_params = inspect.signature(self.adapter.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"  # renamed in transformers 5.2x

    # ---------------------------------------------------------------------------------------------
    # Budget
    # ---------------------------------------------------------------------------------------------
    def budget(self, num_tokens: int) -> int:
        """K for an image of ``num_tokens`` visual tokens (``keep > N``: clipped or ValueError, per model)."""
        return image_budget(num_tokens, self.keep, self.keep_ratio, clip=self.adapter.clips_keep_to_tokens)

    # ---------------------------------------------------------------------------------------------
    # Stage 1: host-side preparation
    # ---------------------------------------------------------------------------------------------
    def _image_processor(self):
        with self._lock:
            if self.image_processor is None:
                self.image_processor = self.adapter.default_image_processor()
            return self.image_processor

    def prepare(self, requests: Union[Request, Sequence[Request]]) -> PreparedBatch:
        """Validate and tokenise requests, process images, expand placeholders, compute positions.

        Every request is checked (types, token ids, placeholders against images, limits) before the
        first image is processed.
        """
        if isinstance(requests, Request):
            requests = [requests]
        if isinstance(requests, (str, Tensor)) or not isinstance(requests, Sequence) or not requests:
            raise TypeError(f"requests must be a non-empty list of Request, got {type(requests).__name__}")
        adapter, image_token = self.adapter, self.adapter.image_token_id
        parsed = []
        for i, req in enumerate(requests):
            if not isinstance(req, Request):
                raise TypeError(f"requests[{i}] must be a Request, got {type(req).__name__}")
            entries = _image_entries(req, i)
            ids = _token_ids(req.prompt, self.tokenizer, i)
            _check_token_ids(ids, adapter.vocab_size, adapter.unsupported_token_ids, image_token, i)
            runs = _image_runs(ids, image_token)
            if entries and not runs:
                raise ValueError(f"prompt of request {i} has no image token (id {image_token}) but the request carries {len(entries)} image(s); put one placeholder where each image goes")
            if len(runs) != len(entries):
                raise ValueError(
                    f"prompt of request {i} has {len(runs)} separate image-token runs but the request carries {len(entries)} "
                    "image(s); give one placeholder (or expanded run) per image, images separated by other tokens"
                )
            if req.max_new_tokens is not None:
                _check_max_new_tokens(f"max_new_tokens of request {i}", req.max_new_tokens)
            if req.seed is not None and not _is_int(req.seed):
                raise TypeError(f"seed of request {i} must be an int or None, got {req.seed!r}")
            parsed.append((ids, runs, entries, req.max_new_tokens, _stop_set(f"stop_token_ids of request {i}", req.stop_token_ids), req.seed))

        text, lengths, full_positions, token_positions = [], [], [], []
        image_request, insert_at, pixels, sizes, layouts, keys, budgets = [], [], [], [], [], [], []
        for r, (ids, runs, entries, *_) in enumerate(parsed):
            own_text, own_insert, own_sizes, own_layouts, done = [], [], [], [], 0
            for (start, run), entry in zip(runs, entries):
                if entry.image is not None:
                    pv, size = adapter.process_image(entry.image, self._image_processor())
                else:
                    pv, size = adapter.check_pixel_values(entry.pixel_values, entry.image_size)
                layout = adapter.layout(size)
                if run not in (1, layout.num_slots):
                    raise ValueError(
                        f"prompt of request {r} has a run of {run} image tokens; give one placeholder token or the "
                        f"expanded run of {layout.num_slots} tokens this image takes"
                    )
                budgets.append(self.budget(layout.num_tokens))
                own_text.extend(ids[done:start])
                done = start + run
                own_insert.append(len(own_text))
                own_sizes.append(size)
                own_layouts.append(layout)
                image_request.append(r)
                pixels.append(pv)
                keys.append(entry.image_id if entry.image_id is not None else pixel_key(pv, size))
            own_text.extend(ids[done:])
            # The full (unpruned) sequence as the model sees it, and the positions it would give it.
            spans = [layout.num_slots for layout in own_layouts]
            columns, starts = _text_columns(len(own_text), own_insert, spans)
            expanded = torch.full((len(own_text) + sum(spans),), image_token, dtype=torch.int64)
            expanded[columns] = torch.tensor(own_text, dtype=torch.int64)
            full = adapter.sequence_positions(expanded, own_sizes)
            full_positions.append(full)
            token_positions.extend(full[:, s + layout.token_slot] for s, layout in zip(starts, own_layouts))
            text.extend(own_text)
            lengths.append(len(own_text))
            insert_at.extend(own_insert)
            sizes.extend(own_sizes)
            layouts.extend(own_layouts)
        rows = adapter.position_rows
        visual_positions = torch.cat(token_positions, dim=1) if token_positions else torch.zeros(rows, 0, dtype=torch.int64)
        return PreparedBatch(
            text_ids=torch.tensor(text, dtype=torch.int64),
            text_cu_seqlens=cu_seqlens_from_lengths(lengths),
            image_request=torch.tensor(image_request, dtype=torch.int64),
            insert_at=torch.tensor(insert_at, dtype=torch.int64),
            pixel_values=pixels,
            image_sizes=sizes,
            layouts=layouts,
            image_keys=keys,
            budgets=budgets,
            token_positions=visual_positions[0] if rows == 1 else visual_positions,
            full_positions=full_positions,
            max_new_tokens=[p[3] for p in parsed],
            stop_token_ids=[p[4] for p in parsed],
            seeds=[p[5] for p in parsed],
        )

    # ---------------------------------------------------------------------------------------------
    # Stage 2: vision
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: Sequence[Tensor], image_sizes: Optional[Sequence] = None) -> list[Tensor]:
        """Pre-projector features ``(N_i, d_v)`` per image, tokens in sequence order (one vision call)."""
        if not pixel_values:
            return []
        if image_sizes is None:
            image_sizes = [None] * len(pixel_values)
        return self.adapter.encode(pixel_values, image_sizes)

    # ---------------------------------------------------------------------------------------------
    # Stage 3: Scorer + selection
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, features: Sequence[Tensor], keys: Optional[Sequence[Optional[Hashable]]] = None) -> list[Tensor]:
        """Scores ``(N_i,)`` per image; images whose key is cached skip the Scorer (scores are prompt-independent)."""
        keys = [None] * len(features) if keys is None else list(keys)
        if len(keys) != len(features):
            raise ValueError(f"keys must have one entry per image ({len(features)}), got {len(keys)}")
        scores: list[Optional[Tensor]] = [None] * len(features)
        with self._score_lock():
            for i, key in enumerate(keys):
                if key is not None and key in self._score_cache:
                    self._score_cache.move_to_end(key)
                    scores[i] = self._score_cache[key]
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing:
            dtype = next(self.scorer.parameters()).dtype
            flat = torch.cat([features[i] for i in missing]).to(dtype)
            lengths = [features[i].shape[0] for i in missing]
            if len(set(lengths)) == 1:  # equal sizes: one (B, N, d_v) batch, no offsets to read back
                fresh = self.scorer(flat.view(len(lengths), lengths[0], flat.shape[-1])).reshape(-1).float()
            else:
                fresh = self.scorer(flat, to_device(cu_seqlens_from_lengths(lengths), flat.device)).float()
            with self._score_lock():
                self.scorer_calls += 1
                self.scored_images += len(missing)
                for i, s in zip(missing, fresh.split(lengths)):
                    scores[i] = s
                    if keys[i] is not None and self.score_cache_size:
                        self._score_cache[keys[i]] = s
                        while len(self._score_cache) > self.score_cache_size:
                            self._score_cache.popitem(last=False)
        return scores

    def _score_lock(self):
        """The score cache's lock; none while torch.compile traces (tracing is single-threaded, and
        Dynamo cannot trace a lock)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock

    def clear_score_cache(self) -> None:
        with self._lock:
            self._score_cache.clear()

    def _no_images(self) -> PruneResult:
        """The prune result of a batch without images (text-only requests)."""
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        rows = self.adapter.position_rows
        positions = empty if rows == 1 else empty.view(1, 0).expand(rows, 0)
        selection = Selection(indices=empty, features=torch.zeros(0, self.adapter.feature_dim, device=self.device),
                              position_ids=positions, cu_seqlens=torch.zeros(1, dtype=torch.int64, device=self.device))
        return PruneResult(scores=torch.zeros(0, device=self.device), token_cu_seqlens=torch.zeros(1, dtype=torch.int64), selection=selection)

    @torch.inference_mode()
    def prune(
        self,
        features: Sequence[Tensor],
        budgets: Optional[Sequence[int]] = None,
        *,
        keys: Optional[Sequence[Optional[Hashable]]] = None,
        positions: Optional[Tensor] = None,
    ) -> PruneResult:
        """Scorer (cached per key) + hard top-K of every image, in one selection call.

        Args:
            features: per image ``(N_i, d_v)`` (from :meth:`encode_images`).
            budgets: K per image; default from the engine's ``keep`` / ``keep_ratio``.
            keys: score-cache key per image (``None``: not cached).
            positions: ``(ΣN,)`` or ``(3, ΣN)`` full-sequence positions of the tokens; default 0..N_i-1 per image.
        """
        if not features:
            return self._no_images()
        if budgets is None:
            budgets = [self.budget(f.shape[0]) for f in features]
        _check_budgets(budgets, features)  # on the host: the selection itself runs without data checks
        flat = torch.cat(list(features))
        host_cu = cu_seqlens_from_lengths([f.shape[0] for f in features])
        cu = to_device(host_cu, flat.device)  # host-built offsets: copied without a synchronisation
        if positions is not None:
            positions = to_device(positions, flat.device)
        if all(k == f.shape[0] for k, f in zip(budgets, features)):
            # Keeping every token needs no scores: this is the unpruned baseline, so the Scorer stays idle.
            if positions is None:
                positions = to_device(reference.default_positions(host_cu), flat.device)
            everything = torch.arange(flat.shape[0], device=flat.device)
            selection = Selection(indices=everything, features=flat, position_ids=positions, cu_seqlens=cu)
            return PruneResult(scores=torch.zeros(flat.shape[0], device=flat.device), token_cu_seqlens=cu, selection=selection)
        scores = torch.cat(self.score(features, keys))
        # Budgets go as a host list: ΣK sizes the outputs without reading the device.
        selection = self._select(scores, flat, list(budgets), cu, positions=positions, position_mode="original",
                                 max_seqlen=max(f.shape[0] for f in features))
        return PruneResult(scores=scores, token_cu_seqlens=cu, selection=selection)

    # ---------------------------------------------------------------------------------------------
    # Stage 4: projector, embeddings, positions, packing
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def pack(self, batch: PreparedBatch, pruned: PruneResult) -> PackedBatch:
        """The packed varlen batch of the pruned sequences (see ``docs/engine.md`` for the positions)."""
        device = self.device
        kept = pruned.kept_indices()
        text_embeds = self.adapter.embed_tokens(batch.text_ids.to(device))
        slots, visual = [], []
        if batch.num_images:
            projected = self.adapter.project(pruned.selection.features).split([k.numel() for k in kept])
            for layout, kept_i, proj_i in zip(batch.layouts, kept, projected):
                slots_i, embeds_i = self.adapter.image_slot_embeddings(layout, kept_i, proj_i)
                slots.append(slots_i)
                visual.append(embeds_i)
        text_positions, visual_positions = self._positions(batch, slots)
        visual_embeds = torch.cat(visual).to(text_embeds.dtype) if visual else text_embeds.new_zeros(0, text_embeds.shape[-1])
        return self._pack(
            text_embeds, batch.text_cu_seqlens, text_positions.to(device),
            visual_embeds, cu_seqlens_from_lengths([s.numel() for s in slots]), visual_positions.to(device),
            batch.image_request, batch.insert_at,
        )

    def _positions(self, batch: PreparedBatch, slots: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Positions of the text tokens ``(rows, ΣLt)`` and the kept image slots ``(rows, ΣV)`` (DESIGN.md 3).

        ``original``: each token's column in the full sequence, looked up in the positions the model gives
        that sequence (gaps remain; M-RoPE rows gathered alike). ``compact``: the column in the pruned
        sequence, the same on every row. Rows are squeezed away for 1-D positions.
        """
        rows = self.adapter.position_rows
        text_parts, visual_parts = [], [None] * batch.num_images
        for r, (s, e) in enumerate(segment_bounds(batch.text_cu_seqlens)):
            images = batch.images_of(r)
            insert_at = [int(batch.insert_at[i]) for i in images]
            if self.position_mode == "original":
                columns, starts = _text_columns(e - s, insert_at, [batch.layouts[i].num_slots for i in images])
                full = batch.full_positions[r]
                text_parts.append(full[:, columns])
                for i, start in zip(images, starts):
                    visual_parts[i] = full[:, start + slots[i]]
            else:
                columns, starts = _text_columns(e - s, insert_at, [slots[i].numel() for i in images])
                text_parts.append(columns.expand(rows, -1))
                for i, start in zip(images, starts):
                    visual_parts[i] = (start + torch.arange(slots[i].numel())).expand(rows, -1)
        text = torch.cat(text_parts, dim=1)
        visual = torch.cat(visual_parts, dim=1) if visual_parts else torch.zeros(rows, 0, dtype=torch.int64)
        return (text[0], visual[0]) if rows == 1 else (text.contiguous(), visual.contiguous())

    # ---------------------------------------------------------------------------------------------
    # Stage 5: LLM prefill over the packed batch
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_packed(self, packed: PackedBatch, cache=None) -> Tensor:
        """Language model over ``packed`` with varlen attention; returns ``(B, vocab)`` last-token logits.

        ``cache`` (a transformers ``DynamicCache``) is filled with the packed keys/values when given.
        """
        lm = self.adapter.language_model
        install_dispatch(lm.config)  # a no-op unless the model's implementation was switched since
        cu = packed.cu_seqlens.to(device=self.device, dtype=torch.int32)
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        with varlen_call(self.attention_backend):
            hidden = lm(
                inputs_embeds=packed.embeds[None],
                position_ids=packed.position_ids.unsqueeze(-2),  # (1, T), or (3, 1, T) for M-RoPE
                attention_mask=None,
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=packed.max_seqlen,
                max_length_k=packed.max_seqlen,
                **kwargs,
            ).last_hidden_state
        last = hidden[0, packed.last_token_index.to(self.device)]
        return self.adapter.lm_head(last)

    # ---------------------------------------------------------------------------------------------
    # End to end
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests: Union[Request, Sequence[Request]]) -> PrefillOutput:
        """Pruned prefill of a batch: first-token logits, kept counts and a timing breakdown."""
        out, _, _ = self._prefill(requests, cache=None)
        return out

    def _prefill(self, requests, cache, batch: Optional[PreparedBatch] = None) -> tuple[PrefillOutput, PackedBatch, PreparedBatch]:
        batch = self.prepare(requests) if batch is None else batch
        clock = Stopwatch(self.device)
        with clock.stage("vision"):
            features = self.encode_images(batch.pixel_values, batch.image_sizes)
        with clock.stage("prune"):
            pruned = self.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions)
        with clock.stage("pack"):
            packed = self.pack(batch, pruned)
        with clock.stage("prefill"):
            logits = self.prefill_packed(packed, cache)
        clock.ms["total"] = sum(clock.ms.values())
        lengths = packed.cu_seqlens.diff().tolist()
        request_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), packed.cu_seqlens.diff().to(self.device).long())
        token_max = packed.position_ids.view(-1, packed.embeds.shape[0]).amax(0)  # over the M-RoPE rows
        largest = torch.full((len(lengths),), -1, dtype=torch.int64, device=self.device)
        largest = largest.scatter_reduce(0, request_of_token, token_max, reduce="amax")
        image_request = batch.image_request.tolist()
        kept_tokens, visual_tokens = [0] * batch.batch_size, [0] * batch.batch_size
        for r, k, layout in zip(image_request, batch.budgets, batch.layouts):
            kept_tokens[r] += k
            visual_tokens[r] += layout.num_tokens
        output = PrefillOutput(
            logits=logits,
            kept_tokens=kept_tokens,
            visual_tokens=visual_tokens,
            sequence_lengths=lengths,
            next_positions=largest + 1,
            kept_indices=pruned.kept_indices(),
            image_request=image_request,
            timings_ms=clock.ms,
        )
        return output, packed, batch

    @torch.inference_mode()
    def generate(
        self,
        requests: Union[Request, Sequence[Request]],
        max_new_tokens: int = 32,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
    ) -> list[list[int]]:
        """Decoding after a pruned, packed prefill; returns the new token ids per request.

        Args:
            max_new_tokens: default limit; ``Request.max_new_tokens`` overrides it per request.
            eos_token_id: stop token(s) of every request; ``Request.stop_token_ids`` adds its own. A
                request stops after emitting one of its stop tokens (included in its output).
            do_sample: ``False``: greedy (argmax). ``True``: sample from the logits divided by
                ``temperature``, restricted to the ``top_k`` best (0: all) and the ``top_p`` nucleus.
            seed: every request gets its own generator, seeded with ``Request.seed`` when set, else
                with ``seed + r`` (r: its index in the batch); with neither, torch's global generator
                is used. A request with its own seed samples the same tokens whatever the rest of the batch.

        The KV cache holds only the kept tokens; decoding continues at each request's largest position
        + 1 (every M-RoPE row), one more per step.
        """
        _check_max_new_tokens("max_new_tokens", max_new_tokens)
        eos = _stop_set("eos_token_id", eos_token_id)
        _check_sampling(do_sample, temperature, top_k, top_p, seed)
        batch = self.prepare(requests)
        b = batch.batch_size
        limits = [m if m is not None else max_new_tokens for m in batch.max_new_tokens]
        stops = [eos | own for own in batch.stop_token_ids]
        seeds = [own if own is not None else None if seed is None else seed + r for r, own in enumerate(batch.seeds)]
        generators = [None if s is None else torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generators=generators)
        from transformers import DynamicCache

        packed_cache = DynamicCache()
        first, packed, _ = self._prefill(requests, cache=packed_cache, batch=batch)
        self.last_prefill = first
        cache, attention_mask = self._padded_cache(packed_cache, packed.cu_seqlens)
        positions = first.next_positions.clone()
        tokens = sample_next_tokens(first.logits, **sampling)
        outputs: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        lm, embed = self.adapter.language_model, self.adapter.embed_tokens
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
                **{self._cache_kwarg: cache},
            ).last_hidden_state
            tokens = sample_next_tokens(self.adapter.lm_head(hidden[:, -1]), **sampling)
            positions = positions + 1
        return outputs

    def _padded_cache(self, packed_cache, cu_seqlens: Tensor):
        """Packed (1, Hkv, T, d) keys/values -> a left-padded (B, Hkv, L_max, d) DynamicCache + 2-D mask."""
        from transformers import DynamicCache

        bounds = segment_bounds(cu_seqlens)
        longest = max(e - s for s, e in bounds)
        mask = torch.zeros(len(bounds), longest, dtype=torch.int64, device=self.device)
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
