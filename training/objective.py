"""The training objective of AutoSelect: one forward from pixels to the answer-token NLL.

This module owns what happens inside a training step (docs/design.md, "The math")::

    frozen vision tower -> Scorer -> ops.soft_topk (z-score, τ) -> gate -> Denoiser
        -> frozen projector -> frozen LLM with the text -> NLL of the answer tokens only

* The gate is ``"vp"`` (default, ``ops.vp_gate``: the fused kernel regenerates its Philox noise in the
  backward) or the paper's ablation ``"scale"`` (``x·α``).
* The Denoiser is the per-token ``modules.Denoiser`` (identity attention mask) or the ablation
  :class:`GlobalDenoiser` (full attention among one image's tokens).
* Model-specific glue (features, projection, where the image goes in the sequence, positions) comes
  from the model's adapter (``autoselect_fast.models``) through its model-neutral API: ``encode``
  (pre-projector / pre-merger features), ``project`` (projector or merger, per token),
  ``training_sequence`` (the full sequence via ``embed_full_sequence``: layout, newlines, positions,
  1-D or M-RoPE) and ``training_logits``. No model-specific code lives in ``training/``; LLaVA-1.5,
  LLaVA-NeXT and Qwen2.5-VL train here unchanged.

Only the Scorer and the Denoiser are submodules of :class:`AutoSelectObjective`; the VLM is held
outside the module tree, so ``parameters()``, DDP and the optimiser see the trainable parts only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..budget import check_budget_args, image_budget
from ..models import get_adapter
from ..modules import Denoiser, DenoiserConfig, EncoderBlock, Scorer, _Checkpointable
from ..ragged import cu_seqlens_from_lengths, packed_to_padded

GATES = ("vp", "scale")
DENOISER_ATTENTION = ("identity", "global")
IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# Ablation: a Denoiser whose attention crosses tokens
# --------------------------------------------------------------------------------------------------
@dataclass
class GlobalDenoiserConfig(DenoiserConfig):
    num_heads: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.input_dim % self.num_heads:
            raise ValueError(f"GlobalDenoiserConfig.num_heads must divide input_dim ({self.input_dim}), got {self.num_heads!r}")


class GlobalDenoiser(_Checkpointable):
    """Ablation of the paper: the Denoiser block with full attention among one image's own tokens."""

    config_class = GlobalDenoiserConfig
    kind = "global_denoiser"

    def __init__(self, config: GlobalDenoiserConfig):
        super().__init__()
        self.config = config
        self.block = EncoderBlock(config.input_dim, config.num_heads, config.mlp_ratio, config.norm_eps)

    def forward(self, x: Tensor, cu_seqlens: Tensor) -> Tensor:
        self.check_input_dim(x.shape[-1])
        lengths = cu_seqlens.diff()
        padded = packed_to_padded(x, cu_seqlens)
        key_mask = torch.arange(padded.shape[1], device=x.device)[None, :] < lengths[:, None]
        return self.block(padded, key_mask)[key_mask]


def build_denoiser(attention: str, input_dim: int, *, num_heads: int = 4, mlp_ratio: float = 4.0) -> nn.Module:
    if attention == "identity":
        return Denoiser(DenoiserConfig(input_dim=input_dim, mlp_ratio=mlp_ratio))
    if attention == "global":
        return GlobalDenoiser(GlobalDenoiserConfig(input_dim=input_dim, mlp_ratio=mlp_ratio, num_heads=num_heads))
    raise ValueError(f"denoiser_attention must be one of {DENOISER_ATTENTION}, got {attention!r}")


# --------------------------------------------------------------------------------------------------
# Budget and noise seeds
# --------------------------------------------------------------------------------------------------
def noise_seed(base_seed: int, step: int, slot: int) -> int:
    """Philox seed of one sample's VP noise (splitmix64 of seed, step, slot in the global batch).

    Depending only on these three numbers makes the noise identical however the global batch is split
    over processes and accumulation steps, and after a resume.
    """
    z = (base_seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + slot * 0x94D049BB133111EB + 0x632BE59BD9B4E5B) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 2  # < 2**62, the range ops.draw_seed uses


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainBatch:
    """What one micro-batch holds (see ``training.data.collate``)."""

    input_ids: list[Tensor]
    labels: list[Tensor]
    pixel_values: list[Tensor]
    image_sizes: list
    slots: list[int]  # index of each sample in its global batch (fixes its VP noise)


@dataclass
class StepOutput:
    loss: Tensor  # NLL sum over this micro-batch's answer tokens, divided by the given normaliser
    nll_sum: float
    answer_tokens: int
    alpha: Tensor  # detached α of every token (for statistics)
    budgets: list[int]


class AutoSelectObjective(nn.Module):
    """Scorer + Denoiser (the trainable parts) and the frozen VLM's answer NLL.

    Args:
        model: a supported transformers VLM; frozen here (``requires_grad_(False)``, eval mode).
        scorer: a ``modules.Scorer`` of width ``adapter.feature_dim``.
        denoiser: a ``modules.Denoiser`` or :class:`GlobalDenoiser` of the same width.
        keep / keep_ratio: budget K per image, fixed (clipped to N for models whose N follows the image's
            resolution, an error otherwise) or a fraction of N.
        gate: ``"vp"`` or ``"scale"``.
        soft_topk_f: ``"laplace"`` or ``"sigmoid"``.
        kernel_backend: ``ops`` backend for Soft Top-K and the VP gate (``"auto"``: Triton on CUDA).
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: Scorer,
        denoiser: nn.Module,
        *,
        keep: Optional[int] = None,
        keep_ratio: Optional[float] = None,
        gate: str = "vp",
        soft_topk_f: str = "laplace",
        kernel_backend: str = "auto",
    ):
        super().__init__()
        adapter = get_adapter(model)  # TypeError naming the class for unsupported models
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        check_budget_args(keep, keep_ratio, required=True)
        scorer.check_input_dim(adapter.feature_dim)
        denoiser.check_input_dim(adapter.feature_dim)
        model.requires_grad_(False).eval()
        self.scorer, self.denoiser = scorer, denoiser
        # Plain attributes, not submodules: the VLM stays outside parameters(), state_dict() and DDP.
        self.__dict__["adapter"] = adapter
        self.keep, self.keep_ratio, self.gate = keep, keep_ratio, gate
        self.soft_topk_f, self.kernel_backend = soft_topk_f, kernel_backend

    def train(self, mode: bool = True):  # the frozen VLM stays in eval mode whatever the trainables do
        super().train(mode)
        self.adapter.model.eval()
        return self

    def budget(self, num_tokens: int, where: str = "an image") -> int:
        return image_budget(num_tokens, self.keep, self.keep_ratio, clip=self.adapter.clips_keep_to_tokens, where=where)

    def forward(self, batch: TrainBatch, *, tau: float, step: int, seed: int, normalizer: float) -> StepOutput:
        adapter = self.adapter
        with torch.no_grad():
            features = adapter.encode(batch.pixel_values, batch.image_sizes)
        lengths = [f.shape[0] for f in features]
        budgets = [self.budget(n, f"training sample {slot} of the batch") for n, slot in zip(lengths, batch.slots)]
        param = next(self.scorer.parameters())
        flat = torch.cat(features).to(device=param.device, dtype=param.dtype).contiguous()
        cu = cu_seqlens_from_lengths(lengths).to(flat.device)

        scores = self.scorer(flat, cu)
        # Budgets and the longest image go as host ints: no device read, and the kernels size their blocks.
        alpha = ops.soft_topk(scores.float().contiguous(), budgets, cu, tau=tau, f=self.soft_topk_f, normalize=True,
                              max_seqlen=max(lengths), backend=self.kernel_backend)
        gated = self._gate(flat, alpha.to(flat.dtype), cu, batch.slots, step, seed)
        denoised = self.denoiser(gated, cu) if isinstance(self.denoiser, GlobalDenoiser) else self.denoiser(gated)
        projected = adapter.project(denoised).split(lengths)

        embeds, positions, labels = [], [], []
        for ids, lab, vis, size in zip(batch.input_ids, batch.labels, projected, batch.image_sizes):
            e, p, lab_seq = adapter.training_sequence(ids, lab, vis, size)
            embeds.append(e), positions.append(p), labels.append(lab_seq)
        inputs_embeds, attention_mask, position_ids, seq_labels = pad_sequences(embeds, positions, labels)
        # Token t predicts label t+1: keep only rows whose next label is a target.
        targets = seq_labels[:, 1:]
        is_target = targets != IGNORE_INDEX
        s = seq_labels.shape[1]
        rows = (torch.arange(seq_labels.shape[0], device=targets.device)[:, None] * s + torch.arange(s - 1, device=targets.device)[None, :])[is_target]
        logits = adapter.training_logits(inputs_embeds, attention_mask, position_ids, rows)
        nll = nn.functional.cross_entropy(logits.float(), targets[is_target], reduction="sum")
        return StepOutput(
            loss=nll / normalizer, nll_sum=float(nll.detach()), answer_tokens=int(is_target.sum()),
            alpha=alpha.detach().float(), budgets=budgets,
        )

    def _gate(self, x: Tensor, alpha: Tensor, cu: Tensor, slots: Sequence[int], step: int, seed: int) -> Tensor:
        if self.gate == "scale":
            return x * alpha[:, None]
        # One call per image: each image's noise is fixed by its own seed (see noise_seed).
        bounds = cu.tolist()
        parts = [
            ops.vp_gate(x[a:b], alpha[a:b], seed=noise_seed(seed, step, slot), backend=self.kernel_backend)
            for a, b, slot in zip(bounds[:-1], bounds[1:], slots)
        ]
        return torch.cat(parts)


def pad_sequences(embeds: list[Tensor], positions: list[Tensor], labels: list[Tensor]):
    """Right-pad per-sample sequences into one batch (``ragged.packed_to_padded``): (B, S, H) embeds,
    (B, S) attention mask, (B, S) or (3, B, S) positions, (B, S) labels (IGNORE_INDEX past each end)."""
    lengths = [lab.shape[0] for lab in labels]
    cu = cu_seqlens_from_lengths(lengths)
    device = embeds[0].device
    inputs_embeds = packed_to_padded(torch.cat(embeds), cu)
    mask = packed_to_padded(torch.ones(sum(lengths), dtype=torch.int64, device=device), cu)
    seq_labels = packed_to_padded(torch.cat(labels).to(torch.int64), cu, pad_value=IGNORE_INDEX)
    pos = packed_to_padded(torch.cat(positions, dim=-1).to(torch.int64), cu, dim=-1)
    # Padding continues each row's positions (last + 1, last + 2, ...) so every row is well defined.
    n = torch.tensor(lengths, device=device)
    last = pos.gather(-1, (n - 1)[:, None].expand(*pos.shape[:-1], 1))
    continued = last + torch.arange(pos.shape[-1], device=device) - n[:, None] + 1
    return inputs_embeds, mask, torch.where(mask.bool(), pos, continued), seq_labels


def alpha_statistics(alpha: Tensor) -> dict:
    """How close α is to a hard 0/1 mask: bimodality = 1 - mean 4α(1-α) (1: hard, 0: all at 0.5)."""
    a = alpha.float().clamp(0, 1)
    return {
        "alpha_bimodality": float(1.0 - (4.0 * a * (1.0 - a)).mean()),
        "alpha_hard_fraction": float(((a < 0.05) | (a > 0.95)).float().mean()),
    }

