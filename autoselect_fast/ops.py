"""Functional API of the fused kernels, their registration as torch custom ops, and the backend dispatch.

This module owns ``select`` (inference top-K + gather + position ids), ``soft_topk`` (training mask),
``vp_gate`` (training noise gate), ``vp_gate_noise`` and ``normalize_scores``. Every function checks
its arguments with ``_validation`` (clear ``ValueError``/``TypeError``), then runs one of two backends:

* ``"triton"``: the kernels in ``autoselect_fast.kernels``. CUDA tensors run them compiled; CPU tensors
  run them through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before*
  the kernel modules are first imported (they are imported lazily, on first use). The Triton path
  additionally requires contiguous inputs (stride 1 along the last dimension for features/positions).
  CUDA tensors never run interpreted kernels: that is refused with an error, not done slowly.
* ``"reference"``: ``autoselect_fast.reference`` (float64, a Python loop over images).

``backend="auto"`` (default) picks ``"triton"`` for CUDA tensors and for CPU tensors when the kernels
are (or will be) built for the interpreter, and ``"reference"`` otherwise.

Host synchronisation (README, "Kernels and dispatch"): shape/dtype/device checks always run; checks
that read tensor values run only with ``validate=True`` (default: see
``_validation.resolve_validate``: on for CPU tensors, off for CUDA tensors, off under
``torch.compile``, ``AUTOSELECT_FAST_VALIDATE`` overrides). Output sizes come from the host: ``select``
takes ΣK from ``k`` given as an int or a list of ints, or from ``total_k=``; only a budget *tensor*
without ``total_k`` costs one host read. With ``validate=False`` and host budgets the Triton path makes
no device→host synchronisation.

Custom ops: the Triton launches (and the reference selection) are registered as
``torch.ops.autoselect_fast.{select, soft_topk, soft_topk_backward, vp_gate, vp_gate_backward}``
with fake (meta) implementations and autograd formulas, so a function calling ``select``,
``soft_topk`` and ``vp_gate`` traces under ``torch.compile(fullgraph=True)`` and can be captured in a
CUDA graph (there give ``k`` and ``cu_seqlens`` as device tensors and ``total_k``: host values are
staged in a pinned buffer that the allocator may reuse once the capture ends). The reference Soft Top-K and VP gate stay plain
autograd code (the spec), so they trace only with graph breaks. Eager ``select`` calls that need
neither autograd nor tracing run the launcher without the op's dispatcher (``_plain_eager_call``).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._validation import (
    FLOAT_DTYPES,
    IntOrTensor,
    budget_tensors,
    check_alpha_values,
    check_budget_values,
    check_choice,
    check_same_device,
    check_scores,
    check_selection_inputs,
    check_tau,
    check_tensor,
    resolve_validate,
)
from .reference import NORM_EPS, POSITION_MODES, SOFT_TOPK_FUNCTIONS, VP_GATE_CLAMP_EPS, Selection

BACKENDS = ("auto", "triton", "reference")
_MAX_SEED = 2**63 - 1
_MAX_COUNTER = 2**32  # the VP gate's Philox counters are 32-bit (the same stream on every Triton 3.x)
# Per-image statistics the Soft Top-K forward saves for its backward: kernels/soft_topk.py's layout
# (mean, rstd, λ). The fake implementation needs the shape; opcheck in the tests compares it.
SOFT_TOPK_STATS = 4


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernel_module(name: str):
    """Import ``autoselect_fast.kernels.<name>`` on first use (so TRITON_INTERPRET can be set late)."""
    import importlib

    return importlib.import_module(f"autoselect_fast.kernels.{name}")


_KERNEL_MODULES = ("selection", "soft_topk", "vp_gate")


@functools.lru_cache(maxsize=None)
def _kernel_build() -> tuple[bool, bool]:
    """``(all interpreted, none interpreted)`` of the Triton kernels; fixed once they are imported."""
    from .kernels import is_interpreted, jit_functions

    flags = [is_interpreted(kernel) for name in _KERNEL_MODULES for kernel in jit_functions(_kernel_module(name))]
    if not flags:
        raise RuntimeError(f"no @triton.jit function found in autoselect_fast.kernels.{{{', '.join(_KERNEL_MODULES)}}}")
    return all(flags), not any(flags)


def kernels_interpreted() -> bool:
    """Whether the Triton kernels were built for Triton's CPU interpreter (imports them)."""
    return _kernel_build()[0]


def kernels_compiled() -> bool:
    """Whether no Triton kernel was built for the interpreter, i.e. they compile for the GPU (imports them)."""
    return _kernel_build()[1]


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module docstring).

    Host-only (environment and the kernels' build, no tensor data); ``torch.compile`` evaluates it
    once while tracing and keeps the answer.
    """
    check_choice("backend", backend, BACKENDS)
    device_type = torch.device(device).type
    if torch.compiler.is_compiling():
        return _resolve_backend_traced(backend, device_type)
    return _resolve_backend(backend, device_type)


def _resolve_backend(backend: str, device_type: str) -> str:
    if backend == "reference":
        return "reference"
    if device_type == "cuda":
        if not kernels_compiled():
            raise RuntimeError(
                "the Triton kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 was set when they "
                "were imported), so CUDA tensors would run them interpreted, orders of magnitude slower; unset "
                "TRITON_INTERPRET for GPU runs, or pass backend='reference'"
            )
        return "triton"
    usable = device_type == "cpu" and _interpret_env() and kernels_interpreted()
    if backend == "triton" and not usable:
        if device_type == "cpu" and _interpret_env():
            why = "the kernels were imported before TRITON_INTERPRET=1 was set (set it before importing them)"
        else:
            why = "Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
        raise ValueError(f"backend='triton' cannot run on device {device_type}: {why}; use backend='auto' or 'reference'")
    return "triton" if usable else "reference"


_resolve_backend_traced = torch.compiler.assume_constant_result(_resolve_backend)


def _plain_eager_call(*tensors: Optional[Tensor]) -> bool:
    """Whether an eager call may skip the custom-op dispatcher (10-30 µs of host time per call).

    Only when nothing needs it: no ``torch.compile`` tracing, no dispatch mode (fake/meta tracing),
    plain tensors, and no input that autograd has to follow.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.device.type == "meta" or (grad and t.requires_grad)):
            return False
    return True


def _check_block(name: str, value: Optional[int]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1 (or None for the default), got {value!r}")


def _check_contiguous(name: str, t: Optional[Tensor], *, last_dim_only: bool = False) -> None:
    if t is None:
        return
    ok = (t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1) if last_dim_only else t.is_contiguous()
    if not ok:
        what = "have stride 1 along its last dimension" if last_dim_only else "be contiguous"
        raise ValueError(f"{name} must {what} for the Triton backend, got strides {tuple(t.stride())}; call .contiguous()")


def _check_max_seqlen(max_seqlen: Optional[int], single_image: Optional[int], cu: Tensor, validate: bool) -> Optional[int]:
    """The longest image's N as a host int (given, or the whole input for one image), or None.

    Its value against ``cu_seqlens`` is checked only in ``validate`` mode (that reads the device)."""
    if max_seqlen is None:
        return single_image
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1 (the longest image's token count) or None, got {max_seqlen!r}")
    if validate and cu.numel() > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"max_seqlen must be at least the longest image's token count ({longest}), got {max_seqlen}")
    return max_seqlen


def _opts(**blocks: Optional[int]) -> dict:
    """The tile sizes that were given (each checked), as keyword arguments of the launchers."""
    for name, value in blocks.items():
        _check_block(name, value)
    return {name: value for name, value in blocks.items() if value is not None}


# --------------------------------------------------------------------------------------------------
# Custom ops: one per launch, each with a fake implementation (output metadata only) and, for the
# training ops, an autograd formula that calls the backward op. Launchers are called by keyword.
# --------------------------------------------------------------------------------------------------
def _select_launch(
    scores: Tensor,
    features: Optional[Tensor],
    k: Tensor,
    cu_seqlens: Tensor,
    kept_cu_seqlens: Tensor,
    positions: Optional[Tensor],
    total_k: int,
    compact: bool,
    backend: str,
    block_n: Optional[int],
    block_d: Optional[int],
    max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices (ΣK,), kept rows (ΣK, d) or an empty tensor without features, position ids)``."""
    if backend == "reference":
        sel = reference.select_tokens(
            scores, features, k, cu_seqlens, positions=positions, position_mode="compact" if compact else "original"
        )
        kept = sel.features if sel.features is not None else scores.new_empty(0)
        return sel.indices, kept, sel.position_ids
    opts = _opts(block_n=block_n, block_d=block_d)
    if block_n is not None:
        opts["block_g"] = min(block_n, 64)
    indices, kept, kept_positions = _kernel_module("selection").select_tokens(
        scores=scores, features=features, k=k, cu_seqlens=cu_seqlens, kept_cu_seqlens=kept_cu_seqlens,
        total_k=total_k, positions=positions, compact=compact, max_seqlen=max_seqlen, **opts,
    )
    return indices, kept if kept is not None else scores.new_empty(0), kept_positions


# The op runs exactly _select_launch; eager inference calls skip the dispatcher (_plain_eager_call).
_select_op = torch.library.custom_op("autoselect_fast::select", _select_launch, mutates_args=())


@_select_op.register_fake
def _select_fake(scores, features, k, cu_seqlens, kept_cu_seqlens, positions, total_k, compact, backend, block_n, block_d, max_seqlen=None):
    indices = scores.new_empty(total_k, dtype=torch.int64)
    kept = scores.new_empty(0) if features is None else features.new_empty(total_k, features.shape[1])
    pos_shape = (total_k,) if positions is None or positions.dim() == 1 else (positions.shape[0], total_k)
    return indices, kept, scores.new_empty(pos_shape, dtype=torch.int64)


def _select_setup_context(ctx, inputs, output):
    features = inputs[1]
    ctx.save_for_backward(output[0])
    ctx.features_shape = None if features is None else features.shape


def _select_autograd(ctx, grad_indices, grad_kept, grad_positions):
    """Hard top-K is piecewise constant in the scores (no gradient); the gather is linear in the rows."""
    (indices,) = ctx.saved_tensors
    grad_features = None
    if ctx.features_shape is not None:
        grad_features = grad_kept.new_zeros(ctx.features_shape).index_add(0, indices, grad_kept)
    return None, grad_features, None, None, None, None, None, None, None, None, None, None


_select_op.register_autograd(_select_autograd, setup_context=_select_setup_context)


@torch.library.custom_op("autoselect_fast::soft_topk", mutates_args=())
def _soft_topk_op(
    scores: Tensor, k: Tensor, cu_seqlens: Tensor, tau: float, f: str, normalize: bool, block_n: Optional[int],
    max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """``(α (ΣN,) in the dtype of scores, per-image stats (B, SOFT_TOPK_STATS) fp32 for the backward)``."""
    return _kernel_module("soft_topk").soft_topk_forward(
        scores=scores, k=k, cu_seqlens=cu_seqlens, tau=tau, f=f, normalize=normalize, eps=NORM_EPS,
        max_seqlen=max_seqlen, **_opts(block_n=block_n),
    )


@_soft_topk_op.register_fake
def _soft_topk_fake(scores, k, cu_seqlens, tau, f, normalize, block_n, max_seqlen=None):
    return torch.empty_like(scores), scores.new_empty((k.shape[0], SOFT_TOPK_STATS), dtype=torch.float32)


@torch.library.custom_op("autoselect_fast::soft_topk_backward", mutates_args=())
def _soft_topk_backward_op(
    scores: Tensor, grad_alpha: Tensor, k: Tensor, cu_seqlens: Tensor, stats: Tensor,
    tau: float, f: str, normalize: bool, block_n: Optional[int], max_seqlen: Optional[int] = None,
) -> Tensor:
    """∂L/∂scores from ∂L/∂α by the implicit formula (kernels/soft_topk.py)."""
    return _kernel_module("soft_topk").soft_topk_backward(
        scores=scores, grad_alpha=grad_alpha, k=k, cu_seqlens=cu_seqlens, stats=stats, tau=tau, f=f,
        normalize=normalize, max_seqlen=max_seqlen, **_opts(block_n=block_n),
    )


@_soft_topk_backward_op.register_fake
def _soft_topk_backward_fake(scores, grad_alpha, k, cu_seqlens, stats, tau, f, normalize, block_n, max_seqlen=None):
    return torch.empty_like(scores)


def _soft_topk_setup_context(ctx, inputs, output):
    scores, k, cu_seqlens, tau, f, normalize, block_n, max_seqlen = inputs
    _, stats = output
    ctx.save_for_backward(scores, k, cu_seqlens, stats)
    ctx.tau, ctx.f, ctx.normalize, ctx.block_n, ctx.max_seqlen = tau, f, normalize, block_n, max_seqlen


def _soft_topk_autograd(ctx, grad_alpha, grad_stats):
    scores, k, cu_seqlens, stats = ctx.saved_tensors
    grad = _soft_topk_backward_op(
        scores, grad_alpha.contiguous(), k, cu_seqlens, stats, ctx.tau, ctx.f, ctx.normalize, ctx.block_n, ctx.max_seqlen
    )
    return grad, None, None, None, None, None, None, None


_soft_topk_op.register_autograd(_soft_topk_autograd, setup_context=_soft_topk_setup_context)


@torch.library.custom_op("autoselect_fast::vp_gate", mutates_args=())
def _vp_gate_op(x: Tensor, alpha: Tensor, seed: int, offset: int, clamp_eps: float, block_d: Optional[int]) -> Tensor:
    """x̃ = √α·x + √(1-α)·ε, ε from Philox (seed, offset) inside the kernel (clamp_eps: backward only)."""
    return _kernel_module("vp_gate").vp_gate_forward(x=x, alpha=alpha, seed=seed, offset=offset, **_opts(block_d=block_d))


@_vp_gate_op.register_fake
def _vp_gate_fake(x, alpha, seed, offset, clamp_eps, block_d):
    return torch.empty_like(x)


@torch.library.custom_op("autoselect_fast::vp_gate_backward", mutates_args=())
def _vp_gate_backward_op(
    x: Tensor, alpha: Tensor, grad_out: Tensor, seed: int, offset: int, clamp_eps: float, block_d: Optional[int]
) -> tuple[Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂α) with ε regenerated from (seed, offset), never stored."""
    return _kernel_module("vp_gate").vp_gate_backward(
        x=x, alpha=alpha, grad_out=grad_out, seed=seed, offset=offset, clamp_eps=clamp_eps, **_opts(block_d=block_d)
    )


@_vp_gate_backward_op.register_fake
def _vp_gate_backward_fake(x, alpha, grad_out, seed, offset, clamp_eps, block_d):
    return torch.empty_like(x), torch.empty_like(alpha)


def _vp_gate_setup_context(ctx, inputs, output):
    x, alpha, seed, offset, clamp_eps, block_d = inputs
    ctx.save_for_backward(x, alpha)
    ctx.seed, ctx.offset, ctx.clamp_eps, ctx.block_d = seed, offset, clamp_eps, block_d


def _vp_gate_autograd(ctx, grad_out):
    x, alpha = ctx.saved_tensors
    grad_x, grad_alpha = _vp_gate_backward_op(
        x, alpha, grad_out.contiguous(), ctx.seed, ctx.offset, ctx.clamp_eps, ctx.block_d
    )
    return grad_x, grad_alpha, None, None, None, None


_vp_gate_op.register_autograd(_vp_gate_autograd, setup_context=_vp_gate_setup_context)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def normalize_scores(scores: Tensor, cu_seqlens: Optional[Tensor] = None, eps: float = NORM_EPS) -> Tensor:
    """Per-image z-score (reference path on every device; the Soft Top-K kernel fuses its own)."""
    return reference.normalize_scores(scores, cu_seqlens, eps)


# --------------------------------------------------------------------------------------------------
# Selection (inference)
# --------------------------------------------------------------------------------------------------
def _total_k(k: IntOrTensor, k_t: Tensor, total_k: Optional[int], num_segments: int, validate: bool) -> int:
    """ΣK, from the host whenever the caller knows it; a budget tensor without ``total_k`` is read once."""
    if isinstance(k, int):
        known: Optional[int] = k * num_segments
    elif isinstance(k, (list, tuple)):
        known = sum(k)
    else:
        known = None
    if total_k is None:
        # The only host read left in select: the caller gave budgets on the device and not their sum.
        return known if known is not None else int(k_t.sum())
    if isinstance(total_k, bool) or not isinstance(total_k, int) or total_k < 0:
        raise ValueError(f"total_k must be an int >= 0 (the sum of the budgets) or None, got {total_k!r}")
    if known is not None and known != total_k:
        raise ValueError(f"total_k must equal the sum of k ({known}), got {total_k}")
    if known is None and validate:
        got = int(k_t.sum())
        if got != total_k:
            raise ValueError(f"total_k must equal the sum of k ({got}), got {total_k}")
    return total_k


def select(
    scores: Tensor,
    features: Optional[Tensor],
    k: IntOrTensor,
    cu_seqlens: Optional[Tensor] = None,
    *,
    positions: Optional[Tensor] = None,
    position_mode: str = "original",
    total_k: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    validate: Optional[bool] = None,
    backend: str = "auto",
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
) -> Selection:
    """Hard top-K per image (ties to the lower index, ascending), the kept rows and their position ids.

    Same contract and result as ``reference.select_tokens`` (indices, rows bit-for-bit, positions):

    Args:
        scores: ``(ΣN,)`` Scorer outputs (fp16/bf16/fp32/fp64, finite).
        features: ``(ΣN, d)`` rows to gather (any dtype), or ``None``.
        k: budget per image, ``1 <= k <= N``: an int, a list of ints (both known on the host, so ΣK
            sizes the outputs without a synchronisation) or an integer tensor ``(B,)``.
        cu_seqlens: ``(B+1,)`` int32/int64 offsets; ``None`` for one image.
        positions: ``(ΣN,)`` or ``(3, ΣN)`` int32/int64 full-sequence positions; default 0..N_i-1.
        position_mode: ``"original"`` or ``"compact"`` (first token's position + rank).
        total_k: ΣK when ``k`` is a tensor and the caller knows the sum; without it that sum is read
            on the host (one synchronisation on CUDA, a graph break under ``torch.compile``).
        max_seqlen: the longest image's N when the caller knows it on the host; the kernels size their
            on-chip blocks from it (without it ΣN bounds the longest image, which can pick the slower
            looped kernels for a batch of many small images).
        validate: run the checks that read tensor values (finite scores, ``cu_seqlens``, k <= N,
            total_k); ``None``: ``_validation.resolve_validate``. Shapes/dtypes/devices are always checked.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (the reference always validates).
        block_n, block_d: Triton tile sizes (powers of two; tokens per block, feature columns per program).
    Returns:
        ``reference.Selection``; ``cu_seqlens`` of the kept tokens is int64.
    """
    check_choice("position_mode", position_mode, POSITION_MODES)
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    run_checks = resolve_validate(validate, scores.device)
    cu = check_scores(scores, cu_seqlens, validate=run_checks)
    check_selection_inputs(scores, features, positions)
    check_same_device(scores=scores, features=features, positions=positions)
    num_segments = cu.shape[0] - 1
    host_lengths = [scores.shape[0]] if cu_seqlens is None else None
    # Budgets and kept offsets: one host→device copy for host budgets, no extra kernels.
    k_t, kept_cu = budget_tensors(k, num_segments, scores.device, host_lengths=host_lengths, with_offsets=True)
    if run_checks:
        check_budget_values(k_t, cu[1:] - cu[:-1])
    total = _total_k(k, k_t, total_k, num_segments, run_checks)
    _opts(block_n=block_n, block_d=block_d)
    chosen = resolve_backend(backend, scores.device)
    if chosen == "triton":
        _check_contiguous("scores", scores)
        _check_contiguous("features", features, last_dim_only=True)
        _check_contiguous("positions", positions, last_dim_only=True)
    max_seqlen = _check_max_seqlen(max_seqlen, scores.shape[0] if cu_seqlens is None else None, cu, run_checks)
    run = _select_launch if _plain_eager_call(scores, features, positions) else _select_op
    indices, kept, kept_positions = run(
        scores, features, k_t, cu, kept_cu, positions, total, position_mode == "compact", chosen, block_n, block_d, max_seqlen
    )
    return Selection(
        indices=indices, features=None if features is None else kept, position_ids=kept_positions, cu_seqlens=kept_cu
    )


# --------------------------------------------------------------------------------------------------
# Soft Top-K (training)
# --------------------------------------------------------------------------------------------------
def soft_topk(
    scores: Tensor,
    k: IntOrTensor,
    cu_seqlens: Optional[Tensor] = None,
    *,
    tau: float = 1.0,
    f: str = "laplace",
    normalize: bool = True,
    max_seqlen: Optional[int] = None,
    validate: Optional[bool] = None,
    backend: str = "auto",
    block_n: Optional[int] = None,
) -> Tensor:
    """Soft Top-K mask ``α = Φ_K(ŝ/τ)`` per image with ``Σα = K``, differentiable w.r.t. ``scores``.

    Same contract as ``reference.soft_topk``; ``k`` is an int, a list of ints or an integer tensor
    ``(B,)``, ``validate`` as in :func:`select`. The Triton kernels compute in fp32 whatever the input
    dtype (α is returned in the dtype of ``scores``); Σα matches K to ~1e-6·K for N up to 16k.
    ``block_n`` is the kernels' token block (a power of two; images longer than it are looped over);
    ``max_seqlen`` the longest image's N if known on the host (as in :func:`select`).
    """
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    run_checks = resolve_validate(validate, scores.device)
    cu = check_scores(scores, cu_seqlens, validate=run_checks)
    host_lengths = [scores.shape[0]] if cu_seqlens is None else None
    k_t = budget_tensors(k, cu.shape[0] - 1, scores.device, host_lengths=host_lengths)
    if run_checks:
        check_budget_values(k_t, cu[1:] - cu[:-1])
    tau = check_tau(tau)
    check_choice("f", f, SOFT_TOPK_FUNCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _opts(block_n=block_n)
    if resolve_backend(backend, scores.device) == "reference":
        return reference.soft_topk(scores, k_t, cu, tau=tau, f=f, normalize=normalize)
    _check_contiguous("scores", scores)
    max_seqlen = _check_max_seqlen(max_seqlen, scores.shape[0] if cu_seqlens is None else None, cu, run_checks)
    alpha, _ = _soft_topk_op(scores, k_t, cu, tau, f, normalize, block_n, max_seqlen)
    return alpha


# --------------------------------------------------------------------------------------------------
# VP noise gate (training)
# --------------------------------------------------------------------------------------------------
def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A Philox seed in [0, 2^62) drawn on the host from ``generator`` (torch's default CPU generator when None).

    Only CPU generators: drawing from a CUDA generator would read a GPU tensor (a synchronisation).
    Under ``torch.compile`` pass ``seed=`` instead (reading the drawn value is a graph break).
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (a seed drawn on {generator.device} would be read back to the "
            "host, a synchronisation); pass a CPU generator or an int seed"
        )
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _check_seed_offset(seed: int, offset: int, numel: int) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed must satisfy 0 <= seed < 2**63, got {seed}")
    if offset < 0 or offset + numel > _MAX_COUNTER:
        raise ValueError(
            f"offset must satisfy 0 <= offset and offset + x.numel() <= 2**32 (32-bit Philox counters), "
            f"got offset {offset} for {numel} elements"
        )


def vp_gate(
    x: Tensor,
    alpha: Tensor,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    clamp_eps: float = VP_GATE_CLAMP_EPS,
    validate: Optional[bool] = None,
    backend: str = "auto",
    block_d: Optional[int] = None,
) -> Tensor:
    """Variance-preserving noise gate ``x̃ = √α·x + √(1-α)·ε``, differentiable in x and α.

    ε is Philox noise: element i (row-major over x) is ``tl.randn(seed, offset + i)`` with a 32-bit
    counter (``offset + x.numel() <= 2**32``), so (seed, offset) fix it completely and the backward
    regenerates it instead of storing it. Draw a new seed (or move ``offset`` past ``x.numel()``)
    every step for fresh noise.

    Args:
        x: ``(..., d)`` features (fp16/bf16/fp32/fp64); ``alpha``: ``x.shape[:-1]`` in [0, 1].
        seed: Philox seed in [0, 2^63), a Python int (a kernel argument, not specialised on). ``None``
            draws one on the host from ``generator`` (a CPU generator; torch's default one when None),
            so runs are reproducible under ``torch.manual_seed`` and no GPU value is read.
        offset: first Philox counter, ``0 <= offset <= 2**32 - x.numel()``.
        clamp_eps: α is clamped to [eps, 1-eps] inside the derivative w.r.t. α only.
        validate: check that α is finite and in [0, 1] (reads α); ``None``: ``_validation.resolve_validate``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``. The reference backend replays the same
            Philox stream on the host (``kernels.philox.philox_randn``, NumPy) and feeds it to
            ``reference.vp_gate``, so it is deterministic in (seed, offset) and agrees with the kernels
            up to fp32 rounding of the noise.
    Returns:
        x̃ with the shape and dtype of x.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("alpha", alpha, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or alpha.shape != x.shape[:-1]:
        raise ValueError(f"alpha must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(alpha.shape)}")
    check_same_device(x=x, alpha=alpha)
    if resolve_validate(validate, x.device):
        check_alpha_values(alpha)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to vp_gate, not both (the generator only draws a seed)")
    if isinstance(clamp_eps, bool) or not isinstance(clamp_eps, float) or not 0.0 < clamp_eps < 0.5:
        raise ValueError(f"clamp_eps must be a float in (0, 0.5), got {clamp_eps!r}")
    _opts(block_d=block_d)
    if seed is None:
        seed = draw_seed(generator)
    _check_seed_offset(seed, offset, x.numel())
    if resolve_backend(backend, x.device) == "reference":
        noise = vp_gate_noise(x.shape, seed, offset, device=x.device, backend="reference")
        return reference.vp_gate(x, alpha, noise=noise, clamp_eps=clamp_eps)
    _check_contiguous("x", x)
    _check_contiguous("alpha", alpha)
    return _vp_gate_op(x, alpha, seed, offset, clamp_eps, block_d)


def vp_gate_noise(shape, seed: int, offset: int = 0, *, device="cpu", backend: str = "auto") -> Tensor:
    """The fp32 ε that ``vp_gate(x, alpha, seed=seed, offset=offset)`` uses for an x of ``shape``."""
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    _check_seed_offset(seed, offset, numel)
    if resolve_backend(backend, device) == "reference":
        from .kernels.philox import philox_randn

        return torch.from_numpy(philox_randn(numel, seed, offset)).reshape(shape).to(device)
    return _kernel_module("vp_gate").vp_gate_noise(shape, seed, offset, device=device)
