"""The reference path: AutoSelect's math in plain PyTorch (docs/design.md, "The math" and "Position ids").

This module is the spec in code. Every kernel is tested against it, so it favours clarity over speed:
each image (segment) is handled on its own in a Python loop, and all arithmetic runs in float64
whatever the input dtype (results are cast back to the input dtype).

Ragged batches use one convention everywhere: a packed tensor over all images' tokens, ``(ΣN,)`` or
``(ΣN, d)``, plus ``cu_seqlens`` ``(B+1,)`` with ``cu_seqlens[0] = 0`` and ``cu_seqlens[-1] = ΣN``
(``None`` means a single image); ``autoselect_fast.ragged`` holds the helpers for that layout. The
budget policy (K per image) lives in ``autoselect_fast.budget``, the τ schedule in
``autoselect_fast.training.schedule``.

Contents:
  * ``normalize_scores``   z-score per image (population variance, eps = 1e-6)
  * ``soft_topk``          Soft Top-K mask α with Σα = K, f = "laplace" (closed form) or "sigmoid"
                           (bisection); backward by implicit differentiation (``SoftTopKFunction``)
  * ``vp_gate``            variance-preserving noise gate √α·x + √(1-α)·ε
  * ``hard_topk_indices``  inference selection: top-K, ties to the lower index, sorted ascending
  * ``select_tokens``      gather of the kept rows plus their position ids (original / compact, 1-D / M-RoPE)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import ragged
from .validation import (
    FLOAT_DTYPES,
    IntOrTensor,
    check_choice,
    check_finite,
    check_k,
    check_same_device,
    check_scores,
    check_selection_inputs,
    check_tau,
    check_tensor,
)

SOFT_TOPK_FUNCTIONS = ("laplace", "sigmoid")
POSITION_MODES = ("original", "compact")
NORM_EPS = 1e-6
# Bisection for the sigmoid threshold stops once |Σα - K| <= SIGMOID_TOL * K or the float64 bracket
# cannot shrink any more. The reference runs to the collapse of the bracket (|Σα - K| ~ 1e-12·K) so
# that its finite differences are as clean as the closed form's; kernels state their own tolerance.
SIGMOID_TOL = 0.0
# The VP gate's derivative w.r.t. α divides by √α and √(1-α); α is clamped to [eps, 1-eps] there only.
VP_GATE_CLAMP_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def normalize_scores(scores: Tensor, cu_seqlens: Tensor | None = None, eps: float = NORM_EPS) -> Tensor:
    """``ŝ = (s - mean(s)) / sqrt(var(s) + eps)`` per image, population variance. Differentiable."""
    cu = check_scores(scores, cu_seqlens)
    return _normalize64(scores.double(), cu, eps).to(scores.dtype)


def _normalize64(s: Tensor, cu: Tensor, eps: float) -> Tensor:
    parts = []
    for start, end in ragged.segment_bounds(cu):
        seg = s[start:end]
        centred = seg - seg.mean()
        parts.append(centred / torch.sqrt((centred * centred).mean() + eps))
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# Soft Top-K thresholds, one segment at a time (float64 inputs)
# --------------------------------------------------------------------------------------------------
def laplace_threshold(x: Tensor, k: int) -> float:
    """λ with Σ_i F(x_i - λ) = k for the Laplace CDF F, by the closed form (docs/design.md, "Soft Top-K").

    Sorting x descending, the split m (number of x above λ) is the count of sorted points x_(j) with
    g(x_(j)) < k, where g(λ) = Σ F(x_i - λ) is strictly decreasing; g at every sorted point comes from
    the same prefix/suffix log-sum-exps that give A and B. Returns -inf when k = N (α = 1).
    """
    n = x.numel()
    if k == n:
        return -math.inf
    xs = torch.sort(x, descending=True).values
    neg_inf = xs.new_full((1,), -math.inf)
    # log_a[m] = log Σ_{i<m} e^{-xs_i},  log_b[m] = log Σ_{i>=m} e^{xs_i}   (m = 0..n, 0-based i)
    log_a = torch.cat([neg_inf, torch.logcumsumexp(-xs, 0)])
    log_b = torch.cat([torch.logcumsumexp(xs.flip(0), 0).flip(0), neg_inf])
    # g(xs_j) = j + 1/2 - 1/2 e^{xs_j} A_j + 1/2 e^{-xs_j} B_{j+1}; both exponents are <= log(n).
    j = torch.arange(n, dtype=xs.dtype, device=xs.device)
    g = j + 0.5 - 0.5 * torch.exp(xs + log_a[:n]) + 0.5 * torch.exp(log_b[1:] - xs)
    m = int((g < k).sum())
    c = k - m
    log_a_m, log_b_m = float(log_a[m]), float(log_b[m])
    # Root u = e^λ of A u² + 2c u - B = 0 with r = sqrt(c² + AB), in logs; each side's form avoids
    # a 0/0 (A = 0 or B = 0) or a cancellation.
    if c == 0:
        return 0.5 * (log_b_m - log_a_m)
    log_c = math.log(abs(c))
    log_r = 0.5 * _logaddexp(2.0 * log_c, log_a_m + log_b_m)
    if c > 0:
        return log_b_m - _logaddexp(log_r, log_c)  # λ = log B - log(r + c)
    return _logaddexp(log_r, log_c) - log_a_m  # λ = log(r - c) - log A


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def sigmoid_threshold(x: Tensor, k: int, tol: float = SIGMOID_TOL, max_iter: int = 300) -> float:
    """λ with Σ_i σ(x_i - λ) = k by bisection inside [min x - logit(k/N), max x - logit(k/N)].

    Stops when |Σα - k| <= tol·k or when the float64 bracket stops shrinking. -inf when k = N.
    """
    n = x.numel()
    if k == n:
        return -math.inf
    shift = math.log(k / n) - math.log1p(-k / n)  # logit(k/N)
    lo, hi = float(x.min()) - shift, float(x.max()) - shift  # g(lo) >= k >= g(hi)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        total = float(torch.sigmoid(x - mid).sum())
        if abs(total - k) <= tol * k:
            return mid
        if total > k:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _cdf(z: Tensor, f: str) -> Tensor:
    if f == "laplace":
        return torch.where(z <= 0, 0.5 * torch.exp(torch.clamp(z, max=0.0)), 1.0 - 0.5 * torch.exp(-torch.clamp(z, min=0.0)))
    return torch.sigmoid(z)


def _log_density(z: Tensor, f: str) -> Tensor:
    """log f'(z): Laplace ½e^{-|z|}, sigmoid σ(z)(1-σ(z)) = e^{-|z|} / (1 + e^{-|z|})²."""
    a = z.abs()
    if f == "laplace":
        return math.log(0.5) - a
    return -a - 2.0 * torch.log1p(torch.exp(-a))


class SoftTopKFunction(torch.autograd.Function):
    """α = F(x - λ(x)) per segment with Σα = k; backward is the implicit VJP, never the iterations.

    ``∂L/∂x_j = f'_j (g_j - Σ_i f'_i g_i / Σ_i f'_i)``. The ratio is evaluated with weights shifted by
    the segment's largest log f', so it stays finite when every f' underflows (τ → 0).
    """

    @staticmethod
    def forward(ctx, x: Tensor, k: Tensor, cu_seqlens: Tensor, f: str) -> Tensor:  # type: ignore[override]
        alpha = torch.empty_like(x)
        lambdas = []
        solve = laplace_threshold if f == "laplace" else sigmoid_threshold
        for i, (start, end) in enumerate(ragged.segment_bounds(cu_seqlens)):
            lam = solve(x[start:end], int(k[i]))
            lambdas.append(lam)
            alpha[start:end] = 1.0 if lam == -math.inf else _cdf(x[start:end] - lam, f)
        ctx.save_for_backward(x, cu_seqlens)
        ctx.lambdas, ctx.f = lambdas, f
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha: Tensor):  # type: ignore[override]
        x, cu_seqlens = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        for lam, (start, end) in zip(ctx.lambdas, ragged.segment_bounds(cu_seqlens)):
            if lam == -math.inf:  # k = N: α ≡ 1, no gradient
                continue
            log_fp = _log_density(x[start:end] - lam, ctx.f)
            g = grad_alpha[start:end]
            weights = torch.exp(log_fp - log_fp.max())
            mean_g = (weights * g).sum() / weights.sum()
            grad_x[start:end] = torch.exp(log_fp) * (g - mean_g)
        return grad_x, None, None, None


def soft_topk(
    scores: Tensor,
    k: IntOrTensor,
    cu_seqlens: Tensor | None = None,
    *,
    tau: float = 1.0,
    f: str = "laplace",
    normalize: bool = True,
    eps: float = NORM_EPS,
) -> Tensor:
    """Soft Top-K mask ``α = Φ_K(ŝ/τ)`` per image, ``Σα = K``, differentiable w.r.t. ``scores``.

    Args:
        scores: ``(ΣN,)`` raw Scorer outputs, any float dtype; must be finite.
        k: budget per image, an int or an integer tensor ``(B,)``, ``1 <= k <= N``.
        cu_seqlens: ``(B+1,)`` offsets; ``None`` for one image.
        tau: temperature > 0.
        f: ``"laplace"`` (closed-form threshold, default) or ``"sigmoid"`` (bisection).
        normalize: apply the per-image z-score first (the method always does; off for tests).
    Returns:
        α ``(ΣN,)`` in the dtype of ``scores``.
    """
    cu = check_scores(scores, cu_seqlens)
    k_t = check_k(k, ragged.lengths_from_cu_seqlens(cu))
    tau = check_tau(tau)
    check_choice("f", f, SOFT_TOPK_FUNCTIONS)
    s = scores.double()
    s_hat = _normalize64(s, cu, eps) if normalize else s
    alpha = SoftTopKFunction.apply(s_hat / tau, k_t, cu, f)
    return alpha.to(scores.dtype)


# --------------------------------------------------------------------------------------------------
# VP noise gate
# --------------------------------------------------------------------------------------------------
class VPGateFunction(torch.autograd.Function):
    """``x̃ = √α·x + √(1-α)·ε`` with ε held fixed; α clamped to [eps, 1-eps] inside the derivative only."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, noise: Tensor, clamp_eps: float) -> Tensor:  # type: ignore[override]
        a = alpha.unsqueeze(-1)
        ctx.save_for_backward(x, alpha, noise)
        ctx.clamp_eps = clamp_eps
        return torch.sqrt(a) * x + torch.sqrt(1.0 - a) * noise

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, alpha, noise = ctx.saved_tensors
        a = alpha.unsqueeze(-1)
        a_c = a.clamp(ctx.clamp_eps, 1.0 - ctx.clamp_eps)
        grad_x = torch.sqrt(a) * grad_out
        grad_alpha = (grad_out * (x / (2.0 * torch.sqrt(a_c)) - noise / (2.0 * torch.sqrt(1.0 - a_c)))).sum(-1)
        return grad_x, grad_alpha, None, None


def vp_gate(
    x: Tensor,
    alpha: Tensor,
    noise: Optional[Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    clamp_eps: float = VP_GATE_CLAMP_EPS,
) -> Tensor:
    """Variance-preserving noise gate ``x̃_i = √α_i·x_i + √(1-α_i)·ε_i``, differentiable in x and α.

    Args:
        x: ``(..., N, d)`` (or flat ``(ΣN, d)``) token features.
        alpha: ``(..., N)`` mask in [0, 1], ``alpha.shape == x.shape[:-1]``.
        noise: ε of the shape of x; drawn from N(0, I) with ``generator`` when omitted.
    Returns:
        x̃ in the dtype of x.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("alpha", alpha, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or alpha.shape != x.shape[:-1]:
        raise ValueError(f"alpha must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(alpha.shape)}")
    check_finite("alpha", alpha)
    if bool(((alpha < 0) | (alpha > 1)).any()):
        raise ValueError(f"alpha must lie in [0, 1], got min {float(alpha.min())} and max {float(alpha.max())}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        check_tensor("noise", noise, dtypes=FLOAT_DTYPES)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    check_same_device(x=x, alpha=alpha, noise=noise)
    out = VPGateFunction.apply(x.double(), alpha.double(), noise.double(), clamp_eps)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Hard selection (inference)
# --------------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """What the selection step hands on: kept rows of every image, in original order.

    Attributes:
        indices: ``(ΣK,)`` int64 flat indices into the input tokens, ascending within each image.
        features: ``(ΣK, d)`` gathered rows, or ``None`` when no features were given.
        position_ids: ``(ΣK,)`` or ``(3, ΣK)`` int64 position ids of the kept tokens.
        cu_seqlens: ``(B+1,)`` int64 offsets of each image's kept tokens.
    """

    indices: Tensor
    features: Optional[Tensor]
    position_ids: Tensor
    cu_seqlens: Tensor


def hard_topk_indices(scores: Tensor, k: IntOrTensor, cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Flat indices of each image's K best scores (ties to the lower index), ascending per image.

    Returns ``(indices (ΣK,) int64, kept_cu_seqlens (B+1,) int64)``.
    """
    cu = check_scores(scores, cu_seqlens)
    k_t = check_k(k, ragged.lengths_from_cu_seqlens(cu))
    parts = []
    for i, (start, end) in enumerate(ragged.segment_bounds(cu)):
        # A stable descending sort keeps equal scores in index order, so ties go to the lower index.
        order = torch.sort(scores[start:end].double(), descending=True, stable=True).indices
        parts.append(torch.sort(order[: int(k_t[i])]).values + start)
    return torch.cat(parts), ragged.cu_seqlens_from_lengths(k_t.cpu()).to(scores.device)


def default_positions(cu_seqlens: Tensor) -> Tensor:
    """Position ids 0..N_i-1 within each image: what an image alone in a sequence would carry."""
    return torch.cat([torch.arange(e - s, device=cu_seqlens.device) for s, e in ragged.segment_bounds(cu_seqlens)])


def select_tokens(
    scores: Tensor,
    features: Optional[Tensor],
    k: IntOrTensor,
    cu_seqlens: Tensor | None = None,
    *,
    positions: Optional[Tensor] = None,
    position_mode: str = "original",
) -> Selection:
    """Hard top-K per image, the gathered rows and their position ids.

    Args:
        scores: ``(ΣN,)`` Scorer outputs.
        features: ``(ΣN, d)`` rows to gather, or ``None``.
        k: budget per image (int or ``(B,)`` tensor).
        positions: full-sequence position ids of every visual token, ``(ΣN,)`` (1-D) or ``(3, ΣN)``
            (M-RoPE, as the model computes them without pruning). Default: 0..N_i-1 per image.
        position_mode: ``"original"`` keeps each kept token's own position (gaps remain);
            ``"compact"`` renumbers the kept tokens ``p_first + 0..K-1``, where ``p_first`` is the
            position (each row, for M-RoPE) of the image's first token.
    """
    check_choice("position_mode", position_mode, POSITION_MODES)
    cu = check_scores(scores, cu_seqlens)
    check_selection_inputs(scores, features, positions)
    if features is not None:
        check_same_device(scores=scores, features=features)
    if positions is None:
        positions = default_positions(cu)
    indices, kept_cu = hard_topk_indices(scores, k, cu)
    positions = positions.to(device=scores.device, dtype=torch.int64)
    if position_mode == "original":
        kept_positions = positions[..., indices]
    else:
        parts = []
        for (start, _), (ks, ke) in zip(ragged.segment_bounds(cu), ragged.segment_bounds(kept_cu)):
            rank = torch.arange(ke - ks, device=scores.device)
            parts.append(positions[..., start : start + 1] + rank)
        kept_positions = torch.cat(parts, dim=-1)
    kept_features = None if features is None else features[indices]
    return Selection(indices=indices, features=kept_features, position_ids=kept_positions, cu_seqlens=kept_cu)
