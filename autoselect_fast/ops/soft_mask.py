"""``soft_topk``: the Soft Top-K mask α = Φ_K(ŝ/τ) of training, and ``normalize_scores``.

The ops ``torch.ops.autoselect_fast.soft_topk`` (:data:`soft_topk_op`: α and per-image stats) and
``soft_topk_backward`` (:data:`soft_topk_backward_op`: ∂L/∂scores from ∂L/∂α by the implicit formula)
run the fused kernels of ``kernels/soft_topk.py``; the autograd formula of the first calls the second.
The reference backend is ``reference.soft_topk``, plain autograd code (the spec), so it traces only with
graph breaks.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import NORM_EPS, SOFT_TOPK_FUNCTIONS
from ..validation import (
    FLOAT_DTYPES,
    IntOrTensor,
    budget_tensors,
    check_budget_values,
    check_choice,
    check_scores,
    check_tau,
    check_tensor,
    resolve_validate,
)
from .dispatch import check_contiguous, check_max_seqlen, kernel_module, resolve_backend, tile_options

# Per-image statistics the forward saves for its backward: kernels/soft_topk.py's STATS (mean, rstd and
# the threshold as (anchor, μ)). The fake implementation needs the shape; opcheck compares it.
SOFT_TOPK_STATS = 4


@torch.library.custom_op("autoselect_fast::soft_topk", mutates_args=())
def soft_topk_op(
    scores: Tensor, k: Tensor, cu_seqlens: Tensor, tau: float, f: str, normalize: bool, block_n: Optional[int],
    max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """``(α (ΣN,) in the dtype of scores, per-image stats (B, SOFT_TOPK_STATS) fp32 for the backward)``."""
    return kernel_module("soft_topk").soft_topk_forward(
        scores=scores, k=k, cu_seqlens=cu_seqlens, tau=tau, f=f, normalize=normalize, eps=NORM_EPS,
        max_seqlen=max_seqlen, **tile_options(block_n=block_n),
    )


@soft_topk_op.register_fake
def _soft_topk_fake(scores, k, cu_seqlens, tau, f, normalize, block_n, max_seqlen=None):
    return torch.empty_like(scores), scores.new_empty((k.shape[0], SOFT_TOPK_STATS), dtype=torch.float32)


@torch.library.custom_op("autoselect_fast::soft_topk_backward", mutates_args=())
def soft_topk_backward_op(
    scores: Tensor, grad_alpha: Tensor, k: Tensor, cu_seqlens: Tensor, stats: Tensor,
    tau: float, f: str, normalize: bool, block_n: Optional[int], max_seqlen: Optional[int] = None,
) -> Tensor:
    """∂L/∂scores from ∂L/∂α by the implicit formula (kernels/soft_topk.py)."""
    return kernel_module("soft_topk").soft_topk_backward(
        scores=scores, grad_alpha=grad_alpha, k=k, cu_seqlens=cu_seqlens, stats=stats, tau=tau, f=f,
        normalize=normalize, max_seqlen=max_seqlen, **tile_options(block_n=block_n),
    )


@soft_topk_backward_op.register_fake
def _soft_topk_backward_fake(scores, grad_alpha, k, cu_seqlens, stats, tau, f, normalize, block_n, max_seqlen=None):
    return torch.empty_like(scores)


def _soft_topk_setup_context(ctx, inputs, output):
    scores, k, cu_seqlens, tau, f, normalize, block_n, max_seqlen = inputs
    _, stats = output
    ctx.save_for_backward(scores, k, cu_seqlens, stats)
    ctx.tau, ctx.f, ctx.normalize, ctx.block_n, ctx.max_seqlen = tau, f, normalize, block_n, max_seqlen


def _soft_topk_autograd(ctx, grad_alpha, grad_stats):
    scores, k, cu_seqlens, stats = ctx.saved_tensors
    grad = soft_topk_backward_op(
        scores, grad_alpha.contiguous(), k, cu_seqlens, stats, ctx.tau, ctx.f, ctx.normalize, ctx.block_n, ctx.max_seqlen
    )
    return grad, None, None, None, None, None, None, None


soft_topk_op.register_autograd(_soft_topk_autograd, setup_context=_soft_topk_setup_context)


def normalize_scores(scores: Tensor, cu_seqlens: Optional[Tensor] = None, eps: float = NORM_EPS) -> Tensor:
    """Per-image z-score (reference path on every device; the Soft Top-K kernel fuses its own)."""
    return reference.normalize_scores(scores, cu_seqlens, eps)


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
    ``(B,)``, ``validate`` as in ``select``. The Triton kernels compute in fp32 whatever the input
    dtype (α is returned in the dtype of ``scores``), with the threshold held relative to a nearby
    score, so α keeps fp32 precision also for raw scores far from zero (``normalize=False``,
    |s|/τ up to 1e5 tested); Σα matches K to ~1e-6·K for N up to 16k.
    ``block_n`` is the kernels' token block (a power of two; images longer than it are looped over);
    ``max_seqlen`` the longest image's N if known on the host (as in ``select``).
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
    tile_options(block_n=block_n)
    if resolve_backend(backend, scores.device) == "reference":
        return reference.soft_topk(scores, k_t, cu, tau=tau, f=f, normalize=normalize)
    check_contiguous("scores", scores)
    max_seqlen = check_max_seqlen(max_seqlen, scores.shape[0] if cu_seqlens is None else None, cu, run_checks)
    alpha, _ = soft_topk_op(scores, k_t, cu, tau, f, normalize, block_n, max_seqlen)
    return alpha
