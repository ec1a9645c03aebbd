"""Varlen (packed, block-diagonal causal) attention and its registration in transformers.

This module owns the attention the engine's packed prefill runs (DESIGN.md section 5): several
requests are concatenated into one sequence of T tokens, ``cu_seqlens`` marks where each request
starts, and every token attends causally to the tokens of its own request only.

Backends, in order of preference for ``backend="auto"``:

* ``"flash_attn"``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, when installed);
* ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.9). Its
  keyword arguments changed between releases (causal is ``window_size=(-1, 0)`` from 2.10 on,
  ``is_causal=True`` before; ``enable_gqa`` is not in every release), so they are chosen from its
  signature at run time;
* ``"sdpa"``: a loop over the segments with ``F.scaled_dot_product_attention`` on 4-D views (any
  device, any dtype). On CPU this takes torch's flash-attention CPU kernel (GQA without expanding
  K/V), as fast as transformers' own ``sdpa`` attention on the same tokens; on CUDA it is restricted
  to the fused kernels and ``"auto"`` only lands on it with a warning.

Causality when a segment has more keys than queries follows FlashAttention: the mask is aligned to
the bottom right (query i of Lq sees keys 0..Lk-Lq+i). Grouped-query attention (fewer key/value heads
than query heads) is handled by every backend.

transformers integration: :func:`register_varlen_attention` registers one attention function per
backend with ``transformers.AttentionInterface.register`` (names in :data:`REGISTERED_NAMES`). The
model's attention modules call it as ``fn(module, query, key, value, attention_mask, scaling=...,
dropout=..., **kwargs)`` with query ``(1, Hq, T, d)`` and key/value ``(1, Hkv, T, d)`` and expect
``((1, T, Hq, d), None)``; the segment boundaries arrive in the kwargs ``cu_seq_lens_q/k`` and
``max_length_q/k``, which the language model's ``forward(**kwargs)`` hands down unchanged through
every decoder layer (transformers 5.x, e.g. ``LlamaModel`` -> ``LlamaDecoderLayer`` ->
``LlamaAttention``). A name transformers has no mask function for makes ``create_causal_mask`` return
``None``, so no dense (T, T) mask is built.

Thread safety (what the engine uses): :func:`install_dispatch` points a language model's config, once,
at a *dispatching* implementation registered under ``autoselect_dispatch|<original>``. Per call it runs
the varlen backend when the calling thread is inside :func:`varlen_call` (a ``ContextVar``, so every
thread and asyncio task has its own), inside :func:`attention_call` the function it was given (the
engine's decode steps: ``autoselect_fast.kv_cache.decode_attention``), and the model's original
implementation (``sdpa``, ``eager``, ...) otherwise, with the original's mask function. Nothing is
switched during a call, so concurrent packed prefills and plain calls of the wrapped model do not interfere.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import threading
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import INT_DTYPES, check_choice, check_cu_seqlens, check_tensor

ATTENTION_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")
# transformers attention-implementation name of each backend.
REGISTERED_NAMES = {
    "auto": "autoselect_varlen",
    "flash_attn": "autoselect_varlen_flash_attn",
    "torch_varlen": "autoselect_varlen_torch",
    "sdpa": "autoselect_varlen_sdpa",
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Which backends can run here
# --------------------------------------------------------------------------------------------------
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=1)
def _torch_varlen_fn():
    """``torch.nn.attention.varlen.varlen_attn`` or ``None`` when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def backend_unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``None`` when ``backend`` can run on ``device``/``dtype``, otherwise why not (for messages and skips)."""
    check_choice("backend", backend, ATTENTION_BACKENDS[1:])
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"{backend} needs a CUDA device, got {device}"
    if dtype not in _HALF_DTYPES:
        return f"{backend} needs float16 or bfloat16, got {dtype}"
    if backend == "flash_attn" and not flash_attn_installed():
        return "flash-attn is not installed"
    if backend == "torch_varlen" and _torch_varlen_fn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ``backend`` stands for on ``device``/``dtype``; raises if it cannot run there."""
    check_choice("attention_backend", backend, ATTENTION_BACKENDS)
    if backend == "auto":
        reasons = {}
        for candidate in ("flash_attn", "torch_varlen"):
            reasons[candidate] = backend_unavailable_reason(candidate, device, dtype)
            if reasons[candidate] is None:
                return candidate
        if device.type == "cuda":
            _warn_sdpa_on_cuda(dtype, "; ".join(f"{name}: {why}" for name, why in reasons.items()))
        return "sdpa"
    reason = backend_unavailable_reason(backend, device, dtype)
    if reason is not None:
        raise ValueError(f"attention_backend={backend!r} cannot run here: {reason}; allowed here: 'auto' or 'sdpa'")
    return backend


@lru_cache(maxsize=None)
def _warn_sdpa_on_cuda(dtype: torch.dtype, reasons: str) -> None:
    """Say once per dtype that ``auto`` on CUDA fell back to the per-segment SDPA loop (slower than a varlen kernel)."""
    warnings.warn(
        f"attention_backend='auto' on CUDA in {dtype} uses the per-segment SDPA loop (one fused SDPA call per request "
        f"and layer, never the math kernel), not a varlen kernel: {reasons}. For the fast path install flash-attn or "
        "run the model in float16/bfloat16 on torch >= 2.9; pass attention_backend='sdpa' to choose this path explicitly.",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------------
# The op on packed (T, H, d) tensors
# --------------------------------------------------------------------------------------------------
def varlen_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Causal attention within each segment of a packed batch.

    Args:
        query: ``(Tq, Hq, d)``; key, value: ``(Tk, Hkv, d)`` with ``Hq % Hkv == 0`` (GQA).
        cu_seqlens_q / cu_seqlens_k: ``(B+1,)`` int32/int64 segment offsets (``k`` defaults to ``q``).
        max_seqlen_q / max_seqlen_k: longest segment (computed when omitted; pass them to avoid a sync).
        scale: softmax scale, default ``d ** -0.5``.
        backend: one of :data:`ATTENTION_BACKENDS`.
    Returns:
        ``(Tq, Hq, d)`` in the dtype of ``query``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, ndim=3)
    if key.shape != value.shape:
        raise ValueError(f"key and value must have one shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query (Tq, Hq, d) and key (Tk, Hkv, d) need the same d and Hq divisible by Hkv, "
            f"got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INT_DTYPES)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=INT_DTYPES)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (B+1), got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = resolve_backend(backend, query.device, query.dtype)
    if chosen == "flash_attn":
        return _flash_attn(query, key, value, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale)
    if chosen == "torch_varlen":
        return _torch_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale)
    return _sdpa_segments(query, key, value, cu_seqlens_q, cu_seqlens_k, scale)


def _sdpa_segments(query: Tensor, key: Tensor, value: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """One ``scaled_dot_product_attention`` per segment, on 4-D ``(1, H, L, d)`` views (no copies).

    Why 4-D: torch 2.13 on CPU dispatches 3-D ``(H, L, d)`` inputs to the slow "math" kernel
    (``_scaled_dot_product_attention_math``, 5-10x slower), 4-D ones to
    ``_scaled_dot_product_flash_attention_for_cpu``, which also takes GQA (``enable_gqa``) and a
    boolean mask without expanding K/V. The flash kernels also need a unit stride on ``d``.
    On CUDA the call is restricted to the fused kernels (:func:`_no_math_sdpa`), so an input they
    cannot take raises instead of silently running the math kernel.
    """
    bounds_q = check_cu_seqlens(cu_q, query.shape[0], name="cu_seqlens_q").tolist()
    bounds_k = check_cu_seqlens(cu_k, key.shape[0], name="cu_seqlens_k").tolist()
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    gqa = query.shape[1] != key.shape[1]
    segments = len(bounds_q) - 1
    out = None if segments == 1 else torch.empty_like(query)
    with _no_math_sdpa(query.device):
        for b in range(segments):
            qs, qe, ks, ke = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
            lq, lk = qe - qs, ke - ks
            if lq > lk:
                raise ValueError(f"segment {b} has {lq} queries but only {lk} keys; causal varlen attention needs Lq <= Lk")
            q, k, v = (t[s:e].transpose(0, 1)[None] for t, s, e in ((query, qs, qe), (key, ks, ke), (value, ks, ke)))  # (1, H, L, d)
            if lq == lk:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            else:  # bottom-right aligned causal mask, as FlashAttention
                mask = torch.arange(lq, device=q.device)[:, None] + (lk - lq) >= torch.arange(lk, device=q.device)[None, :]
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
            o = o[0].transpose(0, 1)  # (L, H, d)
            if out is None:
                return o
            out[qs:qe] = o
    return out


@contextmanager
def _no_math_sdpa(device: torch.device):
    """On CUDA, allow only the fused SDPA kernels (flash, memory-efficient, cuDNN): no silent math fallback."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            yield
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
        raise RuntimeError(
            "attention_backend='sdpa' on CUDA: no fused scaled_dot_product_attention kernel takes these inputs, and the "
            f"slow math kernel is not used silently ({exc}); use fp16/bf16 with a head dim the flash kernels support"
        ) from exc


def _flash_attn(query, key, value, cu_q, cu_k, max_q, max_k, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
        dropout_p=0.0, softmax_scale=scale, causal=True,
    )


@lru_cache(maxsize=1)
def _torch_varlen_params() -> frozenset:
    return frozenset(inspect.signature(_torch_varlen_fn()).parameters)


def _torch_varlen(query, key, value, cu_q, cu_k, max_q, max_k, scale):
    fn, params = _torch_varlen_fn(), _torch_varlen_params()
    kwargs = {"scale": scale}
    if "window_size" in params:  # torch >= 2.10
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:  # torch 2.9
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(f"torch {torch.__version__}: varlen_attn has neither window_size nor is_causal; cannot ask it for causal attention")
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return fn(query, key, value, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **kwargs)


# --------------------------------------------------------------------------------------------------
# transformers AttentionInterface functions
# --------------------------------------------------------------------------------------------------
def _make_attention_function(backend: str):
    def attention_function(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        cu_seq_lens_q: Optional[Tensor] = None,
        cu_seq_lens_k: Optional[Tensor] = None,
        max_length_q: Optional[int] = None,
        max_length_k: Optional[int] = None,
        **kwargs,
    ) -> tuple[Tensor, None]:
        name = REGISTERED_NAMES[backend]
        if cu_seq_lens_q is None or cu_seq_lens_k is None:
            raise ValueError(
                f"attention implementation {name!r} needs explicit cu_seq_lens_q and cu_seq_lens_k (and "
                "max_length_q/k) in the model call; it never infers segments from masks or position ids"
            )
        if query.shape[0] != 1:
            raise ValueError(f"attention implementation {name!r} expects one packed sequence (batch 1), got query of shape {tuple(query.shape)}")
        if attention_mask is not None and attention_mask is not PACKED_NO_MASK:
            raise ValueError(f"attention implementation {name!r} takes no attention_mask (segments come from cu_seq_lens), call the model with attention_mask=None or PACKED_NO_MASK")
        if dropout:
            raise ValueError(f"attention implementation {name!r} is for inference and has no dropout, got dropout={dropout}")
        if kwargs.get("softcap") is not None:
            raise ValueError(f"attention implementation {name!r} does not support softcap")
        window = kwargs.get("sliding_window")
        longest = max_length_k if max_length_k is not None else key.shape[2]
        if window is not None and int(longest) > int(window):
            raise ValueError(f"attention implementation {name!r} has no sliding window; segments of {int(longest)} tokens exceed sliding_window={window}")
        out = varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling, backend=backend,
        )
        return out.unsqueeze(0), None  # (1, T, Hq, d), no attention weights

    attention_function.__name__ = f"varlen_attention_{backend}"
    return attention_function


def register_varlen_attention() -> dict[str, str]:
    """Register every backend with ``transformers.AttentionInterface`` (idempotent). Returns backend -> name."""
    from transformers import AttentionInterface

    for backend, name in REGISTERED_NAMES.items():
        AttentionInterface.register(name, _ATTENTION_FUNCTIONS[backend])
    return dict(REGISTERED_NAMES)


_ATTENTION_FUNCTIONS = {backend: _make_attention_function(backend) for backend in REGISTERED_NAMES}


# --------------------------------------------------------------------------------------------------
# Per-call dispatch: varlen inside varlen_call(), the model's own implementation otherwise
# --------------------------------------------------------------------------------------------------
DISPATCH_PREFIX = "autoselect_dispatch|"
#: The ``attention_mask`` a packed varlen call passes to the language model: transformers returns a
#: 4-D mask as it is, so its mask creation never runs, in particular not its packed-sequence detection,
#: which reads the position ids on the host (a device sync). The varlen functions read it as "no mask".
PACKED_NO_MASK = torch.zeros(1, 1, 0, 0, dtype=torch.bool)
_CALL_ATTENTION: ContextVar[Optional[Callable]] = ContextVar("autoselect_call_attention", default=None)
_DISPATCH_LOCK = threading.Lock()


@contextmanager
def attention_call(function: Callable):
    """Within this block (this thread / task only) dispatching language models attend with ``function``
    (called as transformers calls an attention function) and build no mask of their own."""
    token = _CALL_ATTENTION.set(function)
    try:
        yield
    finally:
        _CALL_ATTENTION.reset(token)


@contextmanager
def varlen_call(backend: str):
    """Within this block (this thread / task only) dispatching language models attend with ``backend``."""
    check_choice("backend", backend, tuple(REGISTERED_NAMES))
    with attention_call(_ATTENTION_FUNCTIONS[backend]):
        yield


def _original_attention(original: str, module: torch.nn.Module):
    from transformers import AttentionInterface

    if original in AttentionInterface._global_mapping:
        return AttentionInterface._global_mapping[original]
    # "eager" is not registered: every modeling file has its own eager_attention_forward.
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if original == "eager" and eager is not None:
        return eager
    raise ValueError(f"attention implementation {original!r} of {type(module).__name__} is neither registered with transformers nor 'eager'")


def _make_dispatch_attention(original: str):
    def dispatch_attention(module, query, key, value, attention_mask, **kwargs):
        function = _CALL_ATTENTION.get()
        if function is None:
            return _original_attention(original, module)(module, query, key, value, attention_mask, **kwargs)
        return function(module, query, key, value, attention_mask, **kwargs)

    dispatch_attention.__name__ = f"dispatch_attention_{original}"
    return dispatch_attention


def _make_dispatch_mask(original_mask):
    def dispatch_mask(*args, **kwargs):
        if _CALL_ATTENTION.get() is not None:
            return None  # varlen segments come from cu_seq_lens, a decode step brings its own mask: never build one
        return original_mask(*args, **kwargs)

    return dispatch_mask


def install_dispatch(config) -> str:
    """Point ``config`` (a language model's config) at the dispatching implementation; returns its name.

    Idempotent and safe to call from several threads: every writer writes a dispatcher that behaves
    like the current implementation outside :func:`varlen_call`. The one visible change is the name in
    ``config._attn_implementation`` (``autoselect_dispatch|sdpa`` for an sdpa model); switching the model
    to another implementation later is fine, the engine installs a dispatcher around it at its next call.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    current = config._attn_implementation or "eager"
    if current.startswith(DISPATCH_PREFIX):
        return current
    name = DISPATCH_PREFIX + current
    with _DISPATCH_LOCK:
        if name not in AttentionInterface._global_mapping:
            original_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(current)
            if original_mask is not None:
                ALL_MASK_ATTENTION_FUNCTIONS.register(name, _make_dispatch_mask(original_mask))
            AttentionInterface.register(name, _make_dispatch_attention(current))
        config._attn_implementation = name
    return name


def original_implementation(config) -> str:
    """The implementation a (possibly dispatching) config runs outside :func:`varlen_call`."""
    current = config._attn_implementation or "eager"
    return current[len(DISPATCH_PREFIX):] if current.startswith(DISPATCH_PREFIX) else current
