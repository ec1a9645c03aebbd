"""Fused Soft Top-K for training (DESIGN.md section 2.2-2.3): z-score, threshold solve, α, and backward.

This module owns two Triton kernels, one program per image (ragged batches through ``cu_seqlens``),
each looping over the image's tokens in blocks of ``BLOCK_N`` so N can be tens of thousands:

* ``_soft_topk_fwd_kernel``: mean / population variance of the raw scores (two passes), x = ŝ/τ
  recomputed on the fly from the scores, the threshold λ with Σ F(x_i - λ) = K, and α = F(x - λ).
  - laplace: bisection on λ locates the split m (= #x_i > λ); λ is then the closed form of
    DESIGN.md 2.3 for that m, with A and B as max-shifted sums (log-sum-exp), so nothing overflows
    for |x| in the thousands. A split that is off by one because a point sits within the bisection's
    noise of λ changes λ only at second order (both pieces of F agree in value and slope at 0).
  - sigmoid: bisection on λ inside [min x - logit(K/N), max x - logit(K/N)].
  K = N gives λ = -inf and α = 1. Per image it saves (mean, rstd, λ) for the backward, where
  mean is that of s - s_first (the image's first score; see the z-score comment).
* ``_soft_topk_bwd_kernel``: the implicit VJP ``∂L/∂x_j = f'_j (g_j - Σ f'_i g_i / Σ f'_i)`` (weights
  shifted by the largest log f' so the ratio survives f' underflowing), then ``/τ`` and the
  normalisation's backward ``∂L/∂s = rstd (gy - mean(gy) - ŝ mean(gy ŝ))``.

All arithmetic is fp32 whatever the input dtype (loads are cast at once); no libdevice.
Argument checking lives in ``autoselect_fast.ops``; the launchers here trust their inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK_N = 1024
# Bisection steps on λ. The bracket is at most ~2·sqrt(N)/τ + 2·log N wide, so 40 halvings reach
# below fp32 resolution for every realistic N and τ; extra steps are harmless (mid stops moving).
N_BISECT = 40


@triton.jit
def _cdf(z, F_SIGMOID: tl.constexpr):
    """F(z) without overflow: Laplace ½e^z / 1 - ½e^-z, sigmoid written on e^{-|z|}."""
    e = tl.exp(-tl.abs(z))
    if F_SIGMOID:
        return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:
        return tl.where(z >= 0, 1.0 - 0.5 * e, 0.5 * e)


@triton.jit
def _log_density(z, F_SIGMOID: tl.constexpr):
    """log f'(z): Laplace log ½ - |z|, sigmoid -|z| - 2 log(1 + e^{-|z|})."""
    a = tl.abs(z)
    if F_SIGMOID:
        return -a - 2.0 * tl.log(1.0 + tl.exp(-a))
    else:
        return -0.6931471805599453 - a


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def _laplace_lambda(seg, n, k, shift, mean, scale, lam_b, BLOCK_N: tl.constexpr):
    """Closed-form λ for the split m = #(x > lam_b): root u = e^λ of A u² + 2(K-m) u - B = 0."""
    # Pass 1: m and the shifts (largest exponent on each side).
    m = 0
    max_a = tl.full([], float("-inf"), tl.float32)  # max of -x over x > lam_b
    max_b = tl.full([], float("-inf"), tl.float32)  # max of  x over x <= lam_b
    for off in range(0, n, BLOCK_N):
        offs = off + tl.arange(0, BLOCK_N)
        mask = offs < n
        x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
        above = (x > lam_b) & mask
        below = (x <= lam_b) & mask
        m += tl.sum(above.to(tl.int32), 0)
        max_a = tl.maximum(max_a, tl.max(tl.where(above, -x, float("-inf")), 0))
        max_b = tl.maximum(max_b, tl.max(tl.where(below, x, float("-inf")), 0))
    # Pass 2: A = e^{max_a} Σ e^{-x - max_a}, B = e^{max_b} Σ e^{x - max_b}; every exponent <= 0.
    sum_a = 0.0
    sum_b = 0.0
    for off in range(0, n, BLOCK_N):
        offs = off + tl.arange(0, BLOCK_N)
        mask = offs < n
        x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
        # exp(-inf) = 0 drops the other side's terms (masking the argument keeps exp from overflowing).
        sum_a += tl.sum(tl.exp(tl.where((x > lam_b) & mask, -x - max_a, float("-inf"))), 0)
        sum_b += tl.sum(tl.exp(tl.where((x <= lam_b) & mask, x - max_b, float("-inf"))), 0)
    # log A = -inf when m = 0, log B = -inf when m = N (the maximum() only keeps log() quiet).
    log_a = tl.where(sum_a > 0, max_a + tl.log(tl.maximum(sum_a, 1e-30)), float("-inf"))
    log_b = tl.where(sum_b > 0, max_b + tl.log(tl.maximum(sum_b, 1e-30)), float("-inf"))
    c = k - m.to(tl.float32)
    log_c = tl.log(tl.maximum(tl.abs(c), 0.5))  # c is an integer; c = 0 takes the lam_zero branch
    log_r = 0.5 * _logaddexp(2.0 * log_c, log_a + log_b)
    lam_pos = log_b - _logaddexp(log_r, log_c)  # c > 0: λ = log B - log(r + c)
    lam_neg = _logaddexp(log_r, log_c) - log_a  # c < 0: λ = log(r - c) - log A
    lam_zero = 0.5 * (log_b - log_a)  # c = 0: A u² = B
    return tl.where(c > 0, lam_pos, tl.where(c < 0, lam_neg, lam_zero))


@triton.jit
def _soft_topk_fwd_kernel(
    s_ptr, cu_ptr, k_ptr, alpha_ptr, stats_ptr, inv_tau, eps,
    NORMALIZE: tl.constexpr, F_SIGMOID: tl.constexpr, N_ITERS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    k_int = tl.load(k_ptr + b)
    k = k_int.to(tl.float32)
    n_f = n.to(tl.float32)
    seg = s_ptr + start

    # z-score: two passes (mean, then centred variance), both on the scores shifted by the image's
    # first score. s - shift is exact for scores near the shift (Sterbenz), so a small spread on a
    # large offset (1e4 + 0.003·randn) survives; an fp32 mean of the raw scores would not.
    mean = tl.full([], 0.0, tl.float32)  # the mean of s - shift
    rstd = tl.full([], 1.0, tl.float32)
    if NORMALIZE:
        shift = tl.load(seg).to(tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            acc += tl.where(mask, tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        mean = tl.sum(acc, 0) / n_f
        acc = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            c = tl.where(mask, (tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean, 0.0)
            acc += c * c
        rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / n_f + eps)
    else:
        shift = tl.full([], 0.0, tl.float32)
    scale = rstd * inv_tau  # x = (s - mean) * scale = ŝ / τ

    lam = tl.full([], float("-inf"), tl.float32)  # K = N: α ≡ 1
    if k_int < n:
        x_min = float("inf")
        x_max = float("-inf")
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
            x_min = tl.minimum(x_min, tl.min(tl.where(mask, x, float("inf")), 0))
            x_max = tl.maximum(x_max, tl.max(tl.where(mask, x, float("-inf")), 0))
        # Bracket with g(lo) >= K >= g(hi), g(λ) = Σ F(x_i - λ) decreasing.
        if F_SIGMOID:
            logit = tl.log(k) - tl.log(n_f - k)
            lo = x_min - logit
            hi = x_max - logit
        else:  # Laplace: g(min x - log N) >= N - ½ > K and g(max x + log N) <= ½ < K
            lo = x_min - tl.log(n_f)
            hi = x_max + tl.log(n_f)
        for _ in range(N_ITERS):
            mid = 0.5 * (lo + hi)
            g = tl.zeros([BLOCK_N], tl.float32)
            for off in range(0, n, BLOCK_N):
                offs = off + tl.arange(0, BLOCK_N)
                mask = offs < n
                x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
                g += tl.where(mask, _cdf(x - mid, F_SIGMOID), 0.0)
            too_many = tl.sum(g, 0) > k
            lo = tl.where(too_many, mid, lo)
            hi = tl.where(too_many, hi, mid)
        if F_SIGMOID:
            lam = 0.5 * (lo + hi)
        else:
            lam = _laplace_lambda(seg, n, k, shift, mean, scale, 0.5 * (lo + hi), BLOCK_N)

    for off in range(0, n, BLOCK_N):
        offs = off + tl.arange(0, BLOCK_N)
        mask = offs < n
        x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
        alpha = _cdf(x - lam, F_SIGMOID)
        tl.store(alpha_ptr + start + offs, alpha.to(alpha_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 3 * b, mean)
    tl.store(stats_ptr + 3 * b + 1, rstd)
    tl.store(stats_ptr + 3 * b + 2, lam)


@triton.jit
def _soft_topk_bwd_kernel(
    s_ptr, g_ptr, cu_ptr, k_ptr, stats_ptr, grad_ptr, inv_tau,
    NORMALIZE: tl.constexpr, F_SIGMOID: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    k_int = tl.load(k_ptr + b)
    n_f = n.to(tl.float32)
    mean = tl.load(stats_ptr + 3 * b)
    rstd = tl.load(stats_ptr + 3 * b + 1)
    lam = tl.load(stats_ptr + 3 * b + 2)
    scale = rstd * inv_tau
    seg = s_ptr + start
    shift = tl.full([], 0.0, tl.float32)
    if NORMALIZE:
        shift = tl.load(seg).to(tl.float32)  # as in the forward
    gseg = g_ptr + start
    out = grad_ptr + start
    if k_int < n:
        # mean_g = Σ f' g / Σ f' with f' shifted by its largest log (the smallest |x - λ|).
        log_max = float("-inf")
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
            log_fp = _log_density(x - lam, F_SIGMOID)
            log_max = tl.maximum(log_max, tl.max(tl.where(mask, log_fp, float("-inf")), 0))
        w_sum = tl.zeros([BLOCK_N], tl.float32)
        wg_sum = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
            g = tl.load(gseg + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.exp(tl.where(mask, _log_density(x - lam, F_SIGMOID) - log_max, float("-inf")))
            w_sum += w
            wg_sum += w * g
        mean_g = tl.sum(wg_sum, 0) / tl.sum(w_sum, 0)
        # gy = ∂L/∂ŝ = f' (g - mean_g) / τ; without normalisation it is already ∂L/∂s.
        sum_gy = tl.zeros([BLOCK_N], tl.float32)
        sum_gy_sh = tl.zeros([BLOCK_N], tl.float32)
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            x = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * scale
            g = tl.load(gseg + offs, mask=mask, other=0.0).to(tl.float32)
            gy = tl.exp(_log_density(x - lam, F_SIGMOID)) * (g - mean_g) * inv_tau
            if NORMALIZE:
                gy = tl.where(mask, gy, 0.0)
                sum_gy += gy
                sum_gy_sh += gy * (x / inv_tau)  # ŝ = x·τ
            else:
                tl.store(out + offs, gy.to(grad_ptr.dtype.element_ty), mask=mask)
        if NORMALIZE:
            mean_gy = tl.sum(sum_gy, 0) / n_f
            mean_gy_sh = tl.sum(sum_gy_sh, 0) / n_f
            for off in range(0, n, BLOCK_N):
                offs = off + tl.arange(0, BLOCK_N)
                mask = offs < n
                s_hat = ((tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift) - mean) * rstd
                g = tl.load(gseg + offs, mask=mask, other=0.0).to(tl.float32)
                gy = tl.exp(_log_density(s_hat * inv_tau - lam, F_SIGMOID)) * (g - mean_g) * inv_tau
                grad = rstd * (gy - mean_gy - s_hat * mean_gy_sh)
                tl.store(out + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:  # K = N: α ≡ 1 does not depend on the scores
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            tl.store(out + offs, tl.zeros([BLOCK_N], tl.float32).to(grad_ptr.dtype.element_ty), mask=offs < n)


def soft_topk_forward(
    scores: Tensor, k: Tensor, cu_seqlens: Tensor, tau: float, f: str, normalize: bool,
    eps: float = 1e-6, *, block_n: int = DEFAULT_BLOCK_N, n_iters: int = N_BISECT,
) -> tuple[Tensor, Tensor]:
    """α ``(ΣN,)`` in the dtype of ``scores`` and per-image stats ``(B, 3)`` fp32 (mean of s - s_first, rstd, λ).

    ``scores`` contiguous ``(ΣN,)``; ``k`` int64 ``(B,)`` with 1 <= k <= N; ``cu_seqlens`` int64.
    """
    batch = k.numel()
    alpha = torch.empty_like(scores)
    stats = torch.empty((batch, 3), dtype=torch.float32, device=scores.device)
    _soft_topk_fwd_kernel[(batch,)](
        scores, cu_seqlens, k, alpha, stats, 1.0 / tau, eps,
        NORMALIZE=normalize, F_SIGMOID=f == "sigmoid", N_ITERS=n_iters, BLOCK_N=block_n,
    )
    return alpha, stats


def soft_topk_backward(
    scores: Tensor, grad_alpha: Tensor, k: Tensor, cu_seqlens: Tensor, stats: Tensor, tau: float, f: str,
    normalize: bool, *, block_n: int = DEFAULT_BLOCK_N,
) -> Tensor:
    """∂L/∂scores ``(ΣN,)`` in the dtype of ``scores`` from the upstream ``grad_alpha`` (contiguous)."""
    grad = torch.empty_like(scores)
    _soft_topk_bwd_kernel[(k.numel(),)](
        scores, grad_alpha, cu_seqlens, k, stats, grad, 1.0 / tau,
        NORMALIZE=normalize, F_SIGMOID=f == "sigmoid", BLOCK_N=block_n,
    )
    return grad


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``."""
    from . import CompileCase, pointer_type

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = pointer_type(dtype)
        for f in ("laplace", "sigmoid"):
            flags = dict(NORMALIZE=True, F_SIGMOID=f == "sigmoid", BLOCK_N=DEFAULT_BLOCK_N)
            cases.append(CompileCase(
                f"soft_topk_fwd[{s[1:]},{f}]", _soft_topk_fwd_kernel,
                dict(s_ptr=s, cu_ptr="*i64", k_ptr="*i64", alpha_ptr=s, stats_ptr="*fp32", inv_tau="fp32", eps="fp32"),
                dict(flags, N_ITERS=N_BISECT), num_warps=4))
            cases.append(CompileCase(
                f"soft_topk_bwd[{s[1:]},{f}]", _soft_topk_bwd_kernel,
                dict(s_ptr=s, g_ptr=s, cu_ptr="*i64", k_ptr="*i64", stats_ptr="*fp32", grad_ptr=s, inv_tau="fp32"),
                flags, num_warps=4))
    return cases
