"""The inference engine: pruned, packed prefill and generation on LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL.

One module per concern (``docs/engine.md``, "Layout"):

* ``request``: :class:`Request`, :class:`ImageInput`, prompt checks and :func:`prepare_batch` (stage 1);
* ``backends``: the selection, packer and attention backends, each resolved once with a smoke test;
* ``sampling``: greedy / temperature, top-k, top-p choice of the next token;
* ``decode``: the decode loop over a static KV cache the prefill fills (CUDA graphs per batch-size bucket);
* ``outputs``: what the stages return (:class:`PruneResult`, :class:`PrefillOutput`, :class:`GenerateOutput`);
* ``engine``: :class:`AutoSelectEngine` and its stages;
* ``runner``: how the device stages execute (eager, padded to buckets, CUDA graphs): :class:`Runner`;
* ``prefill_buffers``: the static buffers of the runner's padded / graphed prefill (and its K/V capture for ``generate``).
"""
from .backends import SELECTION_BACKENDS, resolve_attention, resolve_packer, resolve_selection_backend
from .engine import DEFAULT_SCORE_CACHE_SIZE, AutoSelectEngine
from .outputs import GenerateOutput, PrefillOutput, PruneResult
from .request import ImageInput, PreparedBatch, Prompt, Request, build_requests, prepare_batch
from .runner import Runner, RunnerConfig, prefill_bucket_schedule
from .sampling import filter_logits, sample_next_tokens

__all__ = [
    "AutoSelectEngine",
    "Request",
    "ImageInput",
    "Prompt",
    "PreparedBatch",
    "PruneResult",
    "PrefillOutput",
    "GenerateOutput",
    "build_requests",
    "prepare_batch",
    "filter_logits",
    "sample_next_tokens",
    "SELECTION_BACKENDS",
    "DEFAULT_SCORE_CACHE_SIZE",
    "resolve_selection_backend",
    "resolve_packer",
    "resolve_attention",
    "Runner",
    "RunnerConfig",
    "prefill_bucket_schedule",
]
