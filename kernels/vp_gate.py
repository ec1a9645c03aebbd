"""Fused variance-preserving noise gate (docs/design.md, "Variance-preserving noise gate"): x̃ = √α·x + √(1-α)·ε.

This module owns three Triton kernels over a row-major view ``(M, d)`` of x (any leading dims
flattened into M rows; α is ``(M,)``), each program owning ``BLOCK_M`` whole rows and looping over d
in ``BLOCK_D`` columns:

* ``_vp_gate_fwd_kernel``  draws ε inside the kernel and writes x̃.
* ``_vp_gate_bwd_kernel``  regenerates the same ε and writes ∂L/∂x = √α·g and the per-row reduction
  ∂L/∂α = Σ_d g·(x / (2√α_c) - ε / (2√(1-α_c))), α_c = clamp(α, eps, 1-eps) (the clamp guards the
  derivative only, as in ``reference.VPGateFunction``). One program owns whole rows, so the reduction
  over d needs no atomics and is deterministic.
* ``_noise_kernel``       materialises the same ε (the same tile code), for tests and the reference.

Noise stream: the contract stated in ``kernels/philox.py`` (the one place it is written; that module
also replays it in NumPy). ε of the logical element row·d + col is stream element e = offset + row·d + col,
so it does not depend on strides or block sizes, and no N×d noise tensor is stored; four consecutive
elements share one Philox-4x32-10 call and one Box-Muller pair of pairs, so one round set and two
log2/sqrt/sin/cos serve four elements (the GPU's fast approximate log2/sin/cos are accurate to ~1e-6
absolute on these ranges; θ is centred on 0 for that). Counters are 32 bits: the caller keeps
offset + numel <= 2^32.

Fast path: when d and offset are multiples of 4 (``ALIGNED``, e.g. d = 1024, 4096, 5120) every group
of four lies in one row and the tile draws one Philox call per 4 elements; otherwise every element
draws its own group's call and keeps its lane (the same values, 4x the Philox work).

``seed`` and ``offset`` reach the kernels as three int32 arguments marked ``do_not_specialize``, so a
new seed or offset never recompiles a kernel (only the ALIGNED flag may pick the second variant).
All arithmetic is fp32 (loads are cast at once). Argument checks live in ``autoselect_fast.ops``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import libdevice

DEFAULT_BLOCK_M = 4  # rows per program
DEFAULT_BLOCK_D = 256  # columns per loop step (>= 4: one Philox group is 4 columns)
NUM_WARPS = 4

_NO_SPECIALIZE = ["seed_lo", "seed_hi", "offset"]


@triton.jit
def _philox4x32(c0, k0, k1):
    """Philox-4x32-10 of the counters (c0, 0, 0, 0) (uint32 tensor) under the key (k0, k1) (uint32)."""
    c1 = c0 * 0
    c2 = c1
    c3 = c1
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(bits):
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(bits_a, bits_b, FAST_MATH: tl.constexpr):
    """Both normals of one Box-Muller pair: (r cos θ, r sin θ).

    FAST_MATH (compiled CUDA): the approximate lg2/sin/cos instructions (θ ∈ [-π, π), where sin.approx
    and cos.approx are accurate to ~5e-7 absolute) instead of libdevice's range-reducing versions. The
    interpreter has no libdevice and uses NumPy's, bit-equal to ``kernels/philox.py``."""
    u_a = tl.maximum(_uniform(bits_a), 1e-7)
    theta = _uniform(bits_b) * 6.283185307179586 - 3.141592653589793
    if FAST_MATH:
        r = tl.sqrt(libdevice.fast_log2f(u_a) * -1.3862943611198906)  # -2 ln(u) = -2 ln2 · log2(u)
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(tl.log2(u_a) * -1.3862943611198906)
        return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def _tile_noise(base, k0, k1, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
                FAST_MATH: tl.constexpr):
    """ε of a [BLOCK_M, BLOCK_D // 4, 4] tile (column 4g + lane) whose row r starts at stream element
    ``base[r]`` (int64). The four lanes of a group are one tile dimension, so the fast path picks
    its lane from the group's four normals in registers (no join/reshape, no shared memory)."""
    lane = tl.arange(0, 4)[None, None, :]
    if ALIGNED:  # base % 4 == 0: the tile is BLOCK_D / 4 whole groups per row
        group = (base >> 2)[:, None] + tl.arange(0, BLOCK_D // 4)[None, :]
        b0, b1, b2, b3 = _philox4x32(group.to(tl.uint32), k0, k1)
        n0, n1 = _box_muller(b0, b1, FAST_MATH)
        n2, n3 = _box_muller(b2, b3, FAST_MATH)
        eps = tl.where(lane == 0, n0[:, :, None], tl.where(lane == 1, n1[:, :, None],
                                                           tl.where(lane == 2, n2[:, :, None], n3[:, :, None])))
    else:
        e = base[:, None, None] + (4 * tl.arange(0, BLOCK_D // 4))[None, :, None] + lane
        b0, b1, b2, b3 = _philox4x32((e >> 2).to(tl.uint32), k0, k1)
        e_lane = (e & 3).to(tl.int32)
        low = e_lane < 2
        c, s = _box_muller(tl.where(low, b0, b2), tl.where(low, b1, b3), FAST_MATH)
        eps = tl.where((e_lane & 1) == 0, c, s)
    return eps


@triton.jit
def _tile_columns(d0, BLOCK_D: tl.constexpr):
    """Column numbers of a [1, BLOCK_D // 4, 4] tile: d0 + 4g + lane."""
    return d0 + (4 * tl.arange(0, BLOCK_D // 4))[None, :, None] + tl.arange(0, 4)[None, None, :]


@triton.jit
def _keys(seed_lo, seed_hi, offset):
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    first = offset.to(tl.uint32, bitcast=True).to(tl.int64)  # offset arrives as int32 bits of a uint32
    return k0, k1, first


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _vp_gate_fwd_kernel(
    x_ptr, a_ptr, out_ptr, n_rows, d, stride_x, stride_out, seed_lo, seed_hi, offset,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr,
):
    k0, k1, first = _keys(seed_lo, seed_hi, offset)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    r3 = rows64[:, None, None]
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    keep = tl.sqrt(a)[:, None, None]
    mix = tl.sqrt(1.0 - a)[:, None, None]
    for d0 in range(0, d, BLOCK_D):
        cols = _tile_columns(d0, BLOCK_D)
        mask = row_mask[:, None, None] & (cols < d)
        x = tl.load(x_ptr + r3 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        eps = _tile_noise(first + rows64 * d + d0, k0, k1, BLOCK_M, BLOCK_D, ALIGNED, FAST_MATH)
        out = keep * x + mix * eps
        tl.store(out_ptr + r3 * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _vp_gate_bwd_kernel(
    x_ptr, a_ptr, g_ptr, gx_ptr, ga_ptr, n_rows, d, stride_x, stride_g, stride_gx, seed_lo, seed_hi, offset,
    clamp_eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr,
):
    k0, k1, first = _keys(seed_lo, seed_hi, offset)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    r3 = rows64[:, None, None]
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    keep = tl.sqrt(a)[:, None, None]
    # Clamp both α and 1-α (equal to 1 - clamp(α)) so neither is rounded near the ends.
    d_keep = 0.5 / tl.sqrt(tl.minimum(tl.maximum(a, clamp_eps), 1.0 - clamp_eps))
    d_mix = 0.5 / tl.sqrt(tl.minimum(tl.maximum(1.0 - a, clamp_eps), 1.0 - clamp_eps))
    acc_x = tl.zeros([BLOCK_M, BLOCK_D // 4, 4], tl.float32)  # Σ g·x
    acc_e = tl.zeros([BLOCK_M, BLOCK_D // 4, 4], tl.float32)  # Σ g·ε
    for d0 in range(0, d, BLOCK_D):
        cols = _tile_columns(d0, BLOCK_D)
        mask = row_mask[:, None, None] & (cols < d)
        x = tl.load(x_ptr + r3 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + r3 * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        eps = _tile_noise(first + rows64 * d + d0, k0, k1, BLOCK_M, BLOCK_D, ALIGNED, FAST_MATH)  # the forward's ε
        tl.store(gx_ptr + r3 * stride_gx + cols, (keep * g).to(gx_ptr.dtype.element_ty), mask=mask)
        acc_x += g * x
        acc_e += g * eps
    grad_a = d_keep * tl.sum(tl.sum(acc_x, 2), 1) - d_mix * tl.sum(tl.sum(acc_e, 2), 1)
    tl.store(ga_ptr + rows, grad_a.to(ga_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _noise_kernel(out_ptr, n_rows, d, seed_lo, seed_hi, offset,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
                  FAST_MATH: tl.constexpr):
    k0, k1, first = _keys(seed_lo, seed_hi, offset)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    for d0 in range(0, d, BLOCK_D):
        cols = _tile_columns(d0, BLOCK_D)
        mask = (rows < n_rows)[:, None, None] & (cols < d)
        eps = _tile_noise(first + rows64 * d + d0, k0, k1, BLOCK_M, BLOCK_D, ALIGNED, FAST_MATH)
        tl.store(out_ptr + rows64[:, None, None] * d + cols, eps, mask=mask)


def _rows(t: Tensor, d: int) -> Tensor:
    """(…, d) -> (M, d) view; the caller guarantees stride(-1) == 1 and a row-major layout."""
    return t.reshape(t.shape[:-1].numel(), d)


def _int32(value: int) -> int:
    """The low 32 bits of ``value`` as a signed int32 (the kernels bitcast them back to uint32)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _stream_args(seed: int, offset: int) -> tuple[int, int, int]:
    return _int32(seed), _int32(seed >> 32), _int32(offset)


def _config(d: int, offset: int, block_m: int, block_d: int, device) -> dict:
    """Compile-time arguments of a launch (shared with ``compile_cases``)."""
    return dict(BLOCK_M=block_m, BLOCK_D=max(block_d, 4), ALIGNED=d % 4 == 0 and offset % 4 == 0,
                FAST_MATH=torch.device(device).type == "cuda")


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
            x2, alpha.reshape(-1), out, n_rows, d, x2.stride(0), out.stride(0), *_stream_args(seed, offset),
            **_config(d, offset, block_m, block_d, x.device), num_warps=NUM_WARPS,
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
            *_stream_args(seed, offset), clamp_eps, **_config(d, offset, block_m, block_d, x.device), num_warps=NUM_WARPS,
        )
    else:
        grad_alpha.zero_()
    return grad_x.reshape(x.shape), grad_alpha.reshape(alpha.shape)


def vp_gate_noise(shape, seed: int, offset: int = 0, *, device="cpu", block: int = DEFAULT_BLOCK_D) -> Tensor:
    """The exact ε (fp32) the VP-gate kernels use for an x of ``shape`` with this (seed, offset).

    Drawn by the gate's own tile code over the same ``(M, d)`` rows, so ``vp_gate(0, 0) == ε`` bit for bit.
    ``block`` is the column block (the row block is ``DEFAULT_BLOCK_M``).
    """
    shape = tuple(shape)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel():
        d = shape[-1] if shape else 1
        n_rows = out.numel() // d
        _noise_kernel[(triton.cdiv(n_rows, DEFAULT_BLOCK_M),)](
            out, n_rows, d, *_stream_args(seed, offset),
            **_config(d, offset, DEFAULT_BLOCK_M, block, device), num_warps=NUM_WARPS,
        )
    return out


def compile_cases():
    """The launches of this module at production shapes, for ``tools/compile_gate.py``."""
    from . import CompileCase, pointer_type

    stream = dict(seed_lo="i32", seed_hi="i32", offset="i32")
    cases = []
    for aligned in (True, False):
        tag = "" if aligned else ",unaligned"
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = pointer_type(dtype)
            constexprs = _config(1024 if aligned else 1023, 0, DEFAULT_BLOCK_M, DEFAULT_BLOCK_D, "cuda")
            rows = dict(n_rows="i32", d="i32")
            cases.append(CompileCase(
                f"vp_gate_fwd[{x[1:]}{tag}]", _vp_gate_fwd_kernel,
                dict(x_ptr=x, a_ptr=x, out_ptr=x, **rows, stride_x="i32", stride_out="i32", **stream),
                constexprs, NUM_WARPS, aligned=("d", "stride_x", "stride_out") if aligned else (),
                ))
            cases.append(CompileCase(
                f"vp_gate_bwd[{x[1:]}{tag}]", _vp_gate_bwd_kernel,
                dict(x_ptr=x, a_ptr=x, g_ptr=x, gx_ptr=x, ga_ptr=x, **rows, stride_x="i32", stride_g="i32",
                     stride_gx="i32", **stream, clamp_eps="fp32"),
                constexprs, NUM_WARPS, aligned=("d", "stride_x", "stride_g", "stride_gx") if aligned else (),
                ))
        cases.append(CompileCase(f"vp_gate_noise[{tag[1:] or 'aligned'}]", _noise_kernel,
                                 dict(out_ptr="*fp32", n_rows="i32", d="i32", **stream),
                                 _config(1024 if aligned else 1023, 0, DEFAULT_BLOCK_M, DEFAULT_BLOCK_D, "cuda"), NUM_WARPS,
                                 production=False))
    return cases
