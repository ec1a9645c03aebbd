"""Fused hard top-K selection for inference (DESIGN.md section 2.7 and 3).

This module owns the Triton kernel that, for a ragged batch, finds each image's K best tokens (ties to
the lower index), emits their flat indices in ascending order, gathers the kept feature rows straight
into the output buffer and writes their position ids (``original`` or ``compact``, 1-D or M-RoPE).
Argument checking lives in ``autoselect_fast.ops``; the launcher here trusts its inputs.

Algorithm (a threshold search, no sort):
  1. Every score is mapped to an order-preserving int64 key (fp32 bits for fp16/bf16/fp32 scores,
     fp64 bits for fp64 scores, so no two scores that differ in the input dtype collide; -0.0 is
     folded onto +0.0 so they tie, as they compare equal).
  2. The K-th largest key T is found by a radix select, 4 bits per pass from the top (8 passes for
     32-bit keys, 16 for fp64): each pass counts, among the keys that share the digits chosen so
     far, how many have each next digit (a BLOCK_N x 16 compare tile), and keeps the largest digit
     that still leaves K keys at or above it. It also yields how many ties at T must be kept.
  3. A blocked prefix count then keeps every token with key > T plus the first (K - count(key > T))
     tokens with key == T; its exclusive prefix sum is the output slot, so indices come out
     ascending without sorting.

Launch: one kernel for the whole batch, grid ``(B, cdiv(d, BLOCK_D))``. Every program of an image
repeats the (cheap, N-sized) threshold search and then copies its own ``BLOCK_D`` columns of the
kept rows; the first column block also writes indices and positions. No host synchronisation
happens inside the launcher: the output size ΣK is passed in by the caller.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK_N = 256  # tokens per block of the radix passes (a BLOCK_N x 16 histogram tile)
DEFAULT_BLOCK_G = 64  # tokens per block of the emit/gather loop
DEFAULT_BLOCK_D = 128  # feature columns per program


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
def _select_kernel(
    scores_ptr, features_ptr, positions_ptr, cu_ptr, k_ptr, kept_cu_ptr,
    out_idx_ptr, out_feat_ptr, out_pos_ptr,
    d, stride_feat, stride_out_feat, stride_pos, stride_out_pos,
    HAS_FEATURES: tl.constexpr, HAS_POSITIONS: tl.constexpr, POS_ROWS: tl.constexpr,
    COMPACT: tl.constexpr, IS_FP64: tl.constexpr, KEY_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - start
    k = tl.load(k_ptr + b)
    out_start = tl.load(kept_cu_ptr + b)
    seg = scores_ptr + start

    # Radix select of the K-th largest key, 4 bits per pass from the top. Keys are biased to
    # unsigned order (u = key - min int; for 64-bit keys the subtraction wraps, i.e. flips the sign
    # bit) so digits compare like the keys do.
    if IS_FP64:
        bias = tl.full([], -0x7FFFFFFFFFFFFFFF, tl.int64) - 1
    else:
        bias = tl.full([], -0x80000000, tl.int64)
    digits = tl.arange(0, 16)
    prefix = tl.full([], 0, tl.int64)  # top bits of the threshold found so far (biased)
    remaining = k  # how many of the keys matching prefix still have to be kept
    for p in tl.static_range(KEY_BITS // 4):
        shift = KEY_BITS - 4 * (p + 1)  # constexpr: p is unrolled
        hist = tl.zeros([16], tl.int32)
        for off in range(0, n, BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            u = _order_key(seg, offs, mask, IS_FP64) - bias
            if p > 0:  # only keys that share the digits chosen so far
                mask = mask & ((u >> (shift + 4)) == (prefix >> (shift + 4)))
            digit = ((u >> shift) & 15).to(tl.int32)
            hit = (digit[:, None] == digits[None, :]) & mask[:, None]
            hist += tl.sum(hit.to(tl.int32), 0)
        at_least = tl.cumsum(hist, 0, reverse=True)  # at_least[v] = #keys with digit >= v
        v = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1  # the largest v with enough keys
        remaining -= tl.sum(tl.where(digits > v, hist, 0), 0)
        prefix = prefix | (v.to(tl.int64) << shift)
    thresh = prefix + bias  # the K-th largest key
    n_eq_take = remaining  # ties at the threshold to keep: the lowest indices

    # Emit in index order; the exclusive prefix count of kept tokens is each one's output slot.
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    carry_sel = 0
    carry_eq = 0
    for off in range(0, n, BLOCK_G):
        offs = off + tl.arange(0, BLOCK_G)
        mask = offs < n
        key = _order_key(seg, offs, mask, IS_FP64)
        eq = ((key == thresh) & mask).to(tl.int32)
        eq_rank = carry_eq + tl.cumsum(eq, 0) - eq
        sel = (((key > thresh) & mask) | ((eq == 1) & (eq_rank < n_eq_take))).to(tl.int32)
        slot = carry_sel + tl.cumsum(sel, 0) - sel
        keep = sel == 1
        dst = (out_start + slot).to(tl.int64)
        src = (start + offs).to(tl.int64)
        if pid_d == 0:
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
        if HAS_FEATURES:
            tile_mask = keep[:, None] & col_mask[None, :]
            rows = tl.load(features_ptr + src[:, None] * stride_feat + cols[None, :], mask=tile_mask)
            tl.store(out_feat_ptr + dst[:, None] * stride_out_feat + cols[None, :], rows, mask=tile_mask)
        carry_eq += tl.sum(eq, 0)
        carry_sel += tl.sum(sel, 0)


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
    block_n: int = DEFAULT_BLOCK_N,
    block_g: int = DEFAULT_BLOCK_G,
    block_d: int = DEFAULT_BLOCK_D,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Launch the selection kernel on validated inputs; returns ``(indices, features, position_ids)``.

    Args:
        scores: ``(ΣN,)`` contiguous float scores.
        features: ``(ΣN, d)`` rows with ``stride(1) == 1``, or ``None``.
        k: ``(B,)`` int64 budgets, ``1 <= k_b <= N_b``; cu_seqlens / kept_cu_seqlens: ``(B+1,)`` int64.
        total_k: ΣK (the caller reads it once on the host; it sizes the outputs).
        positions: ``(ΣN,)`` or ``(P, ΣN)`` int32/int64 with ``stride(-1) == 1``; ``None`` means
            0..N_b-1 per image (``reference.default_positions``).
    """
    batch = k.numel()
    device = scores.device
    pos_rows = 1 if positions is None or positions.dim() == 1 else positions.shape[0]
    out_idx = torch.empty(total_k, dtype=torch.int64, device=device)
    out_pos = torch.empty((pos_rows, total_k), dtype=torch.int64, device=device)
    if features is not None:
        d = features.shape[1]
        out_feat = torch.empty((total_k, d), dtype=features.dtype, device=device)
    else:
        d = 1
        out_feat = None
    stride_pos = 0 if positions is None or positions.dim() == 1 else positions.stride(0)
    grid = (batch, max(1, triton.cdiv(d, block_d)))  # >= 1: column block 0 also writes indices/positions
    is_fp64 = scores.dtype == torch.float64
    _select_kernel[grid](
        scores, features if features is not None else scores, positions if positions is not None else scores,
        cu_seqlens, k, kept_cu_seqlens,
        out_idx, out_feat if out_feat is not None else out_idx, out_pos,
        d, features.stride(0) if features is not None else 0, d, stride_pos, total_k,
        HAS_FEATURES=features is not None, HAS_POSITIONS=positions is not None, POS_ROWS=pos_rows,
        COMPACT=compact, IS_FP64=is_fp64, KEY_BITS=64 if is_fp64 else 32,
        BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_D=block_d,
    )
    if positions is None or positions.dim() == 1:
        out_pos = out_pos[0]
    return out_idx, out_feat, out_pos


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``."""
    from . import CompileCase, pointer_type

    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = pointer_type(dtype)
        for pos_rows in (1, 3):
            cases.append(CompileCase(
                f"select[{t[1:]},pos_rows={pos_rows}]", _select_kernel,
                dict(scores_ptr=t, features_ptr=t, positions_ptr="*i64", cu_ptr="*i64", k_ptr="*i64", kept_cu_ptr="*i64",
                     out_idx_ptr="*i64", out_feat_ptr=t, out_pos_ptr="*i64", d="i32", stride_feat="i32",
                     stride_out_feat="i32", stride_pos="i32", stride_out_pos="i32"),
                dict(HAS_FEATURES=True, HAS_POSITIONS=pos_rows == 3, POS_ROWS=pos_rows, COMPACT=False, IS_FP64=False,
                     KEY_BITS=32, BLOCK_N=DEFAULT_BLOCK_N, BLOCK_G=DEFAULT_BLOCK_G, BLOCK_D=DEFAULT_BLOCK_D),
                num_warps=4, aligned=("d", "stride_feat", "stride_out_feat")))
    return cases
