"""``vp_gate``: the variance-preserving noise gate of training, its noise ``vp_gate_noise`` and ``draw_seed``.

The ops ``torch.ops.autoselect_fast.vp_gate`` (:data:`vp_gate_op`) and ``vp_gate_backward``
(:data:`vp_gate_backward_op`) run the fused kernels of ``kernels/vp_gate.py``: ε is drawn inside the
kernel from (seed, offset) and drawn again in the backward, never stored. The noise follows the stream
contract of ``autoselect_fast.kernels.philox`` (stated once, in that module's docstring). The reference
backend replays that stream on the host and runs ``reference.vp_gate``, plain autograd code (the spec).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import VP_GATE_CLAMP_EPS
from ..validation import FLOAT_DTYPES, check_alpha_values, check_same_device, check_tensor, is_int, resolve_validate
from .dispatch import check_contiguous, kernel_module, resolve_backend, tile_options

_MAX_SEED = 2**63 - 1
_MAX_COUNTER = 2**32  # the VP gate's Philox counters are 32-bit (the same stream on every Triton 3.x)


@torch.library.custom_op("autoselect_fast::vp_gate", mutates_args=())
def vp_gate_op(x: Tensor, alpha: Tensor, seed: int, offset: int, clamp_eps: float, block_d: Optional[int]) -> Tensor:
    """x̃ = √α·x + √(1-α)·ε, ε from Philox (seed, offset) inside the kernel (clamp_eps: backward only)."""
    return kernel_module("vp_gate").vp_gate_forward(x=x, alpha=alpha, seed=seed, offset=offset, **tile_options(block_d=block_d))


@vp_gate_op.register_fake
def _vp_gate_fake(x, alpha, seed, offset, clamp_eps, block_d):
    return torch.empty_like(x)


@torch.library.custom_op("autoselect_fast::vp_gate_backward", mutates_args=())
def vp_gate_backward_op(
    x: Tensor, alpha: Tensor, grad_out: Tensor, seed: int, offset: int, clamp_eps: float, block_d: Optional[int]
) -> tuple[Tensor, Tensor]:
    """(∂L/∂x, ∂L/∂α) with ε regenerated from (seed, offset), never stored."""
    return kernel_module("vp_gate").vp_gate_backward(
        x=x, alpha=alpha, grad_out=grad_out, seed=seed, offset=offset, clamp_eps=clamp_eps, **tile_options(block_d=block_d)
    )


@vp_gate_backward_op.register_fake
def _vp_gate_backward_fake(x, alpha, grad_out, seed, offset, clamp_eps, block_d):
    return torch.empty_like(x), torch.empty_like(alpha)


def _vp_gate_setup_context(ctx, inputs, output):
    x, alpha, seed, offset, clamp_eps, block_d = inputs
    ctx.save_for_backward(x, alpha)
    ctx.seed, ctx.offset, ctx.clamp_eps, ctx.block_d = seed, offset, clamp_eps, block_d


def _vp_gate_autograd(ctx, grad_out):
    x, alpha = ctx.saved_tensors
    grad_x, grad_alpha = vp_gate_backward_op(
        x, alpha, grad_out.contiguous(), ctx.seed, ctx.offset, ctx.clamp_eps, ctx.block_d
    )
    return grad_x, grad_alpha, None, None, None, None


vp_gate_op.register_autograd(_vp_gate_autograd, setup_context=_vp_gate_setup_context)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A Philox seed in [0, 2^62) drawn on the host from ``generator`` (torch's default CPU generator when None).

    Only CPU generators: drawing from a CUDA generator would read a GPU tensor (a synchronisation).
    Under ``torch.compile`` pass ``seed=`` instead (reading the drawn value is a graph break).
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (a seed drawn on {generator.device} would be read back to the "
            "host, a synchronisation); pass a CPU generator or an int seed"
        )
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def _check_seed_offset(seed: int, offset: int, numel: int) -> None:
    for name, value in (("seed", seed), ("offset", offset)):
        if not is_int(value):
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
    validate: Optional[bool] = None,
    backend: str = "auto",
    block_d: Optional[int] = None,
) -> Tensor:
    """Variance-preserving noise gate ``x̃ = √α·x + √(1-α)·ε``, differentiable in x and α.

    ε: element i of x (row-major) takes element ``offset + i`` of the fp32 normal stream ``seed``
    defined in ``autoselect_fast.kernels.philox`` (its module docstring states the stream: four
    normals per Philox-4x32-10 call; ``philox.philox_randn(x.numel(), seed, offset)`` replays it on the
    host). Counters are 32-bit (``offset + x.numel() <= 2**32``), so (seed, offset) fix ε completely
    and the backward regenerates it instead of storing it. Draw a new seed (or move ``offset`` past
    ``x.numel()``) every step for fresh noise.

    Args:
        x: ``(..., d)`` features (fp16/bf16/fp32/fp64); ``alpha``: ``x.shape[:-1]`` in [0, 1].
        seed: Philox seed in [0, 2^63), a Python int (a kernel argument, not specialised on). ``None``
            draws one on the host from ``generator`` (a CPU generator; torch's default one when None),
            so runs are reproducible under ``torch.manual_seed`` and no GPU value is read.
        offset: first Philox counter, ``0 <= offset <= 2**32 - x.numel()``.
        clamp_eps: α is clamped to [eps, 1-eps] inside the derivative w.r.t. α only.
        validate: check that α is finite and in [0, 1] (reads α); ``None``: ``validation.resolve_validate``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``. The reference backend replays the same
            stream on the host (``kernels.philox.philox_randn``, NumPy) and feeds it to
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
    if resolve_validate(validate, x.device):
        check_alpha_values(alpha)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator to vp_gate, not both (the generator only draws a seed)")
    if isinstance(clamp_eps, bool) or not isinstance(clamp_eps, float) or not 0.0 < clamp_eps < 0.5:
        raise ValueError(f"clamp_eps must be a float in (0, 0.5), got {clamp_eps!r}")
    tile_options(block_d=block_d)
    if seed is None:
        seed = draw_seed(generator)
    _check_seed_offset(seed, offset, x.numel())
    if resolve_backend(backend, x.device) == "reference":
        noise = vp_gate_noise(x.shape, seed, offset, device=x.device, backend="reference")
        return reference.vp_gate(x, alpha, noise=noise, clamp_eps=clamp_eps)
    check_contiguous("x", x)
    check_contiguous("alpha", alpha)
    return vp_gate_op(x, alpha, seed, offset, clamp_eps, block_d)


def vp_gate_noise(shape, seed: int, offset: int = 0, *, device="cpu", backend: str = "auto") -> Tensor:
    """The fp32 ε that ``vp_gate(x, alpha, seed=seed, offset=offset)`` uses for an x of ``shape``."""
    shape = tuple(int(s) for s in shape)
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    _check_seed_offset(seed, offset, numel)
    if resolve_backend(backend, device) == "reference":
        from ..kernels.philox import philox_randn

        return torch.from_numpy(philox_randn(numel, seed, offset)).reshape(shape).to(device)
    return kernel_module("vp_gate").vp_gate_noise(shape, seed, offset, device=device)
