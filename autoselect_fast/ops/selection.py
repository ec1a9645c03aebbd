"""``select``: hard top-K per image, gather of the kept rows and their position ids (inference).

The op ``torch.ops.autoselect_fast.select`` (:data:`select_op`) runs the Triton selection kernel or, with
``backend="reference"``, ``reference.select_tokens`` inside the same op, so both trace under
``torch.compile``. Its autograd formula: hard top-K is piecewise constant in the scores (no gradient);
the gather is linear in the rows. Eager calls that need neither autograd nor tracing run the launcher
without the op's dispatcher (``dispatch.plain_eager_call``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..reference import POSITION_MODES, Selection
from ..validation import (
    FLOAT_DTYPES,
    IntOrTensor,
    budget_tensors,
    check_budget_values,
    check_choice,
    check_same_device,
    check_scores,
    check_selection_inputs,
    check_tensor,
    is_int,
    resolve_validate,
)
from .dispatch import check_contiguous, check_max_seqlen, kernel_module, plain_eager_call, resolve_backend, tile_options


def _select_launch(
    scores: Tensor,
    features: Optional[Tensor],
    k: Tensor,
    cu_seqlens: Tensor,
    kept_cu_seqlens: Tensor,
    positions: Optional[Tensor],
    total_k: int,
    compact: bool,
    backend: str,
    block_n: Optional[int],
    block_d: Optional[int],
    max_seqlen: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(indices (ΣK,), kept rows (ΣK, d) or an empty tensor without features, position ids)``."""
    if backend == "reference":
        sel = reference.select_tokens(
            scores, features, k, cu_seqlens, positions=positions, position_mode="compact" if compact else "original"
        )
        kept = sel.features if sel.features is not None else scores.new_empty(0)
        return sel.indices, kept, sel.position_ids
    opts = tile_options(block_n=block_n, block_d=block_d)
    if block_n is not None:
        opts["block_g"] = min(block_n, 64)
    indices, kept, kept_positions = kernel_module("selection").select_tokens(
        scores=scores, features=features, k=k, cu_seqlens=cu_seqlens, kept_cu_seqlens=kept_cu_seqlens,
        total_k=total_k, positions=positions, compact=compact, max_seqlen=max_seqlen, **opts,
    )
    return indices, kept if kept is not None else scores.new_empty(0), kept_positions


# The op runs exactly _select_launch; eager inference calls skip the dispatcher (plain_eager_call).
select_op = torch.library.custom_op("autoselect_fast::select", _select_launch, mutates_args=())


@select_op.register_fake
def _select_fake(scores, features, k, cu_seqlens, kept_cu_seqlens, positions, total_k, compact, backend, block_n, block_d, max_seqlen=None):
    indices = scores.new_empty(total_k, dtype=torch.int64)
    kept = scores.new_empty(0) if features is None else features.new_empty(total_k, features.shape[1])
    pos_shape = (total_k,) if positions is None or positions.dim() == 1 else (positions.shape[0], total_k)
    return indices, kept, scores.new_empty(pos_shape, dtype=torch.int64)


def _select_setup_context(ctx, inputs, output):
    features = inputs[1]
    ctx.save_for_backward(output[0])
    ctx.features_shape = None if features is None else features.shape


def _select_autograd(ctx, grad_indices, grad_kept, grad_positions):
    (indices,) = ctx.saved_tensors
    grad_features = None
    if ctx.features_shape is not None:
        grad_features = grad_kept.new_zeros(ctx.features_shape).index_add(0, indices, grad_kept)
    return None, grad_features, None, None, None, None, None, None, None, None, None, None


select_op.register_autograd(_select_autograd, setup_context=_select_setup_context)


def _total_k(k: IntOrTensor, k_t: Tensor, total_k: Optional[int], num_segments: int, validate: bool) -> int:
    """ΣK, from the host whenever the caller knows it; a budget tensor without ``total_k`` is read once."""
    if isinstance(k, int):
        known: Optional[int] = k * num_segments
    elif isinstance(k, (list, tuple)):
        known = sum(k)
    else:
        known = None
    if total_k is None:
        # The only host read left in select: the caller gave budgets on the device and not their sum.
        return known if known is not None else int(k_t.sum())
    if not is_int(total_k) or total_k < 0:
        raise ValueError(f"total_k must be an int >= 0 (the sum of the budgets) or None, got {total_k!r}")
    if known is not None and known != total_k:
        raise ValueError(f"total_k must equal the sum of k ({known}), got {total_k}")
    if known is None and validate:
        got = int(k_t.sum())
        if got != total_k:
            raise ValueError(f"total_k must equal the sum of k ({got}), got {total_k}")
    return total_k


def select(
    scores: Tensor,
    features: Optional[Tensor],
    k: IntOrTensor,
    cu_seqlens: Optional[Tensor] = None,
    *,
    positions: Optional[Tensor] = None,
    position_mode: str = "original",
    total_k: Optional[int] = None,
    max_seqlen: Optional[int] = None,
    validate: Optional[bool] = None,
    backend: str = "auto",
    block_n: Optional[int] = None,
    block_d: Optional[int] = None,
) -> Selection:
    """Hard top-K per image (ties to the lower index, ascending), the kept rows and their position ids.

    Same contract and result as ``reference.select_tokens`` (indices, rows bit-for-bit, positions):

    Args:
        scores: ``(ΣN,)`` Scorer outputs (fp16/bf16/fp32/fp64, finite).
        features: ``(ΣN, d)`` rows to gather (any dtype), or ``None``.
        k: budget per image, ``1 <= k <= N``: an int, a list of ints (both known on the host, so ΣK
            sizes the outputs without a synchronisation) or an integer tensor ``(B,)``.
        cu_seqlens: ``(B+1,)`` int32/int64 offsets; ``None`` for one image.
        positions: ``(ΣN,)`` or ``(3, ΣN)`` int32/int64 full-sequence positions; default 0..N_i-1.
        position_mode: ``"original"`` or ``"compact"`` (first token's position + rank).
        total_k: ΣK when ``k`` is a tensor and the caller knows the sum; without it that sum is read
            on the host (one synchronisation on CUDA, a graph break under ``torch.compile``).
        max_seqlen: the longest image's N when the caller knows it on the host; the kernels size their
            on-chip blocks from it (without it ΣN bounds the longest image, which can pick the slower
            looped kernels for a batch of many small images).
        validate: run the checks that read tensor values (finite scores, ``cu_seqlens``, k <= N,
            total_k); ``None``: ``validation.resolve_validate``. Shapes/dtypes/devices are always checked.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (the reference always validates).
        block_n, block_d: Triton tile sizes (powers of two; tokens per block, feature columns per program).
    Returns:
        ``reference.Selection``; ``cu_seqlens`` of the kept tokens is int64.
    """
    check_choice("position_mode", position_mode, POSITION_MODES)
    check_tensor("scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    run_checks = resolve_validate(validate, scores.device)
    cu = check_scores(scores, cu_seqlens, validate=run_checks)
    check_selection_inputs(scores, features, positions)
    check_same_device(scores=scores, features=features, positions=positions)
    num_segments = cu.shape[0] - 1
    host_lengths = [scores.shape[0]] if cu_seqlens is None else None
    # Budgets and kept offsets: one host→device copy for host budgets, no extra kernels.
    k_t, kept_cu = budget_tensors(k, num_segments, scores.device, host_lengths=host_lengths, with_offsets=True)
    if run_checks:
        check_budget_values(k_t, cu[1:] - cu[:-1])
    total = _total_k(k, k_t, total_k, num_segments, run_checks)
    tile_options(block_n=block_n, block_d=block_d)
    chosen = resolve_backend(backend, scores.device)
    if chosen == "triton":
        check_contiguous("scores", scores)
        check_contiguous("features", features, last_dim_only=True)
        check_contiguous("positions", positions, last_dim_only=True)
    max_seqlen = check_max_seqlen(max_seqlen, scores.shape[0] if cu_seqlens is None else None, cu, run_checks)
    run = _select_launch if plain_eager_call(scores, features, positions) else select_op
    indices, kept, kept_positions = run(
        scores, features, k_t, cu, kept_cu, positions, total, position_mode == "compact", chosen, block_n, block_d, max_seqlen
    )
    return Selection(
        indices=indices, features=None if features is None else kept, position_ids=kept_positions, cu_seqlens=kept_cu
    )
