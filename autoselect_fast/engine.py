"""The inference engine: pruned prefill and greedy generation on LLaVA-1.5 / LLaVA-NeXT.

This module owns the request flow around a frozen transformers VLM (DESIGN.md sections 1, 3 and 5):

1. :meth:`AutoSelectEngine.prepare` (host work, untimed): image processing, tokenisation, expansion
   of the image placeholder, argument checks, full-sequence positions of every visual token.
2. :meth:`AutoSelectEngine.encode_images`: pre-projector vision features of each image, tokens in
   sequence order (``models/``).
3. :meth:`AutoSelectEngine.prune`: Scorer (scores cached per image) + hard top-K selection.
4. :meth:`AutoSelectEngine.pack`: projector on the kept tokens only, LLaVA-NeXT newlines, text
   embeddings, position ids (``original`` or ``compact``), one varlen batch (``autoselect_fast.packing``).
5. :meth:`AutoSelectEngine.prefill_packed`: the language model over the packed batch with the varlen
   attention backend (``autoselect_fast.attention``); ``lm_head`` only on each request's last token.

:meth:`AutoSelectEngine.prefill` runs 1-5 and reports a timing breakdown; :meth:`AutoSelectEngine.generate`
continues greedily from the packed prefill's KV cache with an ordinary left-padded batch. Model-specific
code lives in ``autoselect_fast.models``; this module is model-agnostic.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import reference
from ._validation import check_choice, to_device
from .attention import ATTENTION_BACKENDS, REGISTERED_NAMES, register_varlen_attention, resolve_backend
from .models import ImageLayout, VLMAdapter, get_adapter
from .packing import PackedBatch
from .reference import POSITION_MODES, Selection, cu_seqlens_from_lengths

SELECTION_BACKENDS = ("auto", "ops", "reference")
DEFAULT_SCORE_CACHE_SIZE = 1024

Prompt = Union[str, Sequence[int], Tensor]


# --------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One prompt about one image.

    Give the image as a Pillow image (``image``, processed by the engine's image processor) or as
    already processed ``pixel_values`` of that one image (LLaVA-1.5: ``(3, H, W)`` or ``(1, 3, H, W)``;
    LLaVA-NeXT: ``(tiles, 3, h, w)`` or ``(1, tiles, 3, h, w)`` plus ``image_sizes`` = original
    ``(height, width)``). ``prompt`` is a list/tensor of token ids containing the model's image token
    once (the engine expands it) or as the already expanded run, or a string when the engine has a
    tokenizer. ``image_id`` keys the score cache; by default the pixel tensor's bytes are hashed.
    """

    prompt: Prompt
    image: Any = None
    pixel_values: Optional[Tensor] = None
    image_sizes: Any = None
    image_id: Optional[Hashable] = None


@dataclass
class PreparedBatch:
    """Output of :meth:`AutoSelectEngine.prepare`: everything host-side the later stages need.

    ``text_ids`` are all requests' text tokens with the image placeholder removed, request after
    request (``text_cu_seqlens``); the image goes after ``insert_at[r]`` of request r's text tokens.
    ``token_positions`` ``(ΣN,)`` are the full-sequence (unpruned) positions of every visual token.
    """

    text_ids: Tensor
    text_cu_seqlens: Tensor
    insert_at: Tensor
    pixel_values: list[Tensor]
    image_sizes: list[Optional[tuple[int, int]]]
    layouts: list[ImageLayout]
    image_keys: list[Hashable]
    budgets: list[int]
    token_positions: Tensor

    @property
    def batch_size(self) -> int:
        return len(self.layouts)


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
        kept_tokens: per request, visual tokens kept (K; newlines not counted).
        visual_tokens: per request, visual tokens of the image before pruning (N).
        sequence_lengths: per request, tokens in the pruned LLM sequence (text + kept tokens + kept newlines).
        next_positions: ``(B,)`` position id of the first generated token (largest position + 1).
        kept_indices: per request, ascending indices of the kept tokens in ``[0, N)``.
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
class _Stopwatch:
    """Wall-clock per stage; synchronises CUDA around each stage so GPU work is attributed correctly."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, {}

    @contextmanager
    def stage(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


@contextmanager
def _attn_implementation(config, name: str):
    """Run the language model with attention implementation ``name``, then restore the previous one."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _check_budgets(budgets: Sequence[int], features: Sequence[Tensor]) -> None:
    if len(budgets) != len(features):
        raise ValueError(f"budgets must have one entry per image ({len(features)}), got {len(budgets)}")
    for i, (k, f) in enumerate(zip(budgets, features)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= f.shape[0]:
            raise ValueError(f"budgets[{i}] must be an int with 1 <= K <= {f.shape[0]} (the image's tokens), got {k!r}")


def pixel_key(pixel_values: Tensor, image_size) -> str:
    """Cache key of an image: a hash of its pixel bytes, dtype, shape (and LLaVA-NeXT image size)."""
    t = pixel_values.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|{image_size}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise TypeError(f"prompt of request {index} must be a string, a list of int token ids or an integer tensor, got {type(prompt).__name__}")


def _find_image_run(ids: list[int], image_token_id: int, index: int) -> tuple[int, int]:
    """``(start, length)`` of the single contiguous run of image tokens in ``ids``."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    if not where:
        raise ValueError(f"prompt of request {index} has no image token (id {image_token_id}); put the image placeholder where the image goes")
    start, length = where[0], len(where)
    if where[-1] - start + 1 != length:
        runs = sum(1 for a, b in zip([-2] + where, where) if b != a + 1)
        raise ValueError(f"prompt of request {index} has {runs} separate image-token runs but the request carries one image; use one placeholder")
    return start, length


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
class AutoSelectEngine:
    """AutoSelect pruning around a ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``.

    Args:
        model: the transformers model (any device / dtype; put in eval mode by the engine).
        scorer: a :class:`autoselect_fast.modules.Scorer` reading the model's pre-projector features
            (moved to the model's device; its dtype is kept and features are cast to it).
        keep: visual tokens to keep per image (K), or ``None``.
        keep_ratio: alternatively a fraction of each image's N: ``K = max(1, round(keep_ratio * N))``.
            With neither, every token is kept (the full model through the same path).
        position_mode: ``"original"`` (kept tokens and later text keep their full-sequence positions)
            or ``"compact"`` (the pruned sequence is renumbered 0, 1, 2, ...).
        selection_backend: ``"auto"`` | ``"ops"`` | ``"reference"`` (see :func:`resolve_selection_backend`).
        attention_backend: ``"auto"`` | ``"flash_attn"`` | ``"torch_varlen"`` | ``"sdpa"`` for the packed prefill.
        image_processor: processor for Pillow images; default: the model's processor class built from its config.
        tokenizer: tokenizer (or a processor with ``.tokenizer``) for string prompts.
        score_cache_size: images whose scores are kept (LRU); 0 disables the cache.
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
        if keep is not None and keep_ratio is not None:
            raise ValueError(f"give keep or keep_ratio, not both (got keep={keep!r}, keep_ratio={keep_ratio!r})")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be an int >= 1 (or None to keep every token), got {keep!r}")
        if keep_ratio is not None and (isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1):
            raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
        self.keep, self.keep_ratio = keep, keep_ratio
        self.position_mode = check_choice("position_mode", position_mode, POSITION_MODES)
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.attention_backend = resolve_backend(attention_backend, self.device, self.adapter.language_model.dtype)
        register_varlen_attention()
        self.attention_name = REGISTERED_NAMES[self.attention_backend]
        self.selection_backend, self._select = resolve_selection_backend(selection_backend, self.device)
        self.packer_backend, self._pack = resolve_packer(self.device)
        self.image_processor = image_processor
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if isinstance(score_cache_size, bool) or not isinstance(score_cache_size, int) or score_cache_size < 0:
            raise ValueError(f"score_cache_size must be an int >= 0, got {score_cache_size!r}")
        self.score_cache_size = score_cache_size
        self._score_cache: OrderedDict[Hashable, Tensor] = OrderedDict()
        self.scorer_calls = 0  # forward calls of the Scorer (one per batch of uncached images)
        self.scored_images = 0  # images the Scorer has scored
        self.last_prefill: Optional[PrefillOutput] = None  # the prefill of the latest generate() call
        lm_params = inspect.signature(self.adapter.language_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in lm_params else "past_key_values"  # renamed in transformers 5.2x

    # ---------------------------------------------------------------------------------------------
    # Budget
    # ---------------------------------------------------------------------------------------------
    def budget(self, num_tokens: int) -> int:
        """K for an image of ``num_tokens`` visual tokens; ValueError when ``keep`` exceeds it."""
        if self.keep is not None:
            if self.keep > num_tokens:
                raise ValueError(f"keep={self.keep} exceeds the image's {num_tokens} visual tokens; allowed: 1 <= keep <= {num_tokens}")
            return self.keep
        if self.keep_ratio is not None:
            return max(1, round(self.keep_ratio * num_tokens))
        return num_tokens

    # ---------------------------------------------------------------------------------------------
    # Stage 1: host-side preparation
    # ---------------------------------------------------------------------------------------------
    def prepare(self, requests: Union[Request, Sequence[Request]]) -> PreparedBatch:
        """Validate and tokenise requests, process images, expand placeholders, compute positions."""
        if isinstance(requests, Request):
            requests = [requests]
        if isinstance(requests, (str, Tensor)) or not isinstance(requests, Sequence) or not requests:
            raise TypeError(f"requests must be a non-empty list of Request, got {type(requests).__name__}")
        image_token = self.adapter.image_token_id
        text, lengths, insert_at, pixels, sizes, layouts, keys, budgets, positions = [], [], [], [], [], [], [], [], []
        for i, req in enumerate(requests):
            if not isinstance(req, Request):
                raise TypeError(f"requests[{i}] must be a Request, got {type(req).__name__}")
            if (req.image is None) == (req.pixel_values is None):
                raise ValueError(f"request {i} must carry exactly one image: give image (Pillow) or pixel_values, not {'both' if req.image is not None else 'neither'}")
            ids = _token_ids(req.prompt, self.tokenizer, i)
            start, run = _find_image_run(ids, image_token, i)
            if req.image is not None:
                if self.image_processor is None:
                    self.image_processor = self.adapter.default_image_processor()
                pv, size = self.adapter.process_image(req.image, self.image_processor)
            else:
                pv, size = self.adapter.check_pixel_values(req.pixel_values, req.image_sizes)
            layout = self.adapter.layout(size)
            if run not in (1, layout.num_slots):
                raise ValueError(
                    f"prompt of request {i} has a run of {run} image tokens; give one placeholder token or the "
                    f"expanded run of {layout.num_slots} tokens this image takes"
                )
            budgets.append(self.budget(layout.num_tokens))
            ids = ids[:start] + ids[start + run:]
            text.extend(ids)
            lengths.append(len(ids))
            insert_at.append(start)
            pixels.append(pv)
            sizes.append(size)
            layouts.append(layout)
            keys.append(req.image_id if req.image_id is not None else pixel_key(pv, size))
            positions.append(start + layout.token_slot)
        return PreparedBatch(
            text_ids=torch.tensor(text, dtype=torch.int64),
            text_cu_seqlens=cu_seqlens_from_lengths(lengths),
            insert_at=torch.tensor(insert_at, dtype=torch.int64),
            pixel_values=pixels,
            image_sizes=sizes,
            layouts=layouts,
            image_keys=keys,
            budgets=budgets,
            token_positions=torch.cat(positions),
        )

    # ---------------------------------------------------------------------------------------------
    # Stage 2: vision
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: Sequence[Tensor], image_sizes: Optional[Sequence] = None) -> list[Tensor]:
        """Pre-projector features ``(N_i, d_v)`` per image, tokens in sequence order (one vision call)."""
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
            self.scorer_calls += 1
            self.scored_images += len(missing)
            for i, s in zip(missing, fresh.split(lengths)):
                scores[i] = s
                if keys[i] is not None and self.score_cache_size:
                    self._score_cache[keys[i]] = s
                    while len(self._score_cache) > self.score_cache_size:
                        self._score_cache.popitem(last=False)
        return scores

    def clear_score_cache(self) -> None:
        self._score_cache.clear()

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
            positions: ``(ΣN,)`` full-sequence positions of the tokens; default 0..N_i-1 per image.
        """
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
        selection = self._select(scores, flat, list(budgets), cu, positions=positions, position_mode="original")
        return PruneResult(scores=scores, token_cu_seqlens=cu, selection=selection)

    # ---------------------------------------------------------------------------------------------
    # Stage 4: projector, embeddings, positions, packing
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def pack(self, batch: PreparedBatch, pruned: PruneResult) -> PackedBatch:
        """The packed varlen batch of the pruned sequences (see ``docs/engine.md`` for the positions)."""
        device = self.device
        kept = pruned.kept_indices()
        projected = self.adapter.project(pruned.selection.features).split([k.numel() for k in kept])
        newline = self.adapter.newline_embedding()
        visual_embeds, visual_positions, visual_lengths = [], [], []
        for r, (layout, kept_r, proj_r) in enumerate(zip(batch.layouts, kept, projected)):
            slots, is_newline, _ = layout.kept_slots(kept_r)
            if bool(is_newline.any()):
                embeds = proj_r.new_empty(slots.numel(), proj_r.shape[-1])
                is_newline = is_newline.to(device)
                embeds[~is_newline] = proj_r
                embeds[is_newline] = newline.to(proj_r.dtype)
            else:
                embeds = proj_r
            visual_embeds.append(embeds)
            visual_positions.append(self._visual_positions(int(batch.insert_at[r]), slots))
            visual_lengths.append(slots.numel())
        text_positions = self._text_positions(batch, visual_lengths)
        text_embeds = self.adapter.embed_tokens(batch.text_ids.to(device))
        dtype = text_embeds.dtype
        return self._pack(
            text_embeds, batch.text_cu_seqlens, text_positions.to(device),
            torch.cat(visual_embeds).to(dtype), cu_seqlens_from_lengths(visual_lengths), torch.cat(visual_positions).to(device),
            torch.arange(batch.batch_size), batch.insert_at,
        )

    # The two position rules (DESIGN.md section 3), for 1-D positions. A request's sequence is
    # text[:a], image, text[a:], where the unpruned image spans S slots and the pruned one V.
    def _visual_positions(self, a: int, slots: Tensor) -> Tensor:
        if self.position_mode == "original":
            return a + slots  # kept tokens/newlines keep their slots: gaps remain
        return a + torch.arange(slots.numel())

    def _text_positions(self, batch: PreparedBatch, visual_lengths: list[int]) -> Tensor:
        parts = []
        for r, (s, e) in enumerate(reference.segment_bounds(batch.text_cu_seqlens)):
            a = int(batch.insert_at[r])
            span = batch.layouts[r].num_slots if self.position_mode == "original" else visual_lengths[r]
            j = torch.arange(e - s)
            parts.append(j + (j >= a) * span)
        return torch.cat(parts)

    # ---------------------------------------------------------------------------------------------
    # Stage 5: LLM prefill over the packed batch
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_packed(self, packed: PackedBatch, cache=None) -> Tensor:
        """Language model over ``packed`` with varlen attention; returns ``(B, vocab)`` last-token logits.

        ``cache`` (a transformers ``DynamicCache``) is filled with the packed keys/values when given.
        """
        lm = self.adapter.language_model
        cu = packed.cu_seqlens.to(device=self.device, dtype=torch.int32)
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        with _attn_implementation(lm.config, self.attention_name):
            hidden = lm(
                inputs_embeds=packed.embeds[None],
                position_ids=packed.position_ids[None],
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

    def _prefill(self, requests, cache) -> tuple[PrefillOutput, PackedBatch, PreparedBatch]:
        batch = self.prepare(requests)
        clock = _Stopwatch(self.device)
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
        largest = torch.full((len(lengths),), -1, dtype=torch.int64, device=self.device)
        largest = largest.scatter_reduce(0, request_of_token, packed.position_ids, reduce="amax")
        output = PrefillOutput(
            logits=logits,
            kept_tokens=list(batch.budgets),
            visual_tokens=[layout.num_tokens for layout in batch.layouts],
            sequence_lengths=lengths,
            next_positions=largest + 1,
            kept_indices=pruned.kept_indices(),
            timings_ms=clock.ms,
        )
        return output, packed, batch

    @torch.inference_mode()
    def generate(self, requests: Union[Request, Sequence[Request]], max_new_tokens: int = 32, eos_token_id: Optional[Union[int, Sequence[int]]] = None) -> list[list[int]]:
        """Greedy decoding after a pruned, packed prefill; returns the new token ids per request.

        A request stops after emitting an ``eos_token_id`` (included in its output). The KV cache holds
        only the kept tokens; decoding continues at each request's largest position + 1.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        from transformers import DynamicCache

        packed_cache = DynamicCache()
        first, packed, _ = self._prefill(requests, cache=packed_cache)
        self.last_prefill = first
        cache, attention_mask = self._padded_cache(packed_cache, packed.cu_seqlens)
        b = attention_mask.shape[0]
        positions = first.next_positions.clone()
        tokens = first.logits.argmax(-1)
        outputs: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        lm, embed = self.adapter.language_model, self.adapter.embed_tokens
        for step in range(max_new_tokens):
            for r, t in enumerate(tokens.tolist()):
                if not done[r]:
                    outputs[r].append(t)
                    done[r] = t in eos
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
            hidden = lm(
                inputs_embeds=embed(tokens)[:, None],
                attention_mask=attention_mask,
                position_ids=positions[:, None],
                use_cache=True,
                **{self._cache_kwarg: cache},
            ).last_hidden_state
            tokens = self.adapter.lm_head(hidden[:, -1]).argmax(-1)
            positions = positions + 1
        return outputs

    def _padded_cache(self, packed_cache, cu_seqlens: Tensor):
        """Packed (1, Hkv, T, d) keys/values -> a left-padded (B, Hkv, L_max, d) DynamicCache + 2-D mask."""
        from transformers import DynamicCache

        bounds = reference.segment_bounds(cu_seqlens)
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
