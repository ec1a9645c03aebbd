"""How the engine's device stages execute: eagerly, padded to shape buckets, or as replayed CUDA graphs.

The engine decides what to compute; this module owns how it runs on the device (``docs/engine.md``,
"Runner"). Three stages go through a :class:`Runner`:

* ``prefill`` (:meth:`Runner.prefill`): the language model over a :class:`~autoselect_fast.packing.PackedBatch`
  and ``lm_head`` on each request's last token. The batch is padded up to a bucket of packed tokens
  (:func:`prefill_bucket_schedule`) and a bucket of requests (:data:`DEFAULT_REQUEST_BUCKETS`) with ONE
  padding segment: its tokens follow the real ones, ``cu_seqlens`` closes it as a segment of its own
  (varlen attention keeps it to itself) and the remaining offsets repeat the bucket size (empty
  segments), so no real token attends to it and every other layer works token by token; its logits
  are never read. ``max_seqlen`` is the token bucket (a bound for any segment of the batch), fixed
  per graph, and ``cu_seqlens`` lives in a device buffer: nothing inside the captured region reads a
  value on the host. The static buffers live in ``engine.prefill_buffers``. ``generate``'s prefill, which
  fills a decode cache (a ``kv_cache.PrefillWriter``), takes this path too, as a shape of its own: the
  step also copies every layer's packed keys/values (padding included) into static
  ``(layers, T_max, Hkv, d)`` buffers, allocated the first time it runs (their size: see
  ``engine.prefill_buffers``), and after the step the writer scatters the real tokens into the decode
  cache (two indexed copies, all layers at once).
* ``vision`` (:meth:`Runner.encode`): the CLIP tower of LLaVA-1.5 / LLaVA-NeXT over a static pixel
  buffer padded to an image-count bucket (tiles for LLaVA-NeXT); every tile is computed on its own,
  so padding tiles change nothing. Models without a fixed-shape tower (Qwen2.5-VL: its patch count
  follows each image's resolution) run their adapter's ``encode`` eagerly.
* ``prune`` (:meth:`Runner.select`): Scorer + hard top-K of a batch whose images all have the same N
  and the same K (LLaVA-1.5 with a fixed budget; a LLaVA-NeXT batch of same-size images), padded to
  the image-count bucket; the budgets live in a device tensor with their sum known on the host, so
  the selection needs no upload inside the graph. Images of different N (dynamic N: LLaVA-NeXT of
  mixed sizes, Qwen2.5-VL) cannot share one static shape: the engine's eager path runs them.

Modes (:attr:`Runner.mode`): ``"graphs"`` on CUDA with ``cuda_graphs=True`` (the default there): one
CUDA graph per shape key, captured on first use (or up front with :meth:`Runner.capture_prefill`: the
prefill shapes without K/V capture) after ``warmup_calls`` eager calls, all graphs sharing one memory
pool, then replayed. ``"padded"``: the same static buffers and padding run eagerly, no graph
(``pad_to_buckets=True`` on a CPU: this is how the padding is tested without a GPU). ``"eager"``:
today's path, nothing padded (``cuda_graphs=False``, or a CPU without ``pad_to_buckets``). A call that does not fit (above the largest bucket, too many requests,
a ``DynamicCache`` to fill, images of different N, ...) runs eagerly and is counted with its reason in
:attr:`Runner.stats`.

Threads: the static buffers and graphs are shared, so copy-in, replay and copy-out of every padded or
graphed call happen under one lock; on CUDA the caller's stream also waits for the previous user's
last copy-out (an event, no host synchronisation), so threads on different streams are safe too.
``torch.compile`` of the padded prefill step (``compile_language_model=True``, off by default) compiles
each bucket's static shape once and is then captured like the plain step.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..attention import PACKED_NO_MASK, install_dispatch, varlen_call
from ..kv_cache import PrefillWriter
from ..packing import PackedBatch
from ..ragged import copy_into, cu_seqlens_from_lengths
from ..reference import Selection
from .buckets import (
    DEFAULT_LARGEST_PREFILL_BUCKET,
    DEFAULT_REQUEST_BUCKETS,
    DEFAULT_VISION_BUCKETS,
    STAGES,
    RunnerConfig,
    StageStats,
    bucket_for,
    prefill_bucket_schedule,
)
from .prefill_buffers import PrefillBuffers, fill_inputs

__all__ = [
    "DEFAULT_LARGEST_PREFILL_BUCKET", "DEFAULT_REQUEST_BUCKETS", "DEFAULT_VISION_BUCKETS", "RunnerConfig", "StageStats", "Runner", "prefill_bucket_schedule", "bucket_for",
    "capture_graph"]

@dataclass
class _Slot:
    """One shape key of a stage: its static inputs, and once captured its graph and static output."""

    inputs: dict
    graph: Any = None
    output: Any = None
    failed: Optional[str] = None


def capture_graph(step: Callable[[], Any], device: torch.device, *, pool=None, warmup_calls: int = 2):
    """``(graph, static output)`` of ``step`` captured after ``warmup_calls`` eager calls on a side stream (library
    handles, Triton/Inductor compilation); ``pool``: shared with other graphs. Other threads may use CUDA meanwhile."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the capture
        for _ in range(warmup_calls):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph := torch.cuda.CUDAGraph(), pool=pool, capture_error_mode="thread_local"):
        output = step()
    return graph, output


def _map_tensors(fn: Callable[[Tensor], Tensor], value):
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Selection):
        return Selection(*(_map_tensors(fn, getattr(value, name)) for name in ("indices", "features", "position_ids", "cu_seqlens")))
    if isinstance(value, tuple):
        return tuple(_map_tensors(fn, v) for v in value)
    return value


class Runner:
    """Runs the prefill, vision and pruning stages of one model (see the module docstring).

    Args:
        adapter: the model's :class:`~autoselect_fast.models.VLMAdapter`.
        attention_backend: the resolved varlen backend of the packed prefill (``attention.resolve_backend``).
        config: a :class:`RunnerConfig` (default: graphs on CUDA, eager elsewhere).
        scorer: the Scorer (needed by :meth:`select`).
        select: the selection function, called as the engine calls it
            (``select(scores, features, k, cu_seqlens, positions=, position_mode=, total_k=, max_seqlen=)``).
    """

    def __init__(self, adapter, attention_backend: str, config: Optional[RunnerConfig] = None, *,
                 scorer: Optional[torch.nn.Module] = None, select: Optional[Callable[..., Selection]] = None):
        config = RunnerConfig() if config is None else config
        if not isinstance(config, RunnerConfig):
            raise TypeError(f"config must be a RunnerConfig, got {type(config).__name__}")
        self.adapter, self.config, self.attention_backend = adapter, config, attention_backend
        self.scorer, self._select = scorer, select
        self.device = adapter.device
        on_cuda = self.device.type == "cuda"
        self.graphs = config.cuda_graphs and on_cuda
        if self.graphs and config.pad_to_buckets is False:
            raise ValueError("pad_to_buckets=False needs cuda_graphs=False on CUDA: a CUDA graph replays fixed shapes, so graphed batches are always padded")
        self.padded = self.graphs if config.pad_to_buckets is None else config.pad_to_buckets
        self.mode = "graphs" if self.graphs else "padded" if self.padded else "eager"
        self._eager_reason = "graphs_off" if not config.cuda_graphs else "not_cuda"
        self.stats: dict[str, StageStats] = {stage: StageStats() for stage in STAGES}
        self._stats_lock = threading.Lock()
        self._lock = threading.Lock()  # static buffers, slots and graphs: one user at a time
        self._slots: dict[str, dict[Hashable, _Slot]] = {stage: {} for stage in STAGES}
        self._pool = None
        self._last_use = None  # CUDA event recorded after each padded call's copy-out
        self._prefill_buffers: Optional[PrefillBuffers] = None  # allocated by the first padded prefill
        lm = adapter.language_model
        #: the language model's cache argument: renamed from past_key_values to cache in transformers 5.2x
        self.cache_kwarg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        self._padded_logits = self._language_model_logits
        if config.compile_language_model:
            self._padded_logits = torch.compile(self._language_model_logits, dynamic=False, **config.compile_options)

    # ---------------------------------------------------------------------------------------------
    # Bookkeeping
    # ---------------------------------------------------------------------------------------------
    def stats_dict(self) -> dict:
        with self._stats_lock:
            return {stage: s.as_dict() for stage, s in self.stats.items()}

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.stats = {stage: StageStats() for stage in STAGES}

    def _count(self, stage: str, what: str, reason: Optional[str] = None) -> None:
        if torch.compiler.is_compiling():  # a traced engine stage (tests/test_host_sync.py): nothing runs, nothing to count
            return
        with self._stats_lock:
            stats = self.stats[stage]
            if what == "eager":
                stats.eager[reason] += 1
            else:
                setattr(stats, what, getattr(stats, what) + 1)

    def _unpaddable(self) -> Optional[str]:
        """Why no call can be padded / graphed right now (``None``: it can).

        Besides the mode: a graph replay under a Python dispatch mode (``torch.utils.flop_counter.FlopCounterMode``,
        as the report counts FLOPs) would hide every operation, so with graphs such calls take the eager
        path. The padded mode runs every operation in Python and stays padded (what it runs is counted)."""
        if not self.padded:
            return self._eager_reason
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        return "dispatch_mode" if self.graphs and _get_current_dispatch_mode() is not None else None

    def static_tensors(self) -> list[Tensor]:
        """Every static buffer (and view of one) the padded / graphed calls read and write, for inspection."""
        with self._lock:
            out = self._prefill_buffers.tensors() if self._prefill_buffers is not None else []
            for slots in self._slots.values():
                out.extend(v for slot in slots.values() for v in slot.inputs.values() if isinstance(v, Tensor))
        return out

    def graph_count(self, stage: str) -> int:
        """Graphs captured so far for ``stage``."""
        return sum(slot.graph is not None for slot in self._slots[stage].values())

    def _begin(self) -> None:
        """Order this call after the previous user's copy-out, on whatever stream each thread uses."""
        if self.device.type == "cuda" and self._last_use is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_use)

    def _end(self) -> None:
        if self.device.type == "cuda":
            if self._last_use is None:
                self._last_use = torch.cuda.Event()
            self._last_use.record(torch.cuda.current_stream(self.device))

    def _run_slot(self, stage: str, key: Hashable, slot: _Slot, step: Callable[[], Any]):
        """Run ``step`` (reading ``slot``'s static inputs): replay its graph (capturing it first), or call it.

        Returns ``(output, graphed)``; a graphed output is the graph's static tensors (copy before the
        next call). Called with the runner lock held.
        """
        if not self.graphs:
            self._count(stage, "padded")
            return step(), False
        if slot.graph is None and slot.failed is None:
            if self.graph_count(stage) >= self.config.max_graphs:
                self._count(stage, "eager", "graph_limit")
                return step(), False
            try:
                slot.graph, slot.output = self._capture(step)
            except Exception as exc:  # noqa: BLE001 - said loudly, counted, and this shape stays eager
                slot.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                warnings.warn(f"runner: CUDA-graph capture of the {stage} stage at shape {key} failed; that shape runs eagerly from now on ({slot.failed})",
                              RuntimeWarning, stacklevel=3)
            else:
                self._count(stage, "captures")
        if slot.failed is not None:
            self._count(stage, "eager", "capture_failed")
            return step(), False
        slot.graph.replay()
        self._count(stage, "graph_replays")
        return slot.output, True

    def _capture(self, step: Callable[[], Any]):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return capture_graph(step, self.device, pool=self._pool, warmup_calls=self.config.warmup_calls)

    # ---------------------------------------------------------------------------------------------
    # Prefill
    # ---------------------------------------------------------------------------------------------
    def _language_model_logits(self, embeds: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                               last_token_index: Tensor, cache=None) -> Tensor:
        """The language model over one packed sequence, ``lm_head`` on the given rows: the one home of this call."""
        lm = self.adapter.language_model
        cache_kwargs = {self.cache_kwarg: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        hidden = lm(
            inputs_embeds=embeds[None],
            position_ids=position_ids.unsqueeze(-2),  # (1, T), or (3, 1, T) for M-RoPE
            attention_mask=PACKED_NO_MASK,  # no mask, and none built (see attention.PACKED_NO_MASK)
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=max_seqlen,
            max_length_k=max_seqlen,
            **cache_kwargs,
        ).last_hidden_state
        return self.adapter.lm_head(hidden[0, last_token_index])

    @torch.inference_mode()
    def prefill(self, packed: PackedBatch, cache=None, rows: Optional[Tensor] = None) -> Tensor:
        """``(B, vocab)`` last-token logits of ``packed``; ``rows``: packed token indices whose logits to
        return instead (eager, counted as ``rows``).

        ``cache``: a decode cache's writer (``kv_cache.PrefillWriter``, what ``generate`` gives) is filled
        on the padded / graphed path too: the step captures every layer's keys/values into static buffers
        (``engine.prefill_buffers``, allocated on first use) and the writer scatters the real tokens' rows
        after it. Any other cache (a ``DynamicCache``) is filled eagerly (counted as ``kv_cache``).

        Padded / graphed when the batch fits a token bucket and a request bucket; otherwise the eager
        path, counted with its reason in ``stats["prefill"]``.
        """
        install_dispatch(self.adapter.language_model.config)  # a no-op unless the model's implementation was switched since
        tokens, requests = packed.embeds.shape[0], packed.cu_seqlens.numel() - 1
        writer = cache if isinstance(cache, PrefillWriter) else None
        if writer is not None and writer.tokens != tokens:
            raise ValueError(f"the decode cache writer places {writer.tokens} tokens, the packed batch has {tokens}")
        reason = (self._unpaddable() or ("kv_cache" if cache is not None and writer is None else None)
                  or ("rows" if rows is not None else None))
        token_bucket = bucket_for(tokens, self.config.prefill_buckets)
        request_bucket = bucket_for(requests, self.config.request_buckets)
        if reason is None and token_bucket is None:
            reason = "above_largest_bucket"
        if reason is None and request_bucket is None:
            reason = "too_many_requests"
        if reason is not None:
            self._count("prefill", "eager", reason)
            return self._eager_prefill(packed, cache, rows)
        with self._lock:
            self._begin()
            key = (token_bucket, request_bucket) + (("kv",) if writer is not None else ())  # generate's shapes: a graph of their own
            slot = self._prefill_slot(packed, key, writer)
            fill_inputs(slot.inputs, packed)
            out, graphed = self._run_slot("prefill", key, slot, functools.partial(self._prefill_step, slot))
            logits = out[:requests].clone() if graphed else out[:requests]
            if writer is not None:  # outside the graph: the real tokens' keys/values into the decode cache
                writer.scatter(self._prefill_buffers.keys, self._prefill_buffers.values)
            self._end()
        return logits

    def _eager_prefill(self, packed: PackedBatch, cache, rows: Optional[Tensor] = None) -> Tensor:
        cu = packed.cu_seqlens.to(device=self.device, dtype=torch.int32)
        rows = packed.last_token_index if rows is None else rows
        with varlen_call(self.attention_backend):
            return self._language_model_logits(packed.embeds, packed.position_ids, cu, packed.max_seqlen,
                                               rows.to(self.device), cache)

    def _prefill_step(self, slot: _Slot) -> Tensor:
        s = slot.inputs
        with varlen_call(self.attention_backend), self._compile_limit():
            return self._padded_logits(s["embeds"], s["positions"], s["cu_seqlens"], s["max_seqlen"], s["last"], s.get("kv"))

    def _compile_limit(self):
        """With ``compile_language_model``: room for one compiled graph per prefill shape, with and without
        K/V capture (Dynamo's default limit of 8 recompilations would silently send later buckets to eager)."""
        if not self.config.compile_language_model:
            return contextlib.nullcontext()
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        shapes = 2 * len(self.config.prefill_buckets) * len(self.config.request_buckets)
        return dynamo_config.patch(**{name: max(getattr(dynamo_config, name), shapes + 8)})

    def _prefill_slot(self, packed: PackedBatch, key: tuple, writer: Optional[PrefillWriter]) -> _Slot:
        """The static inputs of one (token bucket, request bucket[, "kv"]): views of buffers shared by every shape."""
        token_bucket, request_bucket = key[:2]
        if self._prefill_buffers is None:
            self._prefill_buffers = PrefillBuffers(self.config.prefill_buckets[-1], self.config.request_buckets[-1], packed.embeds.shape[1],
                                                   packed.embeds.dtype, self.adapter.position_rows, self.device)
        buffers = self._prefill_buffers
        buffers.check(packed)
        capture = None if writer is None else buffers.kv(writer.cache, token_bucket)  # checks the cache's shapes every call
        slots = self._slots["prefill"]
        if key not in slots:
            inputs = buffers.inputs(token_bucket, request_bucket)
            if capture is not None:
                inputs["kv"] = capture
            slots[key] = _Slot(inputs)
        return slots[key]

    def prefill_kv_bytes(self) -> int:
        """Bytes of the prefill's K/V capture buffers: 0 until ``generate`` first takes the padded / graphed path."""
        return 0 if self._prefill_buffers is None else self._prefill_buffers.kv_bytes()

    def capture_prefill(self, token_buckets: Optional[Sequence[int]] = None, request_buckets: Optional[Sequence[int]] = None, *,
                        hidden_size: Optional[int] = None) -> int:
        """Capture the prefill graphs of these buckets now (default: all), largest first; returns how many were new.

        Capturing up front keeps captures out of served calls and sizes the shared memory pool once.
        Runs a dummy batch of one request per shape; does nothing outside the ``"graphs"`` mode.
        """
        if not self.graphs:
            return 0
        lm = self.adapter.language_model
        hidden = hidden_size or int(lm.config.hidden_size)
        dtype = self.adapter.embed_tokens.weight.dtype
        rows = self.adapter.position_rows
        before = self.graph_count("prefill")
        for tokens in sorted(token_buckets or self.config.prefill_buckets, reverse=True):
            for requests in sorted(request_buckets or self.config.request_buckets, reverse=True):
                if requests > tokens:
                    continue
                bounds = torch.linspace(0, tokens, requests + 1).round().long()
                dummy = PackedBatch(
                    embeds=torch.zeros(tokens, hidden, dtype=dtype, device=self.device),
                    cu_seqlens=bounds.to(torch.int32),
                    max_seqlen=int(bounds.diff().max()),
                    position_ids=torch.zeros(tokens, dtype=torch.int64) if rows == 1 else torch.zeros(rows, tokens, dtype=torch.int64),
                    last_token_index=bounds[1:] - 1,
                )
                self.prefill(dummy)
        return self.graph_count("prefill") - before

    # ---------------------------------------------------------------------------------------------
    # Vision
    # ---------------------------------------------------------------------------------------------
    def vision_graphable(self) -> bool:
        """True when the model's vision tower has a fixed input shape per tile (the LLaVA family)."""
        return callable(getattr(self.adapter, "tower_input", None)) and callable(getattr(self.adapter, "image_features", None))

    @torch.inference_mode()
    def encode(self, pixel_values: Sequence[Tensor], image_sizes: Sequence[Any]) -> list[Tensor]:
        """Pre-projector features per image, as ``adapter.encode``; the tower padded / graphed per image-count bucket."""
        adapter = self.adapter
        reason = self._unpaddable() or (None if self.vision_graphable() else "model_not_graphable")
        if reason is not None:
            self._count("vision", "eager", reason)
            return adapter.encode(pixel_values, image_sizes)
        batch = adapter.tower_input(pixel_values)
        count = batch.shape[0]
        bucket = bucket_for(count, self.config.vision_buckets)
        if bucket is None:
            self._count("vision", "eager", "above_largest_bucket")
            return adapter.encode(pixel_values, image_sizes)
        with self._lock:
            self._begin()
            slot = self._vision_slot(batch, bucket)
            copy_into(slot.inputs["pixels"][:count], batch)
            step = functools.partial(adapter.tower_features, slot.inputs["pixels"])
            out, graphed = self._run_slot("vision", bucket, slot, step)
            features = out[:count].clone() if graphed else out[:count]
            self._end()
        return adapter.image_features(features, image_sizes)

    def _vision_slot(self, batch: Tensor, bucket: int) -> _Slot:
        slots = self._slots["vision"]
        if bucket not in slots:
            # one pixel buffer for every bucket (views of it): sized by the largest bucket
            shared = next(iter(slots.values())).inputs["buffer"] if slots else None
            if shared is None:
                dtype = next(self.adapter.inner.vision_tower.parameters()).dtype
                shared = torch.zeros((self.config.vision_buckets[-1],) + tuple(batch.shape[1:]), dtype=dtype, device=self.device)
            slots[bucket] = _Slot({"buffer": shared, "pixels": shared[:bucket]})
        slot = slots[bucket]
        if tuple(batch.shape[1:]) != tuple(slot.inputs["buffer"].shape[1:]):
            raise ValueError(f"pixel_values tiles must have shape {tuple(slot.inputs['buffer'].shape[1:])} as earlier batches, got {tuple(batch.shape[1:])}")
        return slot

    # ---------------------------------------------------------------------------------------------
    # Pruning: Scorer + selection
    # ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def select(self, features: Sequence[Tensor], budgets: Sequence[int], positions: Optional[Tensor] = None) -> Optional[tuple[Tensor, Selection]]:
        """Scores ``(ΣN,)`` and the selection of K tokens per image, padded / graphed, or ``None``.

        ``None`` (counted with its reason) tells the engine to run its own eager path: eager mode,
        images of different N (dynamic N), different budgets, or more images than the largest bucket.
        The Scorer scores every image here: the engine's score cache is not consulted on this path.
        ``positions``: ``(ΣN,)`` or ``(3, ΣN)`` full-sequence positions (default 0..N-1 per image).
        """
        if self.scorer is None or self._select is None:
            raise ValueError("Runner.select needs the scorer and select function given to the Runner")
        reason = self._unpaddable()
        if reason is not None:
            self._count("prune", "eager", reason)
            return None
        count = len(features)
        bucket = bucket_for(count, self.config.vision_buckets)
        reason = ("dynamic_n" if len({f.shape[0] for f in features}) != 1 else "unequal_budgets" if len(set(budgets)) != 1
                  else "above_largest_bucket" if bucket is None else None)
        if reason is not None:
            self._count("prune", "eager", reason)
            return None
        n, k = features[0].shape[0], int(budgets[0])
        with self._lock:
            self._begin()
            slot = self._prune_slot(features[0], bucket, n, k)
            s = slot.inputs
            torch.cat(list(features), out=s["features"][:count * n])
            if positions is None:
                positions = reference.default_positions(cu_seqlens_from_lengths([n] * count))
            copy_into(s["positions"][..., :count * n], positions.reshape(s["positions"].shape[:-1] + (count * n,)))
            out, graphed = self._run_slot("prune", (bucket, n, k), slot, functools.partial(self._prune_step, slot))
            scores, sel = out
            keep = count * k
            result = (scores[:count * n], Selection(sel.indices[:keep], sel.features[:keep], sel.position_ids[..., :keep], sel.cu_seqlens[:count + 1]))
            if graphed:
                result = _map_tensors(torch.clone, result)
            self._end()
        return result

    def _prune_slot(self, example: Tensor, bucket: int, n: int, k: int) -> _Slot:
        slots = self._slots["prune"]
        key = (bucket, n, k)
        if key not in slots:
            rows, device = self.adapter.position_rows, self.device
            positions = torch.zeros(rows, bucket * n, dtype=torch.int64, device=device)
            slots[key] = _Slot({
                "features": torch.zeros(bucket * n, example.shape[-1], dtype=example.dtype, device=device),
                "positions": positions[0] if rows == 1 else positions,
                "cu_seqlens": torch.arange(0, (bucket + 1) * n, n, dtype=torch.int64, device=device),
                "budgets": torch.full((bucket,), k, dtype=torch.int64, device=device),  # a device tensor + total_k: no upload in the graph
                "bucket": bucket, "n": n, "k": k,
            })
        return slots[key]

    def _prune_step(self, slot: _Slot) -> tuple[Tensor, Selection]:
        s = slot.inputs
        dtype = next(self.scorer.parameters()).dtype
        flat = s["features"]
        scores = self.scorer(flat.to(dtype).view(s["bucket"], s["n"], flat.shape[-1])).reshape(-1).float()
        selection = self._select(scores, flat, s["budgets"], s["cu_seqlens"], positions=s["positions"], position_mode="original",
                                 total_k=s["bucket"] * s["k"], max_seqlen=s["n"])
        return scores, selection
