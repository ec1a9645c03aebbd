"""Functional API of the fused kernels, their registration as torch custom ops, and the backend dispatch.

One module per op, each holding its argument checks, custom op(s), fake implementation, autograd
registration and public function (the modules are not named after their functions, which would
shadow them as attributes of this package):

  * ``selection``   ``select`` (inference top-K + gather + position ids); op ``select``
  * ``soft_mask``   ``soft_topk`` (training mask), ``normalize_scores``; ops ``soft_topk``, ``soft_topk_backward``
  * ``noise_gate``  ``vp_gate`` (training noise gate), ``vp_gate_noise``, ``draw_seed``; ops ``vp_gate``,
                    ``vp_gate_backward``
  * ``dispatch``    backend resolution (``"triton"`` / ``"reference"``), lazy kernel loading, shared checks

(op ``name`` is ``torch.ops.autoselect_fast.name``.)

Every function checks its arguments with ``validation`` (clear ``ValueError``/``TypeError``), then runs
the Triton kernels of ``autoselect_fast.kernels`` or the float64 ``autoselect_fast.reference``
(``backend="auto"``: see ``dispatch``).

Host synchronisation (README, "Kernels and dispatch"): shape/dtype/device checks always run; checks
that read tensor values run only with ``validate=True`` (default: see
``validation.resolve_validate``: on for CPU tensors, off for CUDA tensors, off under
``torch.compile``, ``AUTOSELECT_FAST_VALIDATE`` overrides). Output sizes come from the host: ``select``
takes ΣK from ``k`` given as an int or a list of ints, or from ``total_k=``; only a budget *tensor*
without ``total_k`` costs one host read. With ``validate=False`` and host budgets the Triton path makes
no device→host synchronisation.

Custom ops: the Triton launches (and the reference selection) are registered as
``torch.ops.autoselect_fast.{select, soft_topk, soft_topk_backward, vp_gate, vp_gate_backward}``
with fake (meta) implementations and autograd formulas, so a function calling ``select``,
``soft_topk`` and ``vp_gate`` traces under ``torch.compile(fullgraph=True)`` and can be captured in a
CUDA graph (there give ``k`` and ``cu_seqlens`` as device tensors and ``total_k``: host values are
staged in a pinned buffer that the allocator may reuse once the capture ends). The reference Soft Top-K
and VP gate stay plain autograd code (the spec), so they trace only with graph breaks.
"""
from .dispatch import BACKENDS, kernels_compiled, kernels_interpreted, resolve_backend
from .noise_gate import draw_seed, vp_gate, vp_gate_noise
from .selection import select
from .soft_mask import SOFT_TOPK_STATS, normalize_scores, soft_topk

__all__ = [
    "BACKENDS",
    "SOFT_TOPK_STATS",
    "draw_seed",
    "kernels_compiled",
    "kernels_interpreted",
    "normalize_scores",
    "resolve_backend",
    "select",
    "soft_topk",
    "vp_gate",
    "vp_gate_noise",
]
