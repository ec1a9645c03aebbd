"""Training of the Scorer and the Denoiser on a frozen VLM (installed as ``autoselect_fast.training``).

* ``objective``: one training forward, pixels -> Scorer -> Soft Top-K -> gate -> Denoiser -> frozen
  projector and LLM -> answer NLL (model glue through the adapters in ``autoselect_fast.models``).
* ``config``: ``TrainConfig``, checked before any work.
* ``data``: LLaVA-style conversation JSONL read with the model's processor and chat template.
* ``trainer``: AdamW, schedules, accumulation, DDP, atomic checkpoints, exact resume.
* ``schedule``: the τ schedule (``tau_schedule``, a cosine from τ_start to τ_end).
* ``synthetic`` / ``experiment``: the synthetic VQA task and the learning experiment
  (``python -m autoselect_fast.training.experiment``).
"""
from .config import TrainConfig
from .data import ConversationDataset, Sample, SampleList, collate, tokenize_conversation
from .objective import AutoSelectObjective, GlobalDenoiser, TrainBatch, alpha_statistics, noise_seed
from .schedule import tau_schedule
from .trainer import Trainer, build_objective

__all__ = [
    "TrainConfig", "ConversationDataset", "Sample", "SampleList", "collate", "tokenize_conversation",
    "AutoSelectObjective", "GlobalDenoiser", "TrainBatch", "alpha_statistics", "noise_seed", "tau_schedule", "Trainer",
    "build_objective",
]
