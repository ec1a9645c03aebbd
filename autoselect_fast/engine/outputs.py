"""What the engine's stages return: :class:`PruneResult`, :class:`PrefillOutput`, :class:`GenerateOutput`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._validation import to_device
from ..packing import PackedBatch
from ..reference import Selection, cu_seqlens_from_lengths
from .request import PreparedBatch

__all__ = ["PruneResult", "PrefillOutput", "GenerateOutput", "prefill_output"]


@dataclass
class PruneResult:
    """Output of :meth:`AutoSelectEngine.prune`.

    ``scores`` ``(ΣN,)`` per token (``token_cu_seqlens``, a host tensor, per image); ``selection`` is
    what the selection backend returned: flat ``indices`` into the ΣN tokens (ascending per image), the
    kept ``features`` ``(ΣK, d_v)``, their ``position_ids`` (the positions passed in, ``original`` mode)
    and ``cu_seqlens`` of the kept tokens; ``budgets`` the K of every image.
    """

    scores: Tensor
    token_cu_seqlens: Tensor
    selection: Selection
    budgets: list[int]

    @classmethod
    def empty(cls, device: torch.device, feature_dim: int, position_rows: int) -> "PruneResult":
        """The prune result of a batch without images (text-only requests)."""
        none = torch.zeros(0, dtype=torch.int64, device=device)
        positions = none if position_rows == 1 else none.view(1, 0).expand(position_rows, 0)
        selection = Selection(indices=none, features=torch.zeros(0, feature_dim, device=device),
                              position_ids=positions, cu_seqlens=torch.zeros(1, dtype=torch.int64, device=device))
        return cls(scores=torch.zeros(0, device=device), token_cu_seqlens=torch.zeros(1, dtype=torch.int64), selection=selection, budgets=[])

    def kept_indices(self) -> list[Tensor]:
        """Per image: indices of the kept tokens in ``[0, N_i)``, ascending (sequence order); no host read."""
        starts = self.token_cu_seqlens[:-1].tolist()
        bounds = cu_seqlens_from_lengths(self.budgets).tolist()
        return [self.selection.indices[b:e] - s for s, b, e in zip(starts, bounds[:-1], bounds[1:])]


@dataclass
class PrefillOutput:
    """Result of :meth:`AutoSelectEngine.prefill`.

    Attributes:
        logits: ``(B, vocab)`` logits of the first generated token.
        kept_tokens: per request, visual tokens kept over all its images (ΣK; newlines not counted).
        visual_tokens: per request, visual tokens of its images before pruning (ΣN).
        sequence_lengths: per request, tokens in the pruned LLM sequence (text + kept tokens + kept newlines).
        next_positions: ``(B,)`` position id of the first generated token (largest position + 1, over
            all rows for M-RoPE); decoding uses it on every row and counts up by one.
        kept_indices: per image of the batch (request after request), ascending kept token indices in ``[0, N_i)``.
        image_request: per image of the batch, the request it belongs to.
        timings_ms: ``{}`` unless the call asked for ``timings=True``; then ``vision`` (vision tower +
            feature arrangement), ``prune`` (Scorer + selection), ``pack`` (projector on kept tokens,
            embeddings, positions, packing), ``prefill`` (LLM forward + lm_head on the last tokens),
            ``total``, measured with CUDA synchronisation around each stage on a GPU.
    """

    logits: Tensor
    kept_tokens: list[int]
    visual_tokens: list[int]
    sequence_lengths: list[int]
    next_positions: Tensor
    kept_indices: list[Tensor]
    image_request: list[int] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class GenerateOutput:
    """Result of :meth:`AutoSelectEngine.generate`: new token ids per request and the prefill they follow."""

    token_ids: list[list[int]]
    prefill: PrefillOutput


def prefill_output(batch: PreparedBatch, pruned: PruneResult, packed: PackedBatch, lengths: list[int], logits: Tensor,
                   timings_ms: dict[str, float]) -> PrefillOutput:
    """The :class:`PrefillOutput` of a batch, from host-side counts and device-side positions (no host read)."""
    device = logits.device
    request_of_token = to_device(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)), device)
    token_max = packed.position_ids.view(-1, packed.embeds.shape[0]).amax(0)  # over the M-RoPE rows
    largest = torch.full((len(lengths),), -1, dtype=torch.int64, device=device)
    largest = largest.scatter_reduce(0, request_of_token, token_max, reduce="amax")
    image_request = batch.image_request.tolist()
    kept_tokens, visual_tokens = [0] * batch.batch_size, [0] * batch.batch_size
    for r, k, layout in zip(image_request, batch.budgets, batch.layouts):
        kept_tokens[r] += k
        visual_tokens[r] += layout.num_tokens
    return PrefillOutput(
        logits=logits,
        kept_tokens=kept_tokens,
        visual_tokens=visual_tokens,
        sequence_lengths=lengths,
        next_positions=largest + 1,
        kept_indices=pruned.kept_indices(),
        image_request=image_request,
        timings_ms=timings_ms,
    )
