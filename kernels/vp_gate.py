"""Fused variance-preserving noise gate (DESIGN.md section 2.4): x̃ = √α·x + √(1-α)·ε.

This module owns three Triton kernels over a row-major view ``(M, d)`` of x (any leading dims
flattened into M rows; α is ``(M,)``):

* ``_vp_gate_fwd_kernel``  draws ε inside the kernel and writes x̃.
* ``_vp_gate_bwd_kernel``  regenerates the same ε and writes ∂L/∂x = √α·g and the per-row reduction
  ∂L/∂α = Σ_d g·(x / (2√α_c) - ε / (2√(1-α_c))), α_c = clamp(α, eps, 1-eps) (the clamp guards the
  derivative only, as in ``reference.VPGateFunction``). One program owns whole rows, so the reduction
  over d needs no atomics and is deterministic.
* ``_noise_kernel``       materialises the same ε, for tests and for the reference comparison.

Noise: element (row, col) is ``tl.randn(seed, c)`` with the uint32 counter c = offset + row·d + col
(the caller keeps offset + numel <= 2^32): Triton's Philox 4x32-10 and Box-Muller, indexed by the
logical (contiguous) element number, so it does not depend on strides or block sizes and no N×d noise
tensor is ever stored. 32-bit counters give the same stream on every Triton 3.x (64-bit counters are
treated differently across releases). ``philox.py`` replays the same stream on the host.
All arithmetic is fp32 (loads are cast at once). Argument checks live in ``autoselect_fast.ops``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_BLOCK_M = 16  # rows per program
DEFAULT_BLOCK_D = 128  # columns per loop step


@triton.jit
def _vp_gate_fwd_kernel(
    x_ptr, a_ptr, out_ptr, n_rows, d, stride_x, stride_out, seed, offset,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    keep = tl.sqrt(a)[:, None]
    mix = tl.sqrt(1.0 - a)[:, None]
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < d)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        eps = tl.randn(seed, (offset + rows64[:, None] * d + cols[None, :]).to(tl.uint32))
        out = keep * x + mix * eps
        tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vp_gate_bwd_kernel(
    x_ptr, a_ptr, g_ptr, gx_ptr, ga_ptr, n_rows, d, stride_x, stride_g, stride_gx, seed, offset, clamp_eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    keep = tl.sqrt(a)[:, None]
    # Clamp both α and 1-α (equal to 1 - clamp(α)) so neither is rounded near the ends.
    d_keep = (0.5 / tl.sqrt(tl.minimum(tl.maximum(a, clamp_eps), 1.0 - clamp_eps)))[:, None]
    d_mix = (0.5 / tl.sqrt(tl.minimum(tl.maximum(1.0 - a, clamp_eps), 1.0 - clamp_eps)))[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < d)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        eps = tl.randn(seed, (offset + rows64[:, None] * d + cols[None, :]).to(tl.uint32))  # the forward's ε
        tl.store(gx_ptr + rows64[:, None] * stride_gx + cols[None, :], (keep * g).to(gx_ptr.dtype.element_ty), mask=mask)
        acc += g * (x * d_keep - eps * d_mix)
    tl.store(ga_ptr + rows, tl.sum(acc, 1).to(ga_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _noise_kernel(out_ptr, numel, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.randn(seed, (offset + idx).to(tl.uint32)), mask=idx < numel)


def _rows(t: Tensor, d: int) -> Tensor:
    """(…, d) -> (M, d) view; the caller guarantees stride(-1) == 1 and a row-major layout."""
    return t.reshape(t.shape[:-1].numel(), d)


def vp_gate_forward(
    x: Tensor, alpha: Tensor, seed: int, offset: int, *, block_m: int = DEFAULT_BLOCK_M, block_d: int = DEFAULT_BLOCK_D,
) -> Tensor:
    """x̃ of the shape and dtype of x; ``x`` contiguous ``(..., d)``, ``alpha`` contiguous ``x.shape[:-1]``."""
    d = x.shape[-1]
    x2 = _rows(x, d)
    out = torch.empty_like(x2)
    n_rows = x2.shape[0]
    if n_rows and d:
        _vp_gate_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, alpha.reshape(-1), out, n_rows, d, x2.stride(0), out.stride(0), seed, offset,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )
    return out.reshape(x.shape)


def vp_gate_backward(
    x: Tensor, alpha: Tensor, grad_out: Tensor, seed: int, offset: int, clamp_eps: float,
    *, block_m: int = DEFAULT_BLOCK_M, block_d: int = DEFAULT_BLOCK_D,
) -> tuple[Tensor, Tensor]:
    """(∂L/∂x in the dtype of x, ∂L/∂α in the dtype of α); all three inputs contiguous."""
    d = x.shape[-1]
    x2, g2 = _rows(x, d), _rows(grad_out, d)
    grad_x = torch.empty_like(x2)
    grad_alpha = torch.empty_like(alpha).reshape(-1)
    n_rows = x2.shape[0]
    if n_rows and d:
        _vp_gate_bwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, alpha.reshape(-1), g2, grad_x, grad_alpha, n_rows, d, x2.stride(0), g2.stride(0), grad_x.stride(0),
            seed, offset, clamp_eps, BLOCK_M=block_m, BLOCK_D=block_d,
        )
    else:
        grad_alpha.zero_()
    return grad_x.reshape(x.shape), grad_alpha.reshape(alpha.shape)


def vp_gate_noise(shape, seed: int, offset: int = 0, *, device="cpu", block: int = 1024) -> Tensor:
    """The exact ε (fp32) the VP-gate kernels use for an x of ``shape`` with this (seed, offset)."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    if out.numel():
        _noise_kernel[(triton.cdiv(out.numel(), block),)](out, out.numel(), seed, offset, BLOCK=block)
    return out


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``."""
    from . import CompileCase, pointer_type

    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = pointer_type(dtype)
        cases.append(CompileCase(
            f"vp_gate_fwd[{x[1:]}]", _vp_gate_fwd_kernel,
            dict(x_ptr=x, a_ptr=x, out_ptr=x, n_rows="i32", d="i32", stride_x="i32", stride_out="i32", seed="i64", offset="i64"),
            dict(BLOCK_M=DEFAULT_BLOCK_M, BLOCK_D=DEFAULT_BLOCK_D), num_warps=4, aligned=("d", "stride_x", "stride_out")))
    return cases
