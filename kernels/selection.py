"""Hard top-K selection for inference (docs/design.md, "Inference selection" and "Position ids"): two launches, no host sync.

This module owns the Triton kernels that, for a ragged batch, find each image's K best tokens (ties to
the lower index), emit their flat indices in ascending order with their position ids (``original`` or
``compact``, 1-D or M-RoPE), and gather the kept feature rows into the output buffer. Argument
checking lives in ``autoselect_fast.ops``; the launcher here trusts its inputs.

``_select_kernel``, one program per image (a threshold search, no sort):
  1. Every score is mapped to an order-preserving int64 key (fp32 bits for fp16/bf16/fp32 scores,
     fp64 bits for fp64 scores, so no two scores that differ in the input dtype collide; -0.0 is
     folded onto +0.0 so they tie, as they compare equal).
  2. The K-th largest key T is found by a radix select, 4 bits per pass from the top (8 passes for
     32-bit keys, 16 for fp64): each pass counts, among the keys that share the digits chosen so
     far, how many have each next digit (``tl.histogram``, warp ballots: no BLOCK_N x 16 compare
     tile, which would cost 16 registers per key), and keeps the largest digit
     that still leaves K keys at or above it. It also yields how many ties at T must be kept.
  3. A prefix count keeps every token with key > T plus the first (K - count(key > T)) tokens with
     key == T; its exclusive prefix sum is the output slot, so indices come out ascending without
     sorting. Indices and position ids are written here.
  On chip (``ON_CHIP``: one block covers the longest image, up to ``MAX_ON_CHIP`` tokens, chosen from
  host ints): the image's keys are loaded once into registers and all passes run there; longer
  images loop over ``BLOCK_N``-token blocks (re-reads hit L1/L2).
``_gather_rows_kernel``, a 2-D grid over (kept rows / BLOCK_R) x (feature columns / BLOCK_D): copies
  the kept rows by the indices the first kernel wrote, so the copy, the bulk of the bytes, is spread
  over the whole GPU whatever the batch size.
No host synchronisation happens inside the launcher: the output size ΣK is passed in by the caller.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK_N = 1024  # tokens per block of the looped kernel (images longer than MAX_ON_CHIP)
# The longest image whose keys are held in registers (8 int64 keys per thread over 8 warps); at 4,096
# over 16 warps the compile gate shows spills, so longer images take the looped kernel.
MAX_ON_CHIP = 2048
DEFAULT_BLOCK_G = 16  # kept rows per gather program
DEFAULT_BLOCK_D = 256  # feature columns per gather program


@triton.jit
def _order_key(ptr, offs, mask, IS_FP64: tl.constexpr):
    """int64 key with key(a) < key(b) iff a < b for finite floats (and key(-0.0) == key(+0.0))."""
    if IS_FP64:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float64)
        v = tl.where(v == 0, 0.0, v)
        bits = v.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(v == 0, 0.0, v)
        bits = v.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return key


@triton.jit
def _keys(seg, off, n, bias, chip, IS_FP64: tl.constexpr, ON_CHIP: tl.constexpr, BLOCK_N: tl.constexpr):
    """(biased key, index, mask) of the block at ``off``; from registers when the image is on chip."""
    offs = off + tl.arange(0, BLOCK_N)
    mask = offs < n
    if ON_CHIP:
        u = chip
    else:
        u = _order_key(seg, offs, mask, IS_FP64) - bias
    return u, offs, mask


@triton.jit
def _select_kernel(
    scores_ptr, positions_ptr, cu_ptr, k_ptr, kept_cu_ptr, out_idx_ptr, out_pos_ptr, stride_pos, stride_out_pos,
    HAS_POSITIONS: tl.constexpr, POS_ROWS: tl.constexpr, COMPACT: tl.constexpr, IS_FP64: tl.constexpr,
    KEY_BITS: tl.constexpr, BLOCK_N: tl.constexpr, ON_CHIP: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    n = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    k = tl.load(k_ptr + b).to(tl.int32)
    out_start = tl.load(kept_cu_ptr + b)
    seg = scores_ptr + start

    # Keys are biased to unsigned order (u = key - min int; for 64-bit keys the subtraction wraps,
    # i.e. flips the sign bit) so digits compare like the keys do.
    if IS_FP64:
        bias = tl.full([], -0x7FFFFFFFFFFFFFFF, tl.int64) - 1
    else:
        bias = tl.full([], -0x80000000, tl.int64)
    chip = tl.zeros([BLOCK_N], tl.int64)
    if ON_CHIP:  # the one read of the scores
        offs0 = tl.arange(0, BLOCK_N)
        chip = _order_key(seg, offs0, offs0 < n, IS_FP64) - bias

    # Radix select of the K-th largest key, 4 bits per pass from the top.
    digits = tl.arange(0, 16)
    prefix = tl.full([], 0, tl.int64)  # top bits of the threshold found so far (biased)
    remaining = k  # how many of the keys matching prefix still have to be kept
    for p in tl.static_range(KEY_BITS // 4):
        shift = KEY_BITS - 4 * (p + 1)  # constexpr: p is unrolled
        hist = tl.zeros([16], tl.int32)
        for off in range(0, n, BLOCK_N):
            u, offs, mask = _keys(seg, off, n, bias, chip, IS_FP64, ON_CHIP, BLOCK_N)
            if p > 0:  # only keys that share the digits chosen so far
                mask = mask & ((u >> (shift + 4)) == (prefix >> (shift + 4)))
            digit = ((u >> shift) & 15).to(tl.int32)
            hist += tl.histogram(digit, 16, mask=mask)
        at_least = tl.cumsum(hist, 0, reverse=True)  # at_least[v] = #keys with digit >= v
        v = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1  # the largest v with enough keys
        remaining -= tl.sum(tl.where(digits > v, hist, 0), 0)
        prefix = prefix | (v.to(tl.int64) << shift)
    thresh = prefix + bias  # the K-th largest key (unbiased: biased 64-bit keys do not compare as signed)
    n_eq_take = remaining  # ties at the threshold to keep: the lowest indices

    # Emit in index order; the exclusive prefix count of kept tokens is each one's output slot.
    carry_sel = 0
    carry_eq = 0
    for off in range(0, n, BLOCK_N):
        u, offs, mask = _keys(seg, off, n, bias, chip, IS_FP64, ON_CHIP, BLOCK_N)
        key = u + bias
        eq = ((key == thresh) & mask).to(tl.int32)
        eq_rank = carry_eq + tl.cumsum(eq, 0) - eq
        sel = (((key > thresh) & mask) | ((eq == 1) & (eq_rank < n_eq_take))).to(tl.int32)
        slot = carry_sel + tl.cumsum(sel, 0) - sel
        keep = sel == 1
        dst = out_start + slot.to(tl.int64)
        src = start + offs.to(tl.int64)
        tl.store(out_idx_ptr + dst, src, mask=keep)
        for r in tl.static_range(POS_ROWS):
            if COMPACT:
                if HAS_POSITIONS:
                    first = tl.load(positions_ptr + r * stride_pos + start).to(tl.int64)
                else:
                    first = 0
                pos = first + slot.to(tl.int64)
            else:
                if HAS_POSITIONS:
                    pos = tl.load(positions_ptr + r * stride_pos + src, mask=keep, other=0).to(tl.int64)
                else:
                    pos = offs.to(tl.int64)
            tl.store(out_pos_ptr + r * stride_out_pos + dst, pos, mask=keep)
        carry_eq += tl.sum(eq, 0)
        carry_sel += tl.sum(sel, 0)


@triton.jit
def _gather_rows_kernel(idx_ptr, features_ptr, out_ptr, total_k, d, stride_feat, stride_out,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < total_k
    src = tl.load(idx_ptr + rows, mask=row_mask, other=0)
    mask = row_mask[:, None] & (cols < d)[None, :]
    tile = tl.load(features_ptr + src[:, None] * stride_feat + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], tile, mask=mask)


def launch_config(total_n: int, max_seqlen: Optional[int] = None, block_n: Optional[int] = None) -> dict:
    """BLOCK_N, ON_CHIP and num_warps of ``_select_kernel`` from host ints (no device read).

    Without ``max_seqlen`` the total token count bounds the longest image. An explicit ``block_n`` is
    the looped kernel's block (and on chip if it covers the longest image).
    """
    longest = max(1, total_n if max_seqlen is None else min(max_seqlen, total_n))
    if block_n is None:
        block_n = max(16, triton.next_power_of_2(longest)) if longest <= MAX_ON_CHIP else DEFAULT_BLOCK_N
    return dict(BLOCK_N=block_n, ON_CHIP=longest <= block_n, num_warps=min(8, max(4, block_n // 256)))


def select_tokens(
    scores: Tensor,
    features: Optional[Tensor],
    k: Tensor,
    cu_seqlens: Tensor,
    kept_cu_seqlens: Tensor,
    total_k: int,
    positions: Optional[Tensor] = None,
    compact: bool = False,
    *,
    block_n: Optional[int] = None,
    block_g: int = DEFAULT_BLOCK_G,
    block_d: int = DEFAULT_BLOCK_D,
    max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Launch the selection kernels on validated inputs; returns ``(indices, features, position_ids)``.

    Args:
        scores: ``(ΣN,)`` contiguous float scores.
        features: ``(ΣN, d)`` rows with ``stride(1) == 1``, or ``None``.
        k: ``(B,)`` int64 budgets, ``1 <= k_b <= N_b``; cu_seqlens / kept_cu_seqlens: ``(B+1,)`` int64.
        total_k: ΣK (the caller knows it on the host; it sizes the outputs).
        positions: ``(ΣN,)`` or ``(P, ΣN)`` int32/int64 with ``stride(-1) == 1``; ``None`` means
            0..N_b-1 per image (``reference.default_positions``).
        block_n: token block of the threshold search (default: the longest image, on chip, when it
            is at most ``MAX_ON_CHIP``); block_g / block_d: kept rows / feature columns per gather program.
        max_seqlen: the longest image if the caller knows it on the host (else ΣN bounds it).
    """
    batch = k.numel()
    device = scores.device
    pos_rows = 1 if positions is None or positions.dim() == 1 else positions.shape[0]
    out_idx = torch.empty(total_k, dtype=torch.int64, device=device)
    out_pos = torch.empty((pos_rows, total_k), dtype=torch.int64, device=device)
    stride_pos = 0 if positions is None or positions.dim() == 1 else positions.stride(0)
    is_fp64 = scores.dtype == torch.float64
    _select_kernel[(batch,)](
        scores, positions if positions is not None else scores, cu_seqlens, k, kept_cu_seqlens,
        out_idx, out_pos, stride_pos, total_k,
        HAS_POSITIONS=positions is not None, POS_ROWS=pos_rows, COMPACT=compact, IS_FP64=is_fp64,
        KEY_BITS=64 if is_fp64 else 32, **launch_config(scores.numel(), max_seqlen, block_n),
    )
    out_feat = None
    if features is not None:
        d = features.shape[1]
        out_feat = torch.empty((total_k, d), dtype=features.dtype, device=device)
        if total_k and d:
            grid = (triton.cdiv(total_k, block_g), triton.cdiv(d, block_d))
            _gather_rows_kernel[grid](out_idx, features, out_feat, total_k, d, features.stride(0), d,
                                      BLOCK_R=block_g, BLOCK_D=block_d, num_warps=4)
    if positions is None or positions.dim() == 1:
        out_pos = out_pos[0]
    return out_idx, out_feat, out_pos


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``: the threshold
    kernel for N = 576 (LLaVA-1.5), 2,048 (the on-chip limit), 2,880 (LLaVA-NeXT, looped) and 16,384, fp16/bf16/fp32 scores, 1-D and M-RoPE positions; the gather for each feature dtype."""
    from . import CompileCase, pointer_type

    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = pointer_type(dtype)
        for n, pos_rows in ((576, 1), (2048, 3), (2880, 1), (16_384, 3)):
            cfg = launch_config(n, n)
            warps = cfg.pop("num_warps")
            cases.append(CompileCase(
                f"select[{t[1:]},N={n},pos_rows={pos_rows}{'' if cfg['ON_CHIP'] else ',looped'}]", _select_kernel,
                dict(scores_ptr=t, positions_ptr="*i64", cu_ptr="*i64", k_ptr="*i64", kept_cu_ptr="*i64",
                     out_idx_ptr="*i64", out_pos_ptr="*i64", stride_pos="i32", stride_out_pos="i32"),
                dict(HAS_POSITIONS=pos_rows == 3, POS_ROWS=pos_rows, COMPACT=False, IS_FP64=False, KEY_BITS=32, **cfg),
                num_warps=warps))
        cases.append(CompileCase(
            f"gather_rows[{t[1:]}]", _gather_rows_kernel,
            dict(idx_ptr="*i64", features_ptr=t, out_ptr=t, total_k="i32", d="i32", stride_feat="i32", stride_out="i32"),
            dict(BLOCK_R=DEFAULT_BLOCK_G, BLOCK_D=DEFAULT_BLOCK_D), num_warps=4, aligned=("d", "stride_feat", "stride_out")))
    return cases
