"""Training configuration: one dataclass, read from a JSON file and/or command-line flags, checked up front.

Defaults follow docs/design.md (AdamW, lr 2e-4, cosine decay, τ 2.0 → 0.1 on a cosine). They
are reasonable starting points, not the paper's published hyperparameters (its supplement is not
public).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from ..validation import is_int, is_number
from .objective import DENOISER_ATTENTION, GATES

KERNEL_BACKENDS = ("auto", "triton", "reference")


@dataclass
class TrainConfig:
    # what to train on
    model: Optional[str] = None  # local folder of a transformers VLM (save_pretrained layout); CLI only
    data: Optional[str] = None  # JSONL of conversation records; CLI only
    image_folder: Optional[str] = None  # base of relative image paths (default: the JSONL's folder)
    output_dir: str = "runs/autoselect"
    # budget: exactly one of the two
    keep: Optional[int] = None
    keep_ratio: Optional[float] = None
    # optimisation
    steps: int = 2000
    batch_size: int = 32  # samples per optimiser step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    tau_start: float = 2.0
    tau_end: float = 0.1
    tau_steps: Optional[int] = None  # length of the τ cosine; default: steps
    # method and ablations
    gate: str = "vp"  # "vp" | "scale" (ablation x·α)
    denoiser_attention: str = "identity"  # "identity" | "global" (ablation)
    soft_topk_f: str = "laplace"
    kernel_backend: str = "auto"
    # module sizes (the Scorer's input width is the model's feature width)
    scorer_hidden_dim: int = 1024
    scorer_layers: int = 2
    scorer_heads: int = 16
    scorer_mlp_ratio: float = 4.0
    scorer_init: Optional[str] = None  # a saved Scorer to start from
    denoiser_mlp_ratio: float = 4.0
    denoiser_heads: int = 4  # global ablation only
    # running
    seed: int = 0
    save_every: int = 500  # checkpoint every n steps (0: only at the end)
    resume: bool = False
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"
    progress: bool = True
    strict_data: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad setting; returns self."""
        def need_int(name, low):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

        def need_float(name, low, high, *, low_open=False):
            v = getattr(self, name)
            if not is_number(v) or not ((low < v) if low_open else (low <= v)) or v > high:
                raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {v!r}")

        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError(f"give exactly one of keep (K per image) and keep_ratio, got keep={self.keep!r}, keep_ratio={self.keep_ratio!r}")
        if self.keep is not None:
            need_int("keep", 1)
        else:
            need_float("keep_ratio", 0.0, 1.0, low_open=True)
        for name in ("steps", "batch_size", "grad_accum", "scorer_hidden_dim", "scorer_layers", "scorer_heads", "denoiser_heads"):
            need_int(name, 1)
        for name in ("warmup_steps", "save_every", "seed"):
            need_int(name, 0)
        if self.tau_steps is not None:
            need_int("tau_steps", 1)
        need_float("lr", 0.0, 10.0, low_open=True)
        need_float("weight_decay", 0.0, 10.0)
        need_float("adam_eps", 0.0, 1.0, low_open=True)
        need_float("min_lr_ratio", 0.0, 1.0)
        need_float("max_grad_norm", 0.0, float("inf"))
        need_float("tau_start", 0.0, float("inf"), low_open=True)
        need_float("tau_end", 0.0, float("inf"), low_open=True)
        if self.tau_end > self.tau_start:
            raise ValueError(f"tau_end ({self.tau_end}) must not exceed tau_start ({self.tau_start}): τ is annealed downwards")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.denoiser_attention not in DENOISER_ATTENTION:
            raise ValueError(f"denoiser_attention must be one of {DENOISER_ATTENTION}, got {self.denoiser_attention!r}")
        if self.soft_topk_f not in ("laplace", "sigmoid"):
            raise ValueError(f"soft_topk_f must be 'laplace' or 'sigmoid', got {self.soft_topk_f!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if self.scorer_hidden_dim % self.scorer_heads:
            raise ValueError(f"scorer_hidden_dim ({self.scorer_hidden_dim}) must be divisible by scorer_heads ({self.scorer_heads})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(path) as fh:
            try:
                values = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object of settings")
        return cls.from_dict(values)

    def tau_horizon(self) -> int:
        return self.tau_steps if self.tau_steps is not None else self.steps


# Settings that must match when a run is resumed (the others may change, e.g. progress or save_every).
RESUME_MUST_MATCH = ("keep", "keep_ratio", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_ratio",
                     "tau_start", "tau_end", "tau_steps", "gate", "denoiser_attention", "soft_topk_f", "seed",
                     "scorer_hidden_dim", "scorer_layers", "scorer_heads", "denoiser_mlp_ratio")
