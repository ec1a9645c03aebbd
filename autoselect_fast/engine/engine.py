"""The engine: pruned, packed prefill and generation on LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

This module owns :class:`AutoSelectEngine` and its stages (see ``docs/engine.md``, "Stages"). Every
model goes through the same stages; what differs per model is asked of its adapter in
``autoselect_fast.models``:

1. :meth:`AutoSelectEngine.prepare` (host work): :func:`~autoselect_fast.engine.request.prepare_batch`.
2. :meth:`AutoSelectEngine.encode_images`: pre-projector features of every image, one vision call.
3. :meth:`AutoSelectEngine.prune`: the selector's scores (``autoselect_fast.selectors``: the Scorer by
   default; cached per image) + hard top-K selection per image.
4. :meth:`AutoSelectEngine.pack`: projector on the kept tokens only, LLaVA-NeXT newlines, text
   embeddings, position ids, one varlen batch (``autoselect_fast.packing``).
5. :meth:`AutoSelectEngine.prefill_packed`: the language model over the packed batch with the varlen
   attention backend; ``lm_head`` only on each request's last token.

The engine decides what each stage computes; how the device stages (vision, Scorer + selection,
prefill) execute — eagerly, padded to shape buckets, or as replayed CUDA graphs — is the
:class:`~autoselect_fast.engine.runner.Runner`'s (``engine.runner``; ``docs/engine.md``, "Runner").

:meth:`AutoSelectEngine.prefill` runs 1-5 (with a per-stage timing breakdown when asked);
:meth:`AutoSelectEngine.generate` decodes from the packed prefill's KV cache (``engine.decode``).
An engine may be called from several threads at once (``docs/engine.md``, "Threads").
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import reference
from ..budget import check_budget_args, check_keep_fits, image_budget
from ..caching import LRUCache
from ..models import VLMAdapter, get_adapter
from ..packing import PackedBatch
from ..ragged import cu_seqlens_from_lengths, to_device
from ..reference import POSITION_MODES, Selection
from ..selectors import Selector, SelectorInputs, make_selector
from ..timing import Stopwatch
from ..validation import check_choice, is_int
from .backends import one_at_a_time, resolve_attention, resolve_packer, resolve_selection_backend
from .decode import DEFAULT_READ_EVERY, DecodeRunner, GlobalGenerator, ModelStep, StopRule, check_read_every, decode
from .outputs import GenerateOutput, PrefillOutput, PruneResult, prefill_output
from .request import PreparedBatch, Request, check_max_new_tokens, prepare_batch, stop_set
from .runner import Runner, RunnerConfig
from .sampling import check_sampling, request_generators, sample_next_tokens

DEFAULT_SCORE_CACHE_SIZE = 1024

__all__ = ["AutoSelectEngine", "DEFAULT_SCORE_CACHE_SIZE"]


class AutoSelectEngine:
    """AutoSelect pruning around a LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL model (``autoselect_fast.models``).

    Args:
        model: the transformers model (any device / dtype; put in eval mode by the engine).
        scorer: a :class:`autoselect_fast.modules.Scorer` reading the model's pre-projector features
            (``adapter.feature_dim`` wide; moved to the model's device, features are cast to its dtype).
            Needed by ``selector="scorer"`` unless every token is kept (no ``keep`` / ``keep_ratio``);
            the other selectors ignore it.
        keep: visual tokens to keep per image (K), or ``None``. LLaVA: ``keep > N`` is an error;
            Qwen2.5-VL (N follows the resolution): clipped to N.
        keep_ratio: alternatively a fraction of each image's N: ``K = max(1, round(keep_ratio * N))``.
            With neither, every token is kept (the full model through the same path).
        position_mode: ``"original"`` (kept tokens and later text keep their full-sequence positions)
            or ``"compact"`` (the pruned sequence is renumbered 0, 1, 2, ..., on every M-RoPE row).
        selection_backend: ``"auto"`` | ``"ops"`` | ``"reference"`` (see ``engine.backends.resolve_selection_backend``).
        attention_backend: ``"auto"`` | ``"flash_attn"`` | ``"torch_varlen"`` | ``"sdpa"`` for the packed prefill.
        image_processor: processor for Pillow images; default: the model's processor class built from its config.
        tokenizer: tokenizer (or a processor with ``.tokenizer``) for string prompts.
        score_cache_size: images whose scores are kept (LRU); 0 disables the cache.
        selector: which K tokens an image keeps (``autoselect_fast.selectors``): ``"scorer"`` (the learned
            Scorer, default), ``"random"`` (seeded by ``seed``), ``"norm"``, ``"divprune"``, ``"visionzip"``
            (LLaVA models: Qwen2.5-VL's vision tower has no [CLS] token), or a ``Selector`` instance.
            Every selector keeps the same contract: K tokens per image, original order and positions.
        seed: the ``"random"`` selector's seed.
        cuda_graphs: on CUDA, run the vision, pruning and prefill stages as CUDA graphs replayed per
            shape bucket (``engine.runner``) and decode steps as a CUDA graph per batch-size bucket
            (``engine.decode_stats``); ``False`` keeps the eager path. Ignored on a CPU.
        runner_config: a :class:`~autoselect_fast.engine.runner.RunnerConfig` (buckets, graph limits,
            ``torch.compile``, padding without graphs); ``cuda_graphs=False`` overrides its switch.

    The language model's config is pointed once at a dispatching attention implementation
    (``autoselect_fast.attention.install_dispatch``): the model's own implementation for every ordinary
    call, the varlen backend inside this engine's packed prefill only, decided per call and thread.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: Optional[nn.Module] = None,
        keep: Optional[int] = None,
        *,
        keep_ratio: Optional[float] = None,
        position_mode: str = "original",
        selection_backend: str = "auto",
        attention_backend: str = "auto",
        image_processor=None,
        tokenizer=None,
        score_cache_size: int = DEFAULT_SCORE_CACHE_SIZE,
        selector: Union[str, Selector] = "scorer",
        seed: int = 0,
        cuda_graphs: bool = True,
        runner_config: Optional[RunnerConfig] = None,
    ):
        self.adapter: VLMAdapter = get_adapter(model)
        self.model = model.eval()
        check_budget_args(keep, keep_ratio, required=False)
        check_keep_fits(keep, self.adapter)
        self.keep, self.keep_ratio = keep, keep_ratio
        self.device = self.adapter.device
        if selector == "scorer" and scorer is None and keep is None and keep_ratio is None:
            self.selector: Optional[Selector] = None  # every token is kept: nothing to choose, no Scorer needed
        else:
            self.selector = make_selector(selector, scorer=scorer, seed=seed)
            self.selector.check_model(self.adapter)
            self.selector = self.selector.to(self.device).eval()
        self.scorer = getattr(self.selector, "scorer", None)
        self._scorer_selects = self.selector is not None and self.selector.name == "scorer"
        self.position_mode = check_choice("position_mode", position_mode, POSITION_MODES)
        self.attention_backend = resolve_attention(attention_backend, self.device, self.adapter.language_model)
        self.selection_backend, self.select_fn = resolve_selection_backend(selection_backend, self.device)
        if self.selection_backend == "ops" and os.environ.get("TRITON_INTERPRET") == "1":
            self.select_fn = one_at_a_time(self.select_fn)
        self.packer_backend, self._pack = resolve_packer(self.device)
        self.image_processor = image_processor
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if not is_int(score_cache_size) or score_cache_size < 0:
            raise ValueError(f"score_cache_size must be an int >= 0, got {score_cache_size!r}")
        self.score_cache_size = score_cache_size
        # Image keys (pixel fingerprints) serve the score cache and the seeded random selector only.
        self._needs_image_keys = score_cache_size > 0 or getattr(self.selector, "name", None) == "random"
        self._score_cache: LRUCache[Tensor] = LRUCache(score_cache_size)
        self._lock = threading.Lock()  # guards the score cache, its counters and the lazy image processor
        self.scorer_calls = 0  # calls of the selector (the Scorer by default), one per batch of uncached images
        self.scored_images = 0  # images the selector has scored
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        if runner_config is not None and not isinstance(runner_config, RunnerConfig):
            raise TypeError(f"runner_config must be a RunnerConfig or None, got {type(runner_config).__name__}")
        runner_config = RunnerConfig(cuda_graphs=cuda_graphs) if runner_config is None else runner_config
        if not cuda_graphs:
            runner_config = dataclasses.replace(runner_config, cuda_graphs=False)
        self.runner = Runner(self.adapter, self.attention_backend, runner_config, scorer=self.scorer, select=self.select_fn)
        adapter = self.adapter
        self.decoder = DecodeRunner(ModelStep(adapter.language_model, adapter.embed_tokens, adapter.lm_head, self.runner.cache_kwarg), cuda_graphs=cuda_graphs)

    @property
    def decode_stats(self) -> dict:
        """Decode steps replayed from CUDA graphs and run eagerly, captures, and calls that ran eagerly by reason."""
        return self.decoder.stats.as_dict()

    def budget(self, num_tokens: int) -> int:
        """K for an image of ``num_tokens`` visual tokens (``keep > N``: clipped or ValueError, per model)."""
        return image_budget(num_tokens, self.keep, self.keep_ratio, clip=self.adapter.clips_keep_to_tokens)

    # -- stage 1: host-side preparation ------------------------------------------------------------
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
        return prepare_batch(requests, self.adapter, budget=self.budget, image_processor=self._image_processor, tokenizer=self.tokenizer,
                             fingerprints=self._needs_image_keys)

    # -- stage 2: vision ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: Sequence[Tensor], image_sizes: Optional[Sequence] = None, *, cls_attention: bool = False):
        """Pre-projector features ``(N_i, d_v)`` per image, tokens in sequence order (one vision call).

        ``cls_attention=True``: ``(features, cls_attention)``, with per image the ``(N_i,)`` [CLS] attention
        of the feature layer (what ``selector="visionzip"`` scores by), from the same vision call.
        """
        if not pixel_values:
            return ([], []) if cls_attention else []
        if image_sizes is None:
            image_sizes = [None] * len(pixel_values)
        if cls_attention:
            return self.adapter.encode_with_cls_attention(pixel_values, image_sizes)
        return self.runner.encode(pixel_values, image_sizes)

    # -- stage 3: scores + selection ---------------------------------------------------------------
    @torch.inference_mode()
    def score(self, features: Sequence[Tensor], keys: Optional[Sequence[Optional[Hashable]]] = None, *,
              budgets: Optional[Sequence[int]] = None, cls_attention: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
        """The selector's scores ``(N_i,)`` per image; images whose key is cached skip it (scores are
        prompt-independent; a selector whose scores depend on K is cached per key and K).

        ``budgets`` (K per image; default from ``keep`` / ``keep_ratio``) and ``cls_attention`` (per image,
        from :meth:`encode_images` with ``cls_attention=True``) are read by the selectors that need them.
        """
        if self.selector is None:
            raise ValueError("this engine has no Scorer (scorer=None, selector='scorer'): it keeps every token; give a Scorer "
                             "or a training-free selector to prune")
        keys = [None] * len(features) if keys is None else list(keys)
        if len(keys) != len(features):
            raise ValueError(f"keys must have one entry per image ({len(features)}), got {len(keys)}")
        if budgets is None:
            budgets = [self.budget(f.shape[0]) for f in features]
        if self.selector.budget_dependent:
            keys = [None if key is None else (key, k) for key, k in zip(keys, budgets)]
        with self._score_lock():
            scores: list[Optional[Tensor]] = [None if key is None else self._score_cache.get(key) for key in keys]
        for key, s, f in zip(keys, scores, features):
            if s is not None and s.shape[0] != f.shape[0]:  # a user's image_id reused for an image of another size
                raise ValueError(f"score-cache key {key!r} holds the scores of an image with {s.shape[0]} visual tokens, but this "
                                 f"image has {f.shape[0]}: an image_id must name one image (or leave it None: a pixel hash)")
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing:
            inputs = SelectorInputs(
                features=[features[i] for i in missing], budgets=[budgets[i] for i in missing], keys=[keys[i] for i in missing],
                cls_attention=None if cls_attention is None else [cls_attention[i] for i in missing],
                project=self.adapter.project if self.selector.needs_projection else None,
            )
            fresh = self.selector(inputs)
            with self._score_lock():
                self.scorer_calls += 1
                self.scored_images += len(missing)
                for i, s in zip(missing, fresh):
                    scores[i] = s
                    if keys[i] is not None:
                        self._score_cache.put(keys[i], s)
        return scores

    def _score_lock(self):
        """The score cache's lock; none while torch.compile traces (single-threaded; Dynamo cannot trace a lock)."""
        return contextlib.nullcontext() if torch.compiler.is_compiling() else self._lock

    def clear_score_cache(self) -> None:
        with self._lock:
            self._score_cache.clear()

    @torch.inference_mode()
    def prune(
        self,
        features: Sequence[Tensor],
        budgets: Optional[Sequence[int]] = None,
        *,
        keys: Optional[Sequence[Optional[Hashable]]] = None,
        positions: Optional[Tensor] = None,
        cls_attention: Optional[Sequence[Tensor]] = None,
    ) -> PruneResult:
        """The selector's scores (cached per key) + hard top-K of every image, in one selection call.

        Args:
            features: per image ``(N_i, d_v)`` (from :meth:`encode_images`).
            budgets: K per image; default from the engine's ``keep`` / ``keep_ratio``.
            keys: score-cache key per image (``None``: not cached).
            positions: ``(ΣN,)`` or ``(3, ΣN)`` full-sequence positions of the tokens; default 0..N_i-1 per image.
            cls_attention: per image ``(N_i,)`` [CLS] attention, for ``selector="visionzip"`` (see :meth:`encode_images`).
        """
        if not features:
            return PruneResult.empty(self.device, self.adapter.feature_dim, self.adapter.position_rows)
        if budgets is None:
            budgets = [self.budget(f.shape[0]) for f in features]
        _check_budgets(budgets, features)  # on the host: the selection itself runs without data checks
        device = features[0].device
        host_cu = cu_seqlens_from_lengths([f.shape[0] for f in features])
        cu = to_device(host_cu, device)  # host-built offsets: copied without a synchronisation
        if positions is not None:
            positions = to_device(positions, device)
        if all(k == f.shape[0] for k, f in zip(budgets, features)):
            # Keeping every token needs no scores: this is the unpruned baseline, so the Scorer stays idle.
            if positions is None:
                positions = to_device(reference.default_positions(host_cu), device)
            flat = torch.cat(list(features))
            everything = torch.arange(flat.shape[0], device=device)
            selection = Selection(indices=everything, features=flat, position_ids=positions, cu_seqlens=cu)
            return PruneResult(scores=torch.zeros(flat.shape[0], device=device), token_cu_seqlens=host_cu, selection=selection, budgets=list(budgets))
        # The learned Scorer's selection of equal-sized images runs padded / graphed in the runner.
        captured = self.runner.select(features, budgets, positions) if self._scorer_selects and cls_attention is None else None
        if captured is not None:  # equal N and K: padded / graphed, every image scored (the score cache is not consulted)
            scores, selection = captured
            with self._score_lock():
                self.scorer_calls += 1
                self.scored_images += len(features)
            return PruneResult(scores=scores, token_cu_seqlens=host_cu, selection=selection, budgets=list(budgets))
        flat = torch.cat(list(features))
        scores = torch.cat(self.score(features, keys, budgets=budgets, cls_attention=cls_attention))
        # Budgets go as a host list: ΣK sizes the outputs without reading the device.
        selection = self.select_fn(scores, flat, list(budgets), cu, positions=positions, position_mode="original",
                                 max_seqlen=max(f.shape[0] for f in features))
        return PruneResult(scores=scores, token_cu_seqlens=host_cu, selection=selection, budgets=list(budgets))

    # -- stage 4: projector, embeddings, positions, packing ----------------------------------------
    @torch.inference_mode()
    def pack(self, batch: PreparedBatch, pruned: PruneResult) -> PackedBatch:
        """The packed varlen batch of the pruned sequences (see ``docs/engine.md`` for the positions)."""
        return self._pack_batch(batch, pruned)[0]

    def _pack_batch(self, batch: PreparedBatch, pruned: PruneResult) -> tuple[PackedBatch, list[int]]:
        """The packed batch and, known on the host, each request's packed length."""
        device = self.device
        kept = pruned.kept_indices()
        text_embeds = self.adapter.embed_tokens(to_device(batch.text_ids, device))
        slots, visual = [], []
        if batch.num_images:
            projected = self.adapter.project(pruned.selection.features).split([k.numel() for k in kept])
            for layout, kept_i, proj_i in zip(batch.layouts, kept, projected):
                slots_i, embeds_i = self.adapter.image_slot_embeddings(layout, kept_i, proj_i)
                slots.append(slots_i)
                visual.append(embeds_i)
        text_positions, visual_positions = batch.pruned_positions(slots, self.position_mode, self.adapter.position_rows, device)
        visual_embeds = torch.cat(visual).to(text_embeds.dtype) if visual else text_embeds.new_zeros(0, text_embeds.shape[-1])
        packed = self._pack(
            text_embeds, batch.text_cu_seqlens, to_device(text_positions, device),
            visual_embeds, cu_seqlens_from_lengths([s.numel() for s in slots]), to_device(visual_positions, device),
            batch.image_request, batch.insert_at,
        )
        lengths = batch.text_cu_seqlens.diff().tolist()
        for r, s in zip(batch.image_request.tolist(), slots):
            lengths[r] += s.numel()
        return packed, lengths

    # -- stage 5: LLM prefill over the packed batch ------------------------------------------------
    @torch.inference_mode()
    def prefill_packed(self, packed: PackedBatch, cache=None, *, rows: Optional[Tensor] = None) -> Tensor:
        """Language model over ``packed`` with varlen attention; returns ``(B, vocab)`` last-token logits.

        ``cache`` is filled with the packed keys/values when given: the writer of a decode cache
        (``kv_cache.DecodeCache.prefill_writer``), filled on the runner's padded / graphed path as well
        (``Runner.prefill``), or a transformers ``DynamicCache``, filled on its eager path.
        ``rows``: packed token indices whose logits to return instead of each request's last token (eager).
        """
        return self.runner.prefill(packed, cache, rows=rows)

    # -- end to end --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests: Union[Request, Sequence[Request]], timings: bool = False, *,
                tail_logits: Optional[Sequence[int]] = None) -> PrefillOutput:
        """Pruned prefill of a batch: first-token logits and kept counts.

        ``timings=True`` fills :attr:`PrefillOutput.timings_ms`, synchronising the device around every
        stage; by default nothing synchronises for the sake of timing and ``timings_ms`` is ``{}``.
        ``tail_logits``: per request a count n_r >= 1; :attr:`PrefillOutput.tail_logits` then holds the
        logits of each request's last n_r tokens (scoring a continuation: the lmms-eval model's log-likelihood).
        """
        out, _, _ = self._prefill(requests, timings=timings, tail_logits=tail_logits)
        return out

    def _prefill(self, requests, timings: bool, batch: Optional[PreparedBatch] = None,
                 cache_for: Optional[Callable[[list[int]], Any]] = None,
                 tail_logits: Optional[Sequence[int]] = None) -> tuple[PrefillOutput, PackedBatch, PreparedBatch]:
        """Stages 1-5; ``cache_for(lengths)`` (called between packing and the prefill, outside the timed
        stages) gives the cache the prefill fills."""
        if not isinstance(timings, bool):
            raise TypeError(f"timings must be a bool, got {timings!r}")
        batch = self.prepare(requests) if batch is None else batch
        if tail_logits is not None and (isinstance(tail_logits, (str, Tensor)) or not isinstance(tail_logits, Sequence)
                                        or len(tail_logits) != batch.batch_size or not all(is_int(n) and n >= 1 for n in tail_logits)):
            raise ValueError(f"tail_logits must give one int >= 1 per request ({batch.batch_size}), got {tail_logits!r}")
        # The [CLS] attention is computed only when the selector reads it and some image is pruned.
        wants_cls = (self.selector is not None and self.selector.needs_cls_attention
                     and any(k < layout.num_tokens for k, layout in zip(batch.budgets, batch.layouts)))
        clock = Stopwatch(self.device) if timings else None

        def stage(name: str):
            return clock.stage(name) if clock is not None else contextlib.nullcontext()

        with stage("vision"):
            encoded = self.encode_images(batch.pixel_values, batch.image_sizes, cls_attention=wants_cls)
            features, cls_attention = encoded if wants_cls else (encoded, None)
        with stage("prune"):
            pruned = self.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions, cls_attention=cls_attention)
        with stage("pack"):
            packed, lengths = self._pack_batch(batch, pruned)
        cache = None if cache_for is None else cache_for(lengths)
        rows = tails = None
        if tail_logits is not None:  # rows from the host-known lengths: no device read
            ends = torch.tensor(lengths).cumsum(0).tolist()
            for r, (n, length) in enumerate(zip(tail_logits, lengths)):
                if n > length:
                    raise ValueError(f"tail_logits[{r}] = {n}: request {r} has {length} tokens after pruning")
            rows = torch.cat([torch.arange(e - n, e) for n, e in zip(tail_logits, ends)])
        with stage("prefill"):
            logits = self.prefill_packed(packed, cache, rows=rows)
        if rows is not None:
            tails = list(logits.split(list(tail_logits)))
            logits = torch.stack([t[-1] for t in tails])
        timings_ms = {}
        if clock is not None:
            timings_ms = {**clock.ms, "total": sum(clock.ms.values())}
        output = prefill_output(batch, pruned, packed, lengths, logits, timings_ms)
        output.tail_logits = tails
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
        timings: bool = False,
        read_every: int = DEFAULT_READ_EVERY,
    ) -> GenerateOutput:
        """Decoding after a pruned, packed prefill: the new token ids per request and that prefill.

        Args:
            max_new_tokens: default limit; ``Request.max_new_tokens`` overrides it per request.
            eos_token_id: stop token(s) of every request; ``Request.stop_token_ids`` adds its own. A
                request stops after emitting one of its stop tokens (included in its output).
            do_sample: ``False``: greedy (argmax). ``True``: sample from the logits divided by
                ``temperature``, restricted to the ``top_k`` best (0: all) and the ``top_p`` nucleus.
            seed: every request gets its own generator, seeded with ``Request.seed`` when set, else
                with ``seed + r`` (r: its index in the batch); with neither, torch's global generator
                is used. A request with its own seed samples the same tokens whatever the rest of the batch.
            timings: as for :meth:`prefill` (the prefill's stage times in ``GenerateOutput.prefill``).
            read_every: decode steps between two reads of the "every request finished" flag on the
                host (the decode loop's only synchronisation; the tokens are read once, at the end).

        The prefill writes the kept tokens' keys/values straight into a decode cache sized for this
        batch (``engine.decode``), on the runner's padded / graphed path when the batch fits a bucket;
        decoding continues at each request's largest position + 1 (every M-RoPE row), one more per step.
        """
        check_max_new_tokens("max_new_tokens", max_new_tokens, self.adapter.max_positions)
        eos = stop_set("eos_token_id", eos_token_id, self.adapter.vocab_size)
        check_sampling(do_sample, temperature, top_k, top_p, seed)
        check_read_every(read_every)
        batch = self.prepare(requests)
        rule = StopRule(limits=[m if m is not None else max_new_tokens for m in batch.max_new_tokens],
                        stop_tokens=[eos | own for own in batch.stop_token_ids])
        generators = request_generators(batch.seeds, seed, self.device)
        sample = functools.partial(sample_next_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generators=generators)
        global_generator = GlobalGenerator(self.device) if do_sample and None in generators else None
        held = []

        def decode_cache(lengths: list[int]):
            held.append(self.decoder.acquire(len(lengths), max(lengths) + max(rule.limits)))
            return held[0].cache.prefill_writer(lengths)

        try:
            first, _, _ = self._prefill(requests, timings=timings, batch=batch, cache_for=decode_cache)
            token_ids = decode(held[0], first.logits, first.next_positions, rule, sample, read_every=read_every,
                               global_generator=global_generator)
        finally:
            if held:
                self.decoder.release(held[0])
        return GenerateOutput(token_ids=token_ids, prefill=first)


def _check_budgets(budgets: Sequence[int], features: Sequence[Tensor]) -> None:
    if len(budgets) != len(features):
        raise ValueError(f"budgets must have one entry per image ({len(features)}), got {len(budgets)}")
    for i, (k, f) in enumerate(zip(budgets, features)):
        if not is_int(k) or not 1 <= k <= f.shape[0]:
            raise ValueError(f"budgets[{i}] must be an int with 1 <= K <= {f.shape[0]} (the image's tokens), got {k!r}")
