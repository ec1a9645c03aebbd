"""Functional API of the fused kernels, their autograd wrappers and the backend dispatch.

This module owns ``select`` (inference top-K + gather + position ids), ``soft_topk`` (training mask),
``vp_gate`` (training noise gate), ``vp_gate_noise`` and ``normalize_scores``. Every function checks
its arguments with ``_validation`` (clear ``ValueError``/``TypeError``), then runs one of two backends:

* ``"triton"``: the kernels in ``autoselect_fast.kernels``. CUDA tensors run them compiled; CPU tensors
  run them through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before*
  the kernel modules are first imported (they are imported lazily, on first use). The Triton path
  additionally requires contiguous inputs (stride 1 along the last dimension for features/positions).
* ``"reference"``: ``autoselect_fast.reference`` (float64, a Python loop over images).

``backend="auto"`` (default) picks ``"triton"`` for CUDA tensors and for CPU tensors when the kernels
are (or will be) built for the interpreter, and ``"reference"`` otherwise.

Host synchronisation: the argument checks read ``cu_seqlens`` and ``k`` on the host (as the reference
does), and ``select`` reads ΣK once there to size its outputs; the kernels themselves never sync.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._validation import (
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
from .reference import NORM_EPS, POSITION_MODES, SOFT_TOPK_FUNCTIONS, VP_GATE_CLAMP_EPS, Selection

BACKENDS = ("auto", "triton", "reference")
_MAX_SEED = 2**63 - 1
_MAX_COUNTER = 2**32  # the VP gate's Philox counters are 32-bit (the same stream on every Triton 3.x)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _kernel_module(name: str):
    """Import ``autoselect_fast.kernels.<name>`` on first use (so TRITON_INTERPRET can be set late)."""
    import importlib

    return importlib.import_module(f"autoselect_fast.kernels.{name}")


def _kernels_interpreted() -> bool:
    from .kernels import is_interpreted

    kernels = (
        _kernel_module("selection")._select_kernel,
        _kernel_module("soft_topk")._soft_topk_fwd_kernel,
        _kernel_module("vp_gate")._noise_kernel,
    )
    return all(is_interpreted(kernel) for kernel in kernels)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"reference"`` for tensors on ``device`` (see the module docstring)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton"
    usable = device.type == "cpu" and _interpret_env() and _kernels_interpreted()
    if backend == "triton" and not usable:
        if device.type == "cpu" and _interpret_env():
            why = "the kernels were imported before TRITON_INTERPRET=1 was set (set it before importing them)"
        else:
            why = "Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
        raise ValueError(f"backend='triton' cannot run on device {device}: {why}; use backend='auto' or 'reference'")
    return "triton" if usable else "reference"


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


def _opts(**blocks: Optional[int]) -> dict:
    for name, value in blocks.items():
        _check_block(name, value)
    return {name: value for name, value in blocks.items() if value is not None}


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
def normalize_scores(scores: Tensor, cu_seqlens: Optional[Tensor] = None, eps: float = NORM_EPS) -> Tensor:
    """Per-image z-score (reference path on every device; the Soft Top-K kernel fuses its own)."""
    return reference.normalize_scores(scores, cu_seqlens, eps)


# --------------------------------------------------------------------------------------------------
# Selection (inference)
# --------------------------------------------------------------------------------------------------
def select(
    scores: Tensor,
    features: Optional[Tensor],
    k: IntOrTensor,
    cu_seqlens: Optional[Tensor] = None,
    *,
    positions: Optional[Tensor] = None,
    position_mode: str = "original",
    backend: str = "auto",
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
) -> Selection:
    """Hard top-K per image (ties to the lower index, ascending), the kept rows and their position ids.

    Same contract and result as ``reference.select_tokens`` (indices, rows bit-for-bit, positions):

    Args:
        scores: ``(ΣN,)`` Scorer outputs (fp16/bf16/fp32/fp64, finite).
        features: ``(ΣN, d)`` rows to gather (any dtype), or ``None``.
        k: budget per image, int or integer tensor ``(B,)``, ``1 <= k <= N``.
        cu_seqlens: ``(B+1,)`` int32/int64 offsets; ``None`` for one image.
        positions: ``(ΣN,)`` or ``(3, ΣN)`` int32/int64 full-sequence positions; default 0..N_i-1.
        position_mode: ``"original"`` or ``"compact"`` (first token's position + rank).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
        block_n, block_d: Triton tile sizes (powers of two; tokens per block, feature columns per program).
    Returns:
        ``reference.Selection``; ``cu_seqlens`` of the kept tokens is int64.
    """
    check_choice("position_mode", position_mode, POSITION_MODES)
    cu = check_scores(scores, cu_seqlens)
    check_selection_inputs(scores, features, positions)
    check_same_device(scores=scores, features=features, positions=positions)
    k_t = check_k(k, cu[1:] - cu[:-1])
    opts = _opts(block_n=block_n, block_d=block_d)
    if resolve_backend(backend, scores.device) == "reference":
        return reference.select_tokens(scores, features, k_t, cu, positions=positions, position_mode=position_mode)

    _check_contiguous("scores", scores)
    _check_contiguous("features", features, last_dim_only=True)
    _check_contiguous("positions", positions, last_dim_only=True)
    if "block_n" in opts:
        opts["block_g"] = min(opts["block_n"], 64)
    kept_cu = torch.zeros(k_t.numel() + 1, dtype=torch.int64, device=scores.device)
    torch.cumsum(k_t, 0, out=kept_cu[1:])
    total_k = int(k_t.sum())  # sizes the outputs: the one host read of select itself
    indices, kept_features, kept_positions = _kernel_module("selection").select_tokens(
        scores, features, k_t, cu, kept_cu, total_k, positions, position_mode == "compact", **opts
    )
    return Selection(indices=indices, features=kept_features, position_ids=kept_positions, cu_seqlens=kept_cu)


# --------------------------------------------------------------------------------------------------
# Soft Top-K (training)
# --------------------------------------------------------------------------------------------------
class SoftTopKTriton(torch.autograd.Function):
    """α = Soft Top-K of the (optionally z-scored) scores by the fused kernels; implicit backward."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: Tensor, cu: Tensor, tau: float, f: str, normalize: bool, opts: dict):  # type: ignore[override]
        alpha, stats = _kernel_module("soft_topk").soft_topk_forward(scores, k, cu, tau, f, normalize, NORM_EPS, **opts)
        ctx.save_for_backward(scores, k, cu, stats)
        ctx.tau, ctx.f, ctx.normalize, ctx.opts = tau, f, normalize, opts
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha: Tensor):  # type: ignore[override]
        scores, k, cu, stats = ctx.saved_tensors
        grad = _kernel_module("soft_topk").soft_topk_backward(
            scores, grad_alpha.contiguous(), k, cu, stats, ctx.tau, ctx.f, ctx.normalize, **ctx.opts
        )
        return grad, None, None, None, None, None, None


def soft_topk(
    scores: Tensor,
    k: IntOrTensor,
    cu_seqlens: Optional[Tensor] = None,
    *,
    tau: float = 1.0,
    f: str = "laplace",
    normalize: bool = True,
    backend: str = "auto",
    block_n: Optional[int] = None,
) -> Tensor:
    """Soft Top-K mask ``α = Φ_K(ŝ/τ)`` per image with ``Σα = K``, differentiable w.r.t. ``scores``.

    Same contract as ``reference.soft_topk``. The Triton kernels compute in fp32 whatever the input
    dtype (α is returned in the dtype of ``scores``); Σα matches K to ~1e-6·K for N up to 16k.
    ``block_n`` is the kernels' token block (a power of two; images longer than it are looped over).
    """
    cu = check_scores(scores, cu_seqlens)
    k_t = check_k(k, cu[1:] - cu[:-1])
    tau = check_tau(tau)
    check_choice("f", f, SOFT_TOPK_FUNCTIONS)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    opts = _opts(block_n=block_n)
    if resolve_backend(backend, scores.device) == "reference":
        return reference.soft_topk(scores, k_t, cu, tau=tau, f=f, normalize=normalize)
    _check_contiguous("scores", scores)
    return SoftTopKTriton.apply(scores, k_t, cu, tau, f, normalize, opts)


# --------------------------------------------------------------------------------------------------
# VP noise gate (training)
# --------------------------------------------------------------------------------------------------
class VPGateTriton(torch.autograd.Function):
    """x̃ = √α·x + √(1-α)·ε with ε regenerated from (seed, offset) in the backward, never stored."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, seed: int, offset: int, clamp_eps: float, opts: dict):  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        ctx.seed, ctx.offset, ctx.clamp_eps, ctx.opts = seed, offset, clamp_eps, opts
        return _kernel_module("vp_gate").vp_gate_forward(x, alpha, seed, offset, **opts)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        grad_x, grad_alpha = _kernel_module("vp_gate").vp_gate_backward(
            x, alpha, grad_out.contiguous(), ctx.seed, ctx.offset, ctx.clamp_eps, **ctx.opts
        )
        return grad_x, grad_alpha, None, None, None, None


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A Philox seed in [0, 2^62) drawn from ``generator`` (torch's default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


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
        seed: Philox seed in [0, 2^63). ``None`` draws one from ``generator`` (torch's default CPU
            generator when that is None too), so runs are reproducible under ``torch.manual_seed``.
        offset: first Philox counter, ``0 <= offset <= 2**32 - x.numel()``.
        clamp_eps: α is clamped to [eps, 1-eps] inside the derivative w.r.t. α only.
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
    check_finite("alpha", alpha)
    if bool(((alpha < 0) | (alpha > 1)).any()):
        raise ValueError(f"alpha must lie in [0, 1], got min {float(alpha.min())} and max {float(alpha.max())}")
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to vp_gate, not both (the generator only draws a seed)")
    if isinstance(clamp_eps, bool) or not isinstance(clamp_eps, float) or not 0.0 < clamp_eps < 0.5:
        raise ValueError(f"clamp_eps must be a float in (0, 0.5), got {clamp_eps!r}")
    opts = _opts(block_d=block_d)
    if seed is None:
        seed = draw_seed(generator)
    _check_seed_offset(seed, offset, x.numel())
    if resolve_backend(backend, x.device) == "reference":
        noise = vp_gate_noise(x.shape, seed, offset, device=x.device, backend="reference")
        return reference.vp_gate(x, alpha, noise=noise, clamp_eps=clamp_eps)
    _check_contiguous("x", x)
    _check_contiguous("alpha", alpha)
    return VPGateTriton.apply(x, alpha, seed, offset, clamp_eps, opts)


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
