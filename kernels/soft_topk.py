"""Fused Soft Top-K for training (DESIGN.md section 2.2-2.3): z-score, threshold solve, α, and backward.

This module owns two Triton kernels, one program per image (ragged batches through ``cu_seqlens``):

* ``_soft_topk_fwd_kernel``: mean / population variance of the scores, x = ŝ/τ, the threshold λ with
  Σ F(x_i - λ) = K, and α = F(x - λ). Per image it saves (mean, rstd, λ) for the backward.
* ``_soft_topk_bwd_kernel``: the implicit VJP ``∂L/∂x_j = f'_j (g_j - Σ f'_i g_i / Σ f'_i)`` (weights
  shifted by the largest log f' so the ratio survives f' underflowing), then ``/τ`` and the
  normalisation's backward ``∂L/∂s = rstd (gy - mean(gy) - ŝ mean(gy ŝ))``.

On chip: when one block of ``BLOCK_N`` tokens covers every image (``ON_CHIP``; the launcher picks it for
N up to 8,192 from host ints: ``max_seqlen`` or else ΣN, see ``launch_config``), each program loads its
image's scores once into registers and runs every pass of the solve there: HBM sees one read of the
scores and one write of α. Otherwise the passes loop over the image in ``BLOCK_N``
blocks (re-reads hit L2: an image of 16k fp32 scores is 64 KB). The backward holds the scores on
chip and re-reads the upstream gradient per pass (L1/L2), which keeps it free of spills.

The solve (a handful of passes instead of a 40-step bisection):
  - laplace: exact, by iterating the closed form of DESIGN.md 2.3. For a split m (the count of x_i
    above the current λ), A = Σ_{x>λ} e^{-x}, B = Σ_{x<=λ} e^{x} (max-shifted, log-sum-exp) give the
    root λ_m of A u² + 2(K-m) u - B = 0, u = e^λ. The model behind λ_m is below Σ F(x_i - λ) for every
    λ (1 - cosh z <= 0), so every λ_m <= λ*, with equality for the right split; started below λ*
    (min x - log N), the iterates rise monotonically and stop, exact, once the split no longer
    changes: 2-5 iterations on ordinary scores, ~30 for K = 1 of 16k scores at τ = 0.05 with an outlier.
  - sigmoid: Newton on Σ σ(x_i - λ) = K with a bisection safeguard inside the bracket
    [min x - logit(K/N), max x - logit(K/N)], until the step is below 1e-6 (relative) or
    ``MAX_ITERS``; ~10 iterations on ordinary scores.
  K = N gives λ = -inf and α = 1.

Precision: the mean and variance are taken of s - s_first (the image's first score): the difference is
exact for scores near each other (Sterbenz), so a small spread on a large offset (1e4 + 0.003·randn)
survives in fp32. The saved mean is that of s - s_first. All arithmetic is fp32 whatever the input
dtype (loads are cast at once); no libdevice. Argument checking lives in ``autoselect_fast.ops``; the
launchers here trust their inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK_N = 2048  # token block of the looped (not on-chip) kernels: 8 block reductions per pass at 16k
# The longest image held in registers: 8,192 fp32 over 16 warps (16 per thread). At 16,384 over 32
# warps (64 registers per thread) the compile gate shows spills (sigmoid on sm_90, both F on sm_80),
# so longer images take the looped kernel.
MAX_ON_CHIP = 8_192
MAX_ITERS = 64  # cap of the solve's iterations (the Laplace iteration is exact long before)


@triton.jit
def _cdf(z, F_SIGMOID: tl.constexpr):
    """F(z) on e^{-|z|} (no overflow): Laplace ½e^z / 1 - ½e^-z, sigmoid (1 or e^-|z|) / (1 + e^-|z|)."""
    e = tl.exp(-tl.abs(z))
    if F_SIGMOID:
        return tl.fdiv(tl.where(z >= 0, 1.0, e), 1.0 + e)  # div.full (approximate, ~2 ulp) on CUDA
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
def _block(seg, off, n, shift, chip, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """(s - shift with 0 past the image, mask) of the block at ``off``: from registers when on chip.

    On chip, lanes past the image hold NaN, so the mask is ``chip == chip`` and costs no registers
    (an index vector live across the solve would spill the 16k-token kernel)."""
    if ON_CHIP:
        mask = chip == chip
        v = tl.where(mask, chip, 0.0)
    else:
        offs = off + tl.arange(0, BLOCK_N)
        mask = offs < n
        v = tl.where(mask, tl.load(seg + offs, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
    return v, mask


@triton.jit
def _acc_init(value, dtype: tl.constexpr, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """A pass accumulator: a scalar on chip (one block, reduced at once), else one value per lane,
    reduced once at the end of the pass (one block reduction per pass, not one per block)."""
    if ON_CHIP:
        return tl.full([], value, dtype)
    else:
        return tl.full([BLOCK_N], value, dtype)


@triton.jit
def _acc_sum(acc, x, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return acc + tl.sum(x, 0)
    else:
        return acc + x


@triton.jit
def _acc_min(acc, x, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return tl.minimum(acc, tl.min(x, 0))
    else:
        return tl.minimum(acc, x)


@triton.jit
def _acc_max(acc, x, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return tl.maximum(acc, tl.max(x, 0))
    else:
        return tl.maximum(acc, x)


@triton.jit
def _total_sum(acc, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return acc
    else:
        return tl.sum(acc, 0)


@triton.jit
def _total_min(acc, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return acc
    else:
        return tl.min(acc, 0)


@triton.jit
def _total_max(acc, ON_CHIP: tl.constexpr):
    if ON_CHIP:
        return acc
    else:
        return tl.max(acc, 0)


@triton.jit
def _laplace_step(seg, n, k, shift, chip, mean, scale, lam, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """(m, λ_m): the split m = #(x > lam) and the closed-form root for that split."""
    m = _acc_init(0, tl.int32, ON_CHIP, BLOCK_N)
    lo_above = _acc_init(float("inf"), tl.float32, ON_CHIP, BLOCK_N)  # min x over x > lam (the shift of A)
    hi_below = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)  # max x over x <= lam (the shift of B)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        x = (v - mean) * scale
        above = (x > lam) & mask
        below = (x <= lam) & mask
        m = _acc_sum(m, above.to(tl.int32), ON_CHIP)
        lo_above = _acc_min(lo_above, tl.where(above, x, float("inf")), ON_CHIP)
        hi_below = _acc_max(hi_below, tl.where(below, x, float("-inf")), ON_CHIP)
    m = _total_sum(m, ON_CHIP)
    lo_above = _total_min(lo_above, ON_CHIP)
    hi_below = _total_max(hi_below, ON_CHIP)
    sum_a = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    sum_b = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        x = (v - mean) * scale
        # exp(-inf) = 0 drops the other side's terms (masking the argument keeps exp from overflowing).
        sum_a = _acc_sum(sum_a, tl.exp(tl.where((x > lam) & mask, lo_above - x, float("-inf"))), ON_CHIP)
        sum_b = _acc_sum(sum_b, tl.exp(tl.where((x <= lam) & mask, x - hi_below, float("-inf"))), ON_CHIP)
    sum_a = _total_sum(sum_a, ON_CHIP)
    sum_b = _total_sum(sum_b, ON_CHIP)
    # log A = -inf when m = 0, log B = -inf when m = N (the maximum() only keeps log() quiet).
    log_a = tl.where(sum_a > 0, -lo_above + tl.log(tl.maximum(sum_a, 1e-30)), float("-inf"))
    log_b = tl.where(sum_b > 0, hi_below + tl.log(tl.maximum(sum_b, 1e-30)), float("-inf"))
    c = k - m.to(tl.float32)
    log_c = tl.log(tl.maximum(tl.abs(c), 0.5))  # c is an integer; c = 0 takes the lam_zero branch
    log_r = 0.5 * _logaddexp(2.0 * log_c, log_a + log_b)
    lam_pos = log_b - _logaddexp(log_r, log_c)  # c > 0: λ = log B - log(r + c)
    lam_neg = _logaddexp(log_r, log_c) - log_a  # c < 0: λ = log(r - c) - log A
    lam_zero = 0.5 * (log_b - log_a)  # c = 0: A u² = B
    return m, tl.where(c > 0, lam_pos, tl.where(c < 0, lam_neg, lam_zero))


@triton.jit
def _sigmoid_sums(seg, n, shift, chip, mean, scale, lam, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """(Σ σ(x - lam), Σ σ'(x - lam))."""
    g = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    gp = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        a = tl.where(mask, _cdf((v - mean) * scale - lam, True), 0.0)
        g = _acc_sum(g, a, ON_CHIP)
        gp = _acc_sum(gp, a * (1.0 - a), ON_CHIP)
    return _total_sum(g, ON_CHIP), _total_sum(gp, ON_CHIP)


@triton.jit
def _soft_topk_fwd_kernel(
    s_ptr, cu_ptr, k_ptr, alpha_ptr, stats_ptr, inv_tau, eps,
    NORMALIZE: tl.constexpr, F_SIGMOID: tl.constexpr, MAX_ITERS: tl.constexpr, BLOCK_N: tl.constexpr,
    ON_CHIP: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    n = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    k_int = tl.load(k_ptr + b).to(tl.int32)
    k = k_int.to(tl.float32)
    n_f = n.to(tl.float32)
    seg = s_ptr + start

    shift = tl.full([], 0.0, tl.float32)
    if NORMALIZE:
        shift = tl.load(seg).to(tl.float32)
    chip = tl.zeros([BLOCK_N], tl.float32)
    if ON_CHIP:  # the one HBM read of the scores
        offs = tl.arange(0, BLOCK_N)
        chip = tl.where(offs < n, tl.load(seg + offs, mask=offs < n, other=0.0).to(tl.float32) - shift, float("nan"))

    # z-score: two passes (mean, then centred variance) of s - shift.
    mean = tl.full([], 0.0, tl.float32)
    rstd = tl.full([], 1.0, tl.float32)
    if NORMALIZE:
        acc = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            acc = _acc_sum(acc, v, ON_CHIP)
        mean = _total_sum(acc, ON_CHIP) / n_f
        acc = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            c = tl.where(mask, v - mean, 0.0)
            acc = _acc_sum(acc, c * c, ON_CHIP)
        rstd = 1.0 / tl.sqrt(_total_sum(acc, ON_CHIP) / n_f + eps)
    scale = rstd * inv_tau  # x = (s - shift - mean) * scale = ŝ / τ

    lam = tl.full([], float("-inf"), tl.float32)  # K = N: α ≡ 1
    if k_int < n:
        x_min = _acc_init(float("inf"), tl.float32, ON_CHIP, BLOCK_N)
        x_max = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            x = (v - mean) * scale
            x_min = _acc_min(x_min, tl.where(mask, x, float("inf")), ON_CHIP)
            x_max = _acc_max(x_max, tl.where(mask, x, float("-inf")), ON_CHIP)
        x_min = _total_min(x_min, ON_CHIP)
        x_max = _total_max(x_max, ON_CHIP)
        if F_SIGMOID:
            logit = tl.log(k) - tl.log(n_f - k)
            lo = x_min - logit  # g(lo) >= K >= g(hi), g(λ) = Σ σ(x_i - λ) decreasing
            hi = x_max - logit
            lam = lo
            step = tl.full([], float("inf"), tl.float32)
            it = 0
            while (it < MAX_ITERS) & (tl.abs(step) > 1e-6 * tl.maximum(1.0, tl.abs(lam))):
                g, gp = _sigmoid_sums(seg, n, shift, chip, mean, scale, lam, ON_CHIP, BLOCK_N)
                lo = tl.where(g > k, lam, lo)
                hi = tl.where(g > k, hi, lam)
                new = lam + (g - k) / tl.maximum(gp, 1e-30)  # Newton: g' = -Σ σ' (0: saturated, bisect)
                new = tl.where((new > lo) & (new < hi), new, 0.5 * (lo + hi))  # else bisect
                step = new - lam
                lam = new
                it += 1
        else:
            lam = x_min - tl.log(n_f)  # below λ*: every x_i is above it
            m_used = -1  # the split whose closed form gave lam (none yet)
            done = 0
            it = 0
            while (it < MAX_ITERS) & (done == 0):
                m, new = _laplace_step(seg, n, k, shift, chip, mean, scale, lam, ON_CHIP, BLOCK_N)
                done = (m == m_used).to(tl.int32)  # lam is the root for its own split: exact
                lam = tl.where(done != 0, lam, tl.maximum(new, lam))  # monotone (max() only absorbs rounding)
                m_used = m
                it += 1

    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        alpha = _cdf((v - mean) * scale - lam, F_SIGMOID)
        tl.store(alpha_ptr + start + off + tl.arange(0, BLOCK_N), alpha.to(alpha_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 3 * b, mean)
    tl.store(stats_ptr + 3 * b + 1, rstd)
    tl.store(stats_ptr + 3 * b + 2, lam)


@triton.jit
def _soft_topk_bwd_kernel(
    s_ptr, g_ptr, cu_ptr, k_ptr, stats_ptr, grad_ptr, inv_tau,
    NORMALIZE: tl.constexpr, F_SIGMOID: tl.constexpr, BLOCK_N: tl.constexpr, ON_CHIP: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    n = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    k_int = tl.load(k_ptr + b).to(tl.int32)
    n_f = n.to(tl.float32)
    mean = tl.load(stats_ptr + 3 * b)
    rstd = tl.load(stats_ptr + 3 * b + 1)
    lam = tl.load(stats_ptr + 3 * b + 2)
    scale = rstd * inv_tau
    seg = s_ptr + start
    gseg = g_ptr + start
    out = grad_ptr + start
    shift = tl.full([], 0.0, tl.float32)
    if NORMALIZE:
        shift = tl.load(seg).to(tl.float32)  # as in the forward
    if k_int < n:
        chip = tl.zeros([BLOCK_N], tl.float32)
        if ON_CHIP:  # the scores once; the upstream gradient is re-read per pass (L1/L2 hits) to save registers
            offs = tl.arange(0, BLOCK_N)
            chip = tl.where(offs < n, tl.load(seg + offs, mask=offs < n, other=0.0).to(tl.float32) - shift, float("nan"))
        # mean_g = Σ f' g / Σ f' with f' shifted by its largest log (the smallest |x - λ|).
        log_max = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            log_fp = _log_density((v - mean) * scale - lam, F_SIGMOID)
            log_max = _acc_max(log_max, tl.where(mask, log_fp, float("-inf")), ON_CHIP)
        log_max = _total_max(log_max, ON_CHIP)
        w_sum = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        wg_sum = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            g = tl.load(gseg + off + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
            w = tl.exp(tl.where(mask, _log_density((v - mean) * scale - lam, F_SIGMOID) - log_max, float("-inf")))
            w_sum = _acc_sum(w_sum, w, ON_CHIP)
            wg_sum = _acc_sum(wg_sum, w * g, ON_CHIP)
        mean_g = _total_sum(wg_sum, ON_CHIP) / _total_sum(w_sum, ON_CHIP)
        # gy = ∂L/∂ŝ = f' (g - mean_g) / τ; without normalisation it is already ∂L/∂s.
        sum_gy = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        sum_gy_sh = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        if NORMALIZE:
            for off in range(0, n, BLOCK_N):
                v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
                g = tl.load(gseg + off + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
                s_hat = (v - mean) * rstd
                gy = tl.where(mask, tl.exp(_log_density(s_hat * inv_tau - lam, F_SIGMOID)) * (g - mean_g) * inv_tau, 0.0)
                sum_gy = _acc_sum(sum_gy, gy, ON_CHIP)
                sum_gy_sh = _acc_sum(sum_gy_sh, gy * s_hat, ON_CHIP)
        mean_gy = _total_sum(sum_gy, ON_CHIP) / n_f
        mean_gy_sh = _total_sum(sum_gy_sh, ON_CHIP) / n_f
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            g = tl.load(gseg + off + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
            s_hat = (v - mean) * rstd
            gy = tl.exp(_log_density(s_hat * inv_tau - lam, F_SIGMOID)) * (g - mean_g) * inv_tau
            if NORMALIZE:
                grad = rstd * (gy - mean_gy - s_hat * mean_gy_sh)
            else:
                grad = gy
            tl.store(out + off + tl.arange(0, BLOCK_N), grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:  # K = N: α ≡ 1 does not depend on the scores
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            tl.store(out + offs, tl.zeros([BLOCK_N], tl.float32).to(grad_ptr.dtype.element_ty), mask=offs < n)


def launch_config(total_n: int, f: str, max_seqlen: Optional[int] = None, block_n: Optional[int] = None) -> dict:
    """BLOCK_N, ON_CHIP and num_warps for images of at most ``max_seqlen`` tokens (host ints only).

    Without ``max_seqlen`` the total token count bounds the longest image (no device read). An explicit
    ``block_n`` is the looped kernels' block (and on chip if it covers the longest image). On chip up to
    ``MAX_ON_CHIP`` tokens (16 fp32 per thread), where the compile gate shows no spills.
    """
    longest = total_n if max_seqlen is None else min(max_seqlen, total_n)
    longest = max(longest, 1)
    if block_n is None:
        block_n = triton.next_power_of_2(longest) if longest <= MAX_ON_CHIP else DEFAULT_BLOCK_N
    on_chip = longest <= block_n
    return dict(BLOCK_N=block_n, ON_CHIP=on_chip, num_warps=min(16, max(4, block_n // 512)) if on_chip else 4)


def soft_topk_forward(
    scores: Tensor, k: Tensor, cu_seqlens: Tensor, tau: float, f: str, normalize: bool,
    eps: float = 1e-6, *, block_n: Optional[int] = None, n_iters: int = MAX_ITERS, max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """α ``(ΣN,)`` in the dtype of ``scores`` and per-image stats ``(B, 3)`` fp32 (mean of s - s_first, rstd, λ).

    ``scores`` contiguous ``(ΣN,)``; ``k`` int64 ``(B,)`` with 1 <= k <= N; ``cu_seqlens`` int64.
    ``max_seqlen``: the longest image if the caller knows it on the host (picks the on-chip kernel).
    ``n_iters`` caps the solve's iterations.
    """
    batch = k.numel()
    alpha = torch.empty_like(scores)
    stats = torch.empty((batch, 3), dtype=torch.float32, device=scores.device)
    _soft_topk_fwd_kernel[(batch,)](
        scores, cu_seqlens, k, alpha, stats, 1.0 / tau, eps,
        NORMALIZE=normalize, F_SIGMOID=f == "sigmoid", MAX_ITERS=n_iters,
        **launch_config(scores.numel(), f, max_seqlen, block_n),
    )
    return alpha, stats


def soft_topk_backward(
    scores: Tensor, grad_alpha: Tensor, k: Tensor, cu_seqlens: Tensor, stats: Tensor, tau: float, f: str,
    normalize: bool, *, block_n: Optional[int] = None, max_seqlen: Optional[int] = None,
) -> Tensor:
    """∂L/∂scores ``(ΣN,)`` in the dtype of ``scores`` from the upstream ``grad_alpha`` (contiguous)."""
    grad = torch.empty_like(scores)
    _soft_topk_bwd_kernel[(k.numel(),)](
        scores, grad_alpha, cu_seqlens, k, stats, grad, 1.0 / tau,
        NORMALIZE=normalize, F_SIGMOID=f == "sigmoid", **launch_config(scores.numel(), f, max_seqlen, block_n),
    )
    return grad


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``.

    576 tokens (LLaVA-1.5, on chip in 1,024), 2,880 (LLaVA-NeXT, 4,096), 8,192 (the on-chip limit) and
    16,384 (the looped kernel); fp32 and bf16 scores, both F.
    """
    from . import CompileCase, pointer_type

    cases = []
    for dtype, lengths in ((torch.float32, (576, 2880, 8192, 16_384)), (torch.bfloat16, (576,))):
        s = pointer_type(dtype)
        for n in lengths:
            for f in ("laplace", "sigmoid"):
                cfg = launch_config(n, f, n)
                warps = cfg.pop("num_warps")
                flags = dict(NORMALIZE=True, F_SIGMOID=f == "sigmoid", **cfg)
                tag = f"{s[1:]},{f},N={n}{'' if cfg['ON_CHIP'] else ',looped'}"
                cases.append(CompileCase(
                    f"soft_topk_fwd[{tag}]", _soft_topk_fwd_kernel,
                    dict(s_ptr=s, cu_ptr="*i64", k_ptr="*i64", alpha_ptr=s, stats_ptr="*fp32", inv_tau="fp32", eps="fp32"),
                    dict(flags, MAX_ITERS=MAX_ITERS), num_warps=warps))
                cases.append(CompileCase(
                    f"soft_topk_bwd[{tag}]", _soft_topk_bwd_kernel,
                    dict(s_ptr=s, g_ptr=s, cu_ptr="*i64", k_ptr="*i64", stats_ptr="*fp32", grad_ptr=s, inv_tau="fp32"),
                    flags, num_warps=warps))
    return cases
