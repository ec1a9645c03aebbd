"""The pruning module (Scorer + hard top-K selection) timed on its own: the one home of that benchmark.

``autoselect-fast pruning`` (published Scorer on random features), ``bench/bench_pruning.py`` and the
report's "pruning module alone" lines (the preset's Scorer on its real vision features, at every K)
all time the calls built here, the way the engine's ``prune`` stage runs them without its score
cache: the Scorer over the images (one ``(B, N, d_v)`` batch when the images are the same size,
else flat with offsets), then ``ops.select`` with the budgets as a host list.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..modules import Scorer, ScorerConfig
from ..ragged import cu_seqlens_from_lengths
from ..timing import gpu_timeline_ms, measure


def published_pruning_inputs(batch: int, tokens: int, dim: int, *, device, dtype: torch.dtype, seed: int = 0) -> tuple[Scorer, list[Tensor]]:
    """The published Scorer (2 blocks, width 1024, 16 heads; random weights) for features of width
    ``dim``, and ``batch`` images of ``tokens`` random feature rows each."""
    torch.manual_seed(seed)
    scorer = Scorer(ScorerConfig(input_dim=dim)).to(device=device, dtype=dtype).eval()
    features = torch.randn(batch * tokens, dim, device=device, dtype=dtype)
    return scorer, list(features.split(tokens))


def pruning_calls(scorer: Scorer, features: Sequence[Tensor], budgets: Sequence[int], *, backend: str = "auto",
                  positions: Optional[Tensor] = None) -> dict[str, Callable[[], object]]:
    """``{"pruning_module": Scorer + selection, "scorer_only": the Scorer}`` over per-image features
    ``(N_i, d_v)`` with K_i = ``budgets[i]``; ``positions`` as for ``ops.select`` (default 0..N_i-1)."""
    if len(budgets) != len(features):
        raise ValueError(f"budgets must give one K per image ({len(features)}), got {list(budgets)}")
    flat = torch.cat(list(features))
    lengths = [f.shape[0] for f in features]
    cu = cu_seqlens_from_lengths(lengths).to(flat.device)
    positions = positions.to(flat.device) if positions is not None else None
    scorer_input = flat.view(len(lengths), lengths[0], flat.shape[-1]) if len(set(lengths)) == 1 else flat

    @torch.inference_mode()
    def scorer_only() -> Tensor:
        out = scorer(scorer_input) if scorer_input.dim() == 3 else scorer(scorer_input, cu)
        return out.reshape(-1).float()

    @torch.inference_mode()
    def pruning_module():
        return ops.select(scorer_only(), flat, list(budgets), cu, positions=positions, max_seqlen=max(lengths),
                          backend=backend, validate=False)

    return {"pruning_module": pruning_module, "scorer_only": scorer_only}


def time_pruning_module(calls: dict[str, Callable[[], object]], *, device, warmup: int, repeats: int) -> dict:
    """Median, min and max of each call in ms (:func:`autoselect_fast.timing.measure`); on CUDA also
    ``gpu_timeline``: the GPU's own time per call, as inside a served model's CUDA graph."""
    device = torch.device(device)
    out = {name: measure(fn, device=device, warmup=warmup, repeats=repeats).as_dict() for name, fn in calls.items()}
    if device.type == "cuda":
        timeline = {}
        for name, fn in calls.items():
            ms, how = gpu_timeline_ms(fn)
            timeline[name] = {"ms": ms, "method": how}
        out["gpu_timeline"] = timeline
    return out
