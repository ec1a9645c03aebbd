"""Fused Soft Top-K for training (docs/design.md, "Soft Top-K"): z-score, threshold solve, α, and backward.

This module owns two Triton kernels, one program per image (ragged batches through ``cu_seqlens``):

* ``_soft_topk_fwd_kernel``: mean / population variance of the scores, x = ŝ/τ, the threshold λ with
  Σ F(x_i - λ) = K, and α = F(x - λ). Per image it saves ``STATS`` floats for the backward:
  (mean, rstd, anchor, μ), λ being held as a score ``anchor`` plus an offset μ (below).
* ``_soft_topk_bwd_kernel``: the implicit VJP ``∂L/∂x_j = f'_j (g_j - Σ f'_i g_i / Σ f'_i)`` (weights
  shifted by the largest log f' so the ratio survives f' underflowing), then ``/τ`` and the
  normalisation's backward ``∂L/∂s = rstd (gy - mean(gy) - ŝ mean(gy ŝ))``.

On chip: when one block of ``BLOCK_N`` tokens covers every image (``ON_CHIP``; the launcher picks it for
N up to 8,192 from host ints: ``max_seqlen`` or else ΣN, see ``launch_config``), each program loads its
image's scores once into registers and runs every pass of the solve there: HBM sees one read of the
scores and one write of α. Otherwise the passes loop over the image in ``BLOCK_N``
blocks (re-reads hit L2: an image of 16k fp32 scores is 64 KB). The backward holds the scores on
chip and re-reads the upstream gradient per pass (L1/L2), which keeps it free of spills.

Thresholds relative to a score: x itself can be large (raw scores with ``normalize=False``, or τ small:
|x| = 1e5 has an fp32 ulp of 0.008), but α only needs z = x - λ where |z| is small. So every
threshold is a pair (anchor, μ) with λ = x(anchor) + μ, anchor one of the image's scores near λ, and
z_i = (s_i - anchor)·rstd/τ - μ: a difference of nearby scores times the scale, exact to fp32 precision
in z whatever |x| is. The solve re-anchors at the scores that bound the current split.

The solve keeps a bracket [lo, hi] ∋ λ* and takes a handful of passes on ordinary scores:
  - laplace: exact, by the closed form of the design (split m = the count of x_i above the trial λ,
    A = Σ_{x>λ} e^{-x}, B = Σ_{x<=λ} e^{x} summed shifted by the split's two boundary scores, λ_m the
    root of A u² + 2(K-m) u - B = 0, u = e^λ). The model behind λ_m equals Σ F(x_i - λ) at the trial
    and bounds it beyond, on the trial's side (1 - cosh z <= 0), so λ_m lies between the trial and λ*:
    a new end of the bracket. λ_m is λ* when it falls in its own split's interval, which this step
    tells from the boundary scores: done. Otherwise the next trial is λ_m, or the bracket's middle when
    that step shrank the bracket by less than half (scores spread far apart move λ_m by only ~log 2N
    per step). Iterations of two passes, measured in the interpreter: 7.4 on average (at most 12)
    over N = 576 and 2,880 z-scored scores, K/N from 1/N to 0.9, τ from 2 to 0.05; 15-21 for 1,000
    raw scores spread over |x| up to 2e3..1e5.
  - sigmoid: Newton on Σ σ(x_i - λ) = K with a bisection safeguard inside the bracket
    [min x - logit(K/N), max x - logit(K/N)], re-anchored every step, until the step is below 1e-6
    (relative) or Σσ is within ~2 fp32 ulps of K, or ``MAX_ITERS``. One-pass iterations on the same
    inputs: 6.3 on average (at most 13); 9-18 on the raw spread ones.
  K = N gives λ = -inf and α = 1.

Precision: the mean and variance are taken of s - s_first (the image's first score): the difference is
exact for scores near each other (Sterbenz), so a small spread on a large offset (1e4 + 0.003·randn)
survives in fp32. The saved mean and anchor are those of s - s_first. All arithmetic is fp32 whatever
the input dtype (loads are cast at once); no libdevice. Argument checking lives in
``autoselect_fast.ops``; the launchers here trust their inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Token block of the looped (not on-chip) kernels, per F: their passes keep per-lane accumulators
# (16 fp32 per thread at 2,048 over 4 warps), and the sigmoid pass carries four of them (Σσ, Σσ', and
# the split's boundary scores), which spill on sm_80 at 2,048 (the compile gate), so it takes 1,024.
DEFAULT_BLOCK_N = {"laplace": 2048, "sigmoid": 1024}
# The longest image held in registers: 8,192 fp32 over 16 warps (16 per thread). At 16,384 over 32
# warps (64 registers per thread) the compile gate shows spills (sigmoid on sm_90, both F on sm_80),
# so longer images take the looped kernel.
MAX_ON_CHIP = 8_192
MAX_ITERS = 96  # cap of the solve's iterations (the bracket halves every two: far more than fp32 needs)
STATS = 4  # per-image floats the forward saves for the backward: mean, rstd, anchor, μ


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
def _split(seg, n, shift, chip, scale, anchor, mu, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """At the threshold (anchor, μ): m = #(z > 0), the smallest score above it and the largest at/below it.

    z_i = (v_i - anchor)·scale - μ rounds monotonically in v_i, so the split is a prefix in v: above
    is ``v >= v_above``, below ``v <= v_below`` (empty sides: +inf / -inf)."""
    m = _acc_init(0, tl.int32, ON_CHIP, BLOCK_N)
    v_above = _acc_init(float("inf"), tl.float32, ON_CHIP, BLOCK_N)
    v_below = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        z = (v - anchor) * scale - mu
        above = (z > 0) & mask
        m = _acc_sum(m, above.to(tl.int32), ON_CHIP)
        v_above = _acc_min(v_above, tl.where(above, v, float("inf")), ON_CHIP)
        v_below = _acc_max(v_below, tl.where((z <= 0) & mask, v, float("-inf")), ON_CHIP)
    return _total_sum(m, ON_CHIP), _total_min(v_above, ON_CHIP), _total_max(v_below, ON_CHIP)


@triton.jit
def _laplace_root(log_a, log_b, c):
    """log u of the positive root of A u² + 2c u - B = 0 (c = K - m an integer), from log A and log B."""
    log_c = tl.log(tl.maximum(tl.abs(c), 0.5))  # c = 0 takes the last branch
    log_r = 0.5 * _logaddexp(2.0 * log_c, log_a + log_b)
    lam_pos = log_b - _logaddexp(log_r, log_c)  # c > 0: log B - log(r + c)
    lam_neg = _logaddexp(log_r, log_c) - log_a  # c < 0: log(r - c) - log A
    # c = 0 needs both sides (finite logs); the maximum() keeps that unused branch of a one-sided split
    # free of -inf + inf.
    lam_zero = 0.5 * (tl.maximum(log_b, -1e30) - tl.maximum(log_a, -1e30))
    return tl.where(c > 0, lam_pos, tl.where(c < 0, lam_neg, lam_zero))


@triton.jit
def _laplace_step(seg, n, k, shift, chip, scale, anchor, mu, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The closed-form root λ_m for the split m at the trial threshold (anchor, μ), two passes.

    Returns (λ_m - x_above, λ_m - x_below, v_above, v_below, t - x_below, t - x_above): λ_m and the
    trial t relative to the split's two boundary scores. A = Σ_{above} e^{-x}, B = Σ_{below} e^{x} are
    summed shifted by those scores, and the gap G = x_above - x_below between them is a difference of
    scores times the scale: λ_m relative to either boundary has fp32 precision whatever |x| is."""
    m, v_above, v_below = _split(seg, n, shift, chip, scale, anchor, mu, ON_CHIP, BLOCK_N)
    sum_a = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    sum_b = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        # exp(-inf) = 0 drops the other side's terms (masking the argument keeps exp from overflowing).
        sum_a = _acc_sum(sum_a, tl.exp(tl.where((v >= v_above) & mask, (v_above - v) * scale, float("-inf"))), ON_CHIP)
        sum_b = _acc_sum(sum_b, tl.exp(tl.where((v <= v_below) & mask, (v - v_below) * scale, float("-inf"))), ON_CHIP)
    # log Σ = -inf on an empty side (the maximum() only keeps log() quiet); the gap is +inf then.
    sum_a = _total_sum(sum_a, ON_CHIP)
    sum_b = _total_sum(sum_b, ON_CHIP)
    log_sa = tl.where(sum_a > 0, tl.log(tl.maximum(sum_a, 1e-30)), float("-inf"))
    log_sb = tl.where(sum_b > 0, tl.log(tl.maximum(sum_b, 1e-30)), float("-inf"))
    gap = (v_above - v_below) * scale
    c = k - m.to(tl.float32)
    mu_above = _laplace_root(log_sa, log_sb - gap, c)  # with e^{x_above} factored out of u
    mu_below = _laplace_root(log_sa - gap, log_sb, c)  # with e^{x_below} factored out
    t_below = (anchor - v_below) * scale + mu
    t_above = (anchor - v_above) * scale + mu
    return mu_above, mu_below, v_above, v_below, t_below, t_above


@triton.jit
def _sigmoid_sums(seg, n, shift, chip, scale, anchor, mu, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """(Σ σ(z), Σ σ'(z), v_above, v_below) at the trial threshold (anchor, μ), one pass (see _split)."""
    g = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    gp = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
    v_above = _acc_init(float("inf"), tl.float32, ON_CHIP, BLOCK_N)
    v_below = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)
    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        z = (v - anchor) * scale - mu
        a = tl.where(mask, _cdf(z, True), 0.0)
        g = _acc_sum(g, a, ON_CHIP)
        gp = _acc_sum(gp, a * (1.0 - a), ON_CHIP)
        v_above = _acc_min(v_above, tl.where((z > 0) & mask, v, float("inf")), ON_CHIP)
        v_below = _acc_max(v_below, tl.where((z <= 0) & mask, v, float("-inf")), ON_CHIP)
    return (_total_sum(g, ON_CHIP), _total_sum(gp, ON_CHIP), _total_min(v_above, ON_CHIP),
            _total_max(v_below, ON_CHIP))


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
    scale = rstd * inv_tau  # x = (v - mean)·scale = ŝ/τ; a threshold is (anchor, μ): λ = x(anchor) + μ

    anchor = tl.full([], 0.0, tl.float32)
    mu = tl.full([], float("-inf"), tl.float32)  # K = N: λ = -inf, α ≡ 1
    if k_int < n:
        v_min = _acc_init(float("inf"), tl.float32, ON_CHIP, BLOCK_N)
        v_max = _acc_init(float("-inf"), tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            v_min = _acc_min(v_min, tl.where(mask, v, float("inf")), ON_CHIP)
            v_max = _acc_max(v_max, tl.where(mask, v, float("-inf")), ON_CHIP)
        v_min = _total_min(v_min, ON_CHIP)
        v_max = _total_max(v_max, ON_CHIP)
        # The bracket [lo, hi] ∋ λ*, both ends as (anchor, μ) pairs, bisected when the solve stalls.
        if F_SIGMOID:
            logit = tl.log(k) - tl.log(n_f - k)  # g(lo) >= K >= g(hi), g(λ) = Σ σ(x_i - λ)
            lo_v = v_min
            lo_mu = -logit
            hi_v = v_max
            hi_mu = -logit
        else:
            log_n = tl.log(n_f)  # every F(x_i - lo) >= 1 - 1/2N, every F(x_i - hi) <= 1/2N
            lo_v = v_min
            lo_mu = -log_n
            hi_v = v_max
            hi_mu = log_n
        anchor = lo_v
        mu = lo_mu
        width = (hi_v - lo_v) * scale + hi_mu - lo_mu
        done = 0
        it = 0
        while (it < MAX_ITERS) & (done == 0):
            if F_SIGMOID:
                g, gp, v_above, v_below = _sigmoid_sums(seg, n, shift, chip, scale, anchor, mu, ON_CHIP, BLOCK_N)
                rising = g > k  # the trial is below λ*
                lo_v = tl.where(rising, anchor, lo_v)
                lo_mu = tl.where(rising, mu, lo_mu)
                hi_v = tl.where(rising, hi_v, anchor)
                hi_mu = tl.where(rising, hi_mu, mu)
                step = (g - k) / tl.maximum(gp, 1e-30)  # Newton: g' = -Σ σ' (0: saturated, bisect)
                new_mu = mu + step
                lo_rel = (lo_v - anchor) * scale + lo_mu
                hi_rel = (hi_v - anchor) * scale + hi_mu
                # Converged when the Newton step is below 1e-6 (relative) or Σσ is within 2.5e-7·K of K
                # (~2 fp32 ulps of K: the sum's own rounding, which further steps would only chase). Such
                # a last step is kept even where it rounds onto an end of the bracket; any other step
                # that leaves the bracket bisects it.
                small_step = tl.abs(step) <= 1e-6 * tl.maximum(1.0, tl.abs(mu))
                done = (small_step | (tl.abs(g - k) <= 2.5e-7 * k)).to(tl.int32)
                newton = ((new_mu >= lo_rel) & (new_mu <= hi_rel)) | (done != 0)
                new_mu = tl.where(newton, new_mu, 0.5 * (lo_rel + hi_rel))
                # Re-anchor at the nearer boundary score, so μ stays small and x - λ keeps fp32 precision.
                rel_above = new_mu - (v_above - anchor) * scale
                rel_below = new_mu - (v_below - anchor) * scale
                use_above = tl.abs(rel_above) < tl.abs(rel_below)
                keep = (tl.abs(new_mu) <= tl.abs(rel_above)) & (tl.abs(new_mu) <= tl.abs(rel_below))
                mu = tl.where(keep, new_mu, tl.where(use_above, rel_above, rel_below))
                anchor = tl.where(keep, anchor, tl.where(use_above, v_above, v_below))
            else:
                mu_above, mu_below, v_above, v_below, t_below, t_above = _laplace_step(
                    seg, n, k, shift, chip, scale, anchor, mu, ON_CHIP, BLOCK_N)
                # λ_m lies between the trial and λ* (the model is exact at the trial and bounds g beyond
                # it on the trial's side), so it is a new end of the bracket on that side; it is λ* when
                # it falls inside its own split's interval, to 1e-3: a score that close on the wrong side
                # changes g by cosh(1e-3) - 1 = 5e-7, λ by about as much.
                done = ((mu_below >= -1e-3) & (mu_above < 1e-3)).to(tl.int32)
                use_above = tl.abs(mu_above) < tl.abs(mu_below)
                cand_v = tl.where(use_above, v_above, v_below)
                cand_mu = tl.where(use_above, mu_above, mu_below)
                rising = tl.where(v_below > float("-inf"), mu_below >= t_below, mu_above >= t_above)
                lo_v = tl.where(rising, cand_v, lo_v)
                lo_mu = tl.where(rising, cand_mu, lo_mu)
                hi_v = tl.where(rising, hi_v, cand_v)
                hi_mu = tl.where(rising, hi_mu, cand_mu)
                new_width = (hi_v - lo_v) * scale + hi_mu - lo_mu
                # Next trial: λ_m, unless that step shrank the bracket by less than half (then its middle).
                bisect = (done == 0) & (new_width > 0.5 * width)
                anchor = tl.where(bisect, lo_v, cand_v)
                mu = tl.where(bisect, lo_mu + 0.5 * new_width, cand_mu)
                width = new_width
            it += 1

    for off in range(0, n, BLOCK_N):
        v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
        alpha = _cdf((v - anchor) * scale - mu, F_SIGMOID)
        tl.store(alpha_ptr + start + off + tl.arange(0, BLOCK_N), alpha.to(alpha_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 4 * b, mean)
    tl.store(stats_ptr + 4 * b + 1, rstd)
    tl.store(stats_ptr + 4 * b + 2, anchor)
    tl.store(stats_ptr + 4 * b + 3, mu)


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
    mean = tl.load(stats_ptr + 4 * b)
    rstd = tl.load(stats_ptr + 4 * b + 1)
    anchor = tl.load(stats_ptr + 4 * b + 2)
    mu = tl.load(stats_ptr + 4 * b + 3)
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
            log_fp = _log_density((v - anchor) * scale - mu, F_SIGMOID)
            log_max = _acc_max(log_max, tl.where(mask, log_fp, float("-inf")), ON_CHIP)
        log_max = _total_max(log_max, ON_CHIP)
        w_sum = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        wg_sum = _acc_init(0.0, tl.float32, ON_CHIP, BLOCK_N)
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            g = tl.load(gseg + off + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
            w = tl.exp(tl.where(mask, _log_density((v - anchor) * scale - mu, F_SIGMOID) - log_max, float("-inf")))
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
                f_prime = tl.exp(_log_density((v - anchor) * scale - mu, F_SIGMOID))
                gy = tl.where(mask, f_prime * (g - mean_g) * inv_tau, 0.0)
                sum_gy = _acc_sum(sum_gy, gy, ON_CHIP)
                sum_gy_sh = _acc_sum(sum_gy_sh, gy * s_hat, ON_CHIP)
        mean_gy = _total_sum(sum_gy, ON_CHIP) / n_f
        mean_gy_sh = _total_sum(sum_gy_sh, ON_CHIP) / n_f
        for off in range(0, n, BLOCK_N):
            v, mask = _block(seg, off, n, shift, chip, ON_CHIP, BLOCK_N)
            g = tl.load(gseg + off + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(tl.float32)
            s_hat = (v - mean) * rstd
            gy = tl.exp(_log_density((v - anchor) * scale - mu, F_SIGMOID)) * (g - mean_g) * inv_tau
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
    ``MAX_ON_CHIP`` tokens (16 fp32 per thread), where the compile gate shows no spills; looped blocks
    of ``DEFAULT_BLOCK_N[f]`` tokens.
    """
    longest = total_n if max_seqlen is None else min(max_seqlen, total_n)
    longest = max(longest, 1)
    if block_n is None:
        block_n = triton.next_power_of_2(longest) if longest <= MAX_ON_CHIP else DEFAULT_BLOCK_N[f]
    on_chip = longest <= block_n
    return dict(BLOCK_N=block_n, ON_CHIP=on_chip, num_warps=min(16, max(4, block_n // 512)) if on_chip else 4)


def soft_topk_forward(
    scores: Tensor, k: Tensor, cu_seqlens: Tensor, tau: float, f: str, normalize: bool,
    eps: float = 1e-6, *, block_n: Optional[int] = None, n_iters: int = MAX_ITERS, max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """α ``(ΣN,)`` in the dtype of ``scores`` and per-image stats ``(B, STATS)`` fp32: mean of s - s_first,
    rstd, and the threshold λ as (anchor, μ) (the module docstring).

    ``scores`` contiguous ``(ΣN,)``; ``k`` int64 ``(B,)`` with 1 <= k <= N; ``cu_seqlens`` int64.
    ``max_seqlen``: the longest image if the caller knows it on the host (picks the on-chip kernel).
    ``n_iters`` caps the solve's iterations.
    """
    batch = k.numel()
    alpha = torch.empty_like(scores)
    stats = torch.empty((batch, STATS), dtype=torch.float32, device=scores.device)
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
