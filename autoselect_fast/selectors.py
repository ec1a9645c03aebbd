"""Token selectors: which K of an image's visual tokens are kept.

This module owns the selection rules behind ``AutoSelectEngine(..., selector=...)``, the lmms-eval
model's ``selector=`` argument, the learning experiment's baselines and the selector cost table
(``autoselect-fast pruning``). Every selector maps the images of a batch to one score per visual token
whose top-K (ties to the lower index) is exactly its choice. The engine's selection (``ops.select``)
then keeps those K tokens, so every selector keeps the engine's contract: K tokens per image, in their
original order, with their original positions, packed the same way.

* ``scorer`` (default): the learned AutoSelect Scorer (``autoselect_fast.modules.Scorer``).
* ``random``: K tokens drawn uniformly, seeded: an image's draw depends on the seed and the image's
  cache key (its pixels, by default), so it is reproducible under a seed, differs across seeds, and
  does not depend on the batch the image arrives in.
* ``norm``: the K tokens whose pre-projector feature has the largest L2 norm.
* ``divprune``: DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
  Multimodal Models", CVPR 2025): the greedy solution of the max-min diversity problem on the cosine
  distance ``1 - cos`` of the *projected* visual tokens (the paper prunes the tokens the LLM receives).
  First the token farthest from its nearest neighbour, then repeatedly the token whose distance to
  the chosen set (its nearest chosen token) is largest. The greedy order does not depend on K (the
  first K picks for a budget K' > K are the picks for K), so the score of the t-th pick is K - t and
  every other token scores 0. A token already chosen is never chosen again (the paper's set has no
  repeats; its code can only repeat one when distances tie at 0).
* ``visionzip``: VisionZip's dominant tokens (Yang et al., "VisionZip: Longer is Better but Not
  Necessary in Vision Language Models", CVPR 2025): the attention the [CLS] token pays each token in
  the vision tower's feature layer, summed over heads (the adapter computes it, see
  ``VLMAdapter.encode_with_cls_attention``). VisionZip's contextual tokens (the remaining tokens
  merged into a few averages) are *not* included: a merged token is a new token with no original
  position, which the engine's contract (K original tokens at their original positions) excludes.
  Qwen2.5-VL's vision tower has no [CLS] token, so ``visionzip`` refuses it.

The plain float64 definitions (``reference_*``) say in a few lines what each rule keeps; the tests hold
the selectors to them.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ragged import cu_seqlens_from_lengths
from .validation import is_int

SELECTORS = ("scorer", "random", "norm", "divprune", "visionzip")

# DivPrune holds a (B, N, N) distance matrix per group of equally sized images; images go in chunks of
# at most this many matrix entries (LLaVA-NeXT's N ~ 2,900 is ~8 M entries per image).
_DIVPRUNE_MAX_ENTRIES = 1 << 26


@dataclass
class SelectorInputs:
    """What a selector may read about the images of one call.

    Attributes:
        features: per image ``(N_i, d_v)``, the pre-projector features the Scorer reads, sequence order.
        budgets: K per image.
        keys: per image a cache key (the engine's pixel hash or the caller's ``image_id``), or ``None``.
        cls_attention: per image ``(N_i,)`` the [CLS] attention of the feature layer, for selectors with
            ``needs_cls_attention``.
        project: the model's projector (``(n, d_v) -> (n, H)``, per token), for selectors with ``needs_projection``.
    """

    features: Sequence[Tensor]
    budgets: Sequence[int]
    keys: Sequence[Optional[Hashable]]
    cls_attention: Optional[Sequence[Tensor]] = None
    project: Optional[Callable[[Tensor], Tensor]] = None


class Selector(nn.Module):
    """Per-token scores whose top-K per image is the selector's choice of K tokens.

    ``forward(inputs: SelectorInputs) -> list[Tensor]``: one float32 ``(N_i,)`` per image, on the
    features' device. Class attributes say what the engine must provide: ``needs_cls_attention``,
    ``needs_projection``; ``budget_dependent`` means the scores depend on K (cached per image and K).
    """

    name: str = ""
    needs_cls_attention: bool = False
    needs_projection: bool = False
    budget_dependent: bool = False

    def check_model(self, adapter) -> None:
        """Raise ``ValueError`` when this selector cannot work on ``adapter``'s model."""

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def _grouped_by_length(features: Sequence[Tensor]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(int(f.shape[0]), []).append(i)
    return groups


class ScorerSelector(Selector):
    """The learned Scorer: equally sized images go as one ``(B, N, d_v)`` batch, others flat with offsets."""

    name = "scorer"

    def __init__(self, scorer: nn.Module):
        super().__init__()
        if not callable(getattr(scorer, "check_input_dim", None)):
            raise TypeError(f"scorer must be an autoselect_fast.modules.Scorer (with check_input_dim), got {type(scorer).__name__}")
        self.scorer = scorer

    def check_model(self, adapter) -> None:
        self.scorer.check_input_dim(adapter.feature_dim)

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:
        from .ragged import to_device

        features = inputs.features
        dtype = next(self.scorer.parameters()).dtype
        flat = torch.cat(list(features)).to(dtype)
        lengths = [f.shape[0] for f in features]
        if len(set(lengths)) == 1:  # equal sizes: one (B, N, d_v) batch, no offsets to read back
            scores = self.scorer(flat.view(len(lengths), lengths[0], flat.shape[-1])).reshape(-1)
        else:
            scores = self.scorer(flat, to_device(cu_seqlens_from_lengths(lengths), flat.device))
        return list(scores.float().split(lengths))


class RandomSelector(Selector):
    """Uniform scores from a generator seeded with ``(seed, the image's key)``: K random tokens per image.

    An image without a key (``prune`` called without keys) draws from one generator seeded with
    ``seed`` at construction, so such calls are reproducible in sequence; a lock makes each call's
    draws one unbroken run of that generator when threads share the selector. Draws happen on the CPU
    and are copied to the features' device.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        super().__init__()
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._unkeyed = torch.Generator().manual_seed(seed)
        self._unkeyed_lock = threading.Lock()

    def _generator(self, key: Optional[Hashable]) -> torch.Generator:
        if key is None:
            return self._unkeyed
        digest = hashlib.blake2b(f"{self.seed}|{key!r}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:
        draws = zip(inputs.features, inputs.keys)
        if all(key is not None for key in inputs.keys):  # keyed draws share no state: no lock
            return [torch.rand(f.shape[0], generator=self._generator(key)).to(f.device) for f, key in draws]
        with self._unkeyed_lock:  # the shared generator: one call's draws must not interleave with another's
            scores = [torch.rand(f.shape[0], generator=self._generator(key)) for f, key in draws]
        return [s.to(f.device) for s, f in zip(scores, inputs.features)]


class NormSelector(Selector):
    """Score = L2 norm of the token's pre-projector feature, computed in float32."""

    name = "norm"

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:
        lengths = [f.shape[0] for f in inputs.features]
        return list(torch.cat(list(inputs.features)).float().norm(dim=-1).split(lengths))


def divprune_order(tokens: Tensor, steps: int) -> Tensor:
    """DivPrune's greedy max-min order: ``(B, steps)`` token indices for ``tokens`` ``(B, N, H)``.

    Distances ``1 - cos`` in float32; ties go to the lower index (``argmax`` returns the first maximum).
    """
    b, n, _ = tokens.shape
    if not 1 <= steps <= n:
        raise ValueError(f"steps must satisfy 1 <= steps <= N ({n}), got {steps}")
    unit = F.normalize(tokens.float(), dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)
    eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
    pick = dist.masked_fill(eye, float("inf")).amin(-1).argmax(-1)  # farthest from its nearest neighbour
    chosen = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    nearest_chosen = torch.full((b, n), float("inf"), device=tokens.device)
    order = torch.empty(b, steps, dtype=torch.int64, device=tokens.device)
    for t in range(steps):
        order[:, t] = pick
        chosen.scatter_(1, pick[:, None], True)
        row = dist.gather(1, pick[:, None, None].expand(b, 1, n))[:, 0]
        nearest_chosen = torch.minimum(nearest_chosen, row)
        pick = nearest_chosen.masked_fill(chosen, float("-inf")).argmax(-1)
    return order


class DivPruneSelector(Selector):
    """DivPrune on the projected tokens; scores ``K - t`` for the t-th greedy pick, 0 for the rest."""

    name = "divprune"
    needs_projection = True
    budget_dependent = True

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:
        if inputs.project is None:
            raise ValueError("selector 'divprune' needs the model's projector (SelectorInputs.project)")
        features, budgets = inputs.features, inputs.budgets
        out: list[Optional[Tensor]] = [None] * len(features)
        for n, members in _grouped_by_length(features).items():
            chunk = max(1, _DIVPRUNE_MAX_ENTRIES // (n * n))
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                steps = max(budgets[i] for i in part)
                projected = inputs.project(torch.cat([features[i] for i in part])).view(len(part), n, -1)
                order = divprune_order(projected, steps)
                ranks = torch.arange(steps, 0, -1, dtype=torch.float32, device=order.device).expand(len(part), steps)
                scores = torch.zeros(len(part), n, device=order.device).scatter_(1, order, ranks)
                for i, s in zip(part, scores):
                    out[i] = s
        return out


class VisionZipSelector(Selector):
    """VisionZip's dominant tokens: the [CLS] attention of the feature layer, summed over heads."""

    name = "visionzip"
    needs_cls_attention = True

    def check_model(self, adapter) -> None:
        reason = adapter.cls_attention_unavailable()
        if reason:
            raise ValueError(f"selector='visionzip' needs the [CLS] attention of the vision tower's feature layer, "
                             f"which {type(adapter.model).__name__} does not have: {reason}; use one of "
                             f"{[s for s in SELECTORS if s != 'visionzip']}")

    def forward(self, inputs: SelectorInputs) -> list[Tensor]:
        if inputs.cls_attention is None:
            raise ValueError("selector 'visionzip' needs the [CLS] attention of every image (SelectorInputs.cls_attention)")
        return [a.float() for a in inputs.cls_attention]


def make_selector(selector, *, scorer: Optional[nn.Module] = None, seed: int = 0) -> Selector:
    """A :class:`Selector` from a name in :data:`SELECTORS` (or a ``Selector``, returned as is).

    ``scorer`` is required by ``"scorer"`` and ignored by the others; ``seed`` seeds ``"random"``.
    """
    if isinstance(selector, Selector):
        return selector
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {list(SELECTORS)} or a Selector instance, got {selector!r}")
    if selector == "scorer":
        if scorer is None:
            raise ValueError("selector='scorer' needs a Scorer (scorer=...); the training-free selectors "
                             f"{[s for s in SELECTORS if s != 'scorer']} need none")
        return ScorerSelector(scorer)
    if selector == "random":
        return RandomSelector(seed)
    return {"norm": NormSelector, "divprune": DivPruneSelector, "visionzip": VisionZipSelector}[selector]()


# --------------------------------------------------------------------------------------------------
# Plain float64 definitions: the kept indices (ascending) of one image
# --------------------------------------------------------------------------------------------------
def _top_k_ascending(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties to the lower index, ascending."""
    values = scores.detach().double().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.int64)


def reference_norm(features: Tensor, k: int) -> Tensor:
    """The k tokens of largest L2 norm: ``argsort`` of the float64 norms, descending, stable."""
    norms = features.double().norm(dim=-1)
    return torch.sort(torch.argsort(-norms, stable=True)[:k]).values


def reference_divprune(tokens: Tensor, k: int) -> Tensor:
    """DivPrune's greedy max-min set, by brute force in float64 (``tokens`` ``(N, H)``, projected tokens)."""
    x = tokens.double()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = x.shape[0]

    def distance(i: int, j: int) -> float:
        return 1.0 - float(unit[i] @ unit[j])

    def best(candidates, value) -> int:  # largest value, ties to the lower index
        return max(candidates, key=lambda i: (value(i), -i))

    chosen = [best(range(n), lambda i: min((distance(i, j) for j in range(n) if j != i), default=float("inf")))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(best(rest, lambda i: min(distance(i, c) for c in chosen)))
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def reference_visionzip(cls_attention: Tensor, k: int) -> Tensor:
    """VisionZip's dominant tokens: the k largest [CLS] attentions (summed over heads), ties to the lower index."""
    return _top_k_ascending(cls_attention.double(), k)


__all__ = [
    "SELECTORS", "Selector", "SelectorInputs", "ScorerSelector", "RandomSelector", "NormSelector", "DivPruneSelector",
    "VisionZipSelector", "make_selector", "divprune_order", "reference_norm", "reference_divprune", "reference_visionzip",
]
