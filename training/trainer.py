"""The training loop: AdamW, warm-up + cosine learning rate, τ schedule, clipping, accumulation, DDP,
atomic checkpoints and exact resume.

Determinism contract (what the resume and DDP tests rely on):

* The global batch of optimiser step t is fixed by (seed, t): samples are drawn in the order of a
  per-epoch permutation seeded by (seed, epoch), ``batch_size`` of them per step. Process r of W
  takes its contiguous share; each share is split into ``grad_accum`` micro-batches.
* The VP noise of a sample depends on (seed, t, its slot in the global batch) only
  (``objective.noise_seed``), not on the process layout.
* Each micro-batch loss is its NLL sum divided by the number of answer tokens in the whole global
  batch (summed over processes first) and multiplied by W (DDP averages gradients over processes).
  So one process and W processes compute the same update up to float summation order.

Checkpoints (``<output_dir>/checkpoint.pt``, written to a temporary file and renamed) hold the
Scorer, the Denoiser, the optimiser, the scheduler, the step, the data position, the RNG states and
the config. The Scorer and Denoiser are also saved with ``save_pretrained`` (``<output_dir>/scorer``
loads straight into ``AutoSelectEngine``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..modules import Scorer, ScorerConfig
from .config import RESUME_MUST_MATCH, TrainConfig
from .data import collate
from .objective import IGNORE_INDEX, AutoSelectObjective, alpha_statistics, build_denoiser
from .schedule import tau_schedule

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------------------------------
# Building the trainable parts
# --------------------------------------------------------------------------------------------------
def build_objective(model: nn.Module, config: TrainConfig) -> AutoSelectObjective:
    """Scorer + Denoiser for ``model`` as ``config`` describes; every check runs before any step."""
    from ..models import get_adapter

    config.validate()
    adapter = get_adapter(model)
    feature_dim = adapter.feature_dim
    with torch.random.fork_rng(devices=[]):  # initial weights fixed by config.seed, global RNG untouched
        torch.manual_seed(config.seed)
        if config.scorer_init is not None:
            scorer = Scorer.from_pretrained(config.scorer_init, expected_input_dim=feature_dim)
        else:
            scorer = Scorer(ScorerConfig(
                input_dim=feature_dim, hidden_dim=config.scorer_hidden_dim, num_layers=config.scorer_layers,
                num_heads=config.scorer_heads, mlp_ratio=config.scorer_mlp_ratio,
            ))
        denoiser = build_denoiser(config.denoiser_attention, feature_dim, num_heads=config.denoiser_heads, mlp_ratio=config.denoiser_mlp_ratio)
    device = adapter.device
    return AutoSelectObjective(
        model, scorer.to(device), denoiser.to(device), keep=config.keep, keep_ratio=config.keep_ratio,
        gate=config.gate, soft_topk_f=config.soft_topk_f, kernel_backend=config.kernel_backend,
    )


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to lr, then a cosine to lr·min_lr_ratio at the last step."""
    warmup, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------
class _Dist:
    """Rank / world size from torchrun's environment; initialises the process group when W > 1."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _atomic_save_dir(module, directory: str) -> None:
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    module.save_pretrained(tmp)
    if os.path.exists(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class Trainer:
    """Trains ``objective``'s Scorer and Denoiser on ``dataset`` (``__getitem__`` -> ``data.Sample``,
    ``num_visual_tokens(i)`` -> N of sample i)."""

    def __init__(self, objective: AutoSelectObjective, dataset, config: TrainConfig):
        self.config = config.validate()
        self.objective = objective
        self.dataset = dataset
        self.device = objective.adapter.device
        self.dist = _Dist(self.device)
        if config.batch_size % (self.dist.world * config.grad_accum):
            raise ValueError(
                f"batch_size ({config.batch_size}) must be divisible by processes x grad_accum "
                f"({self.dist.world} x {config.grad_accum})"
            )
        self._check_budgets()
        self.optimizer = torch.optim.AdamW(objective.parameters(), lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step = 0
        self.output_dir = config.output_dir
        self.is_main = self.dist.rank == 0
        if config.resume:
            self._load_checkpoint()
        elif self.is_main and os.path.exists(os.path.join(self.output_dir, CHECKPOINT_NAME)):
            raise ValueError(f"{self.output_dir} already holds a checkpoint: pass resume to continue it, or choose another output_dir")
        self.model = objective
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(objective, device_ids=ids)

    # -- checks --------------------------------------------------------------------------------
    def _check_budgets(self) -> None:
        """K <= N for every sample, before the first step (names the first offending sample)."""
        for i in range(len(self.dataset)):
            where = f"training sample {i}"
            records = getattr(self.dataset, "records", None)
            if records is not None:
                where = f"{self.dataset.path}:{records[i][0]}"
            self.objective.budget(self.dataset.num_visual_tokens(i), where)

    # -- data order ----------------------------------------------------------------------------
    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the global batch of optimiser step ``step``."""
        n, b = len(self.dataset), self.config.batch_size
        out, position = [], step * b
        perms: dict[int, torch.Tensor] = {}
        while len(out) < b:
            epoch, offset = divmod(position, n)
            if epoch not in perms:
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            take = min(b - len(out), n - offset)
            out.extend(perms[epoch][offset:offset + take].tolist())
            position += take
        return out

    def _micro_batches(self, step: int) -> list[tuple[list[int], list[int]]]:
        """This process's micro-batches of step ``step``: (dataset indices, slots in the global batch)."""
        indices = self.global_indices(step)
        share = self.config.batch_size // self.dist.world
        first = self.dist.rank * share
        micro = share // self.config.grad_accum
        return [
            (indices[first + m * micro: first + (m + 1) * micro], list(range(first + m * micro, first + (m + 1) * micro)))
            for m in range(self.config.grad_accum)
        ]

    # -- the loop ------------------------------------------------------------------------------
    def train(self, on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
        """Run to ``config.steps``; ``on_step(step, metrics)`` is called after every optimiser step."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            self._truncate_metrics()
        self.objective.train()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="train", dynamic_ncols=True)
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if (cfg.bf16 and self.device.type == "cuda") else contextlib.nullcontext()
        metrics: dict = {}
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            tau = tau_schedule(self.step, cfg.tau_horizon(), cfg.tau_start, cfg.tau_end)
            micro = [(collate([self.dataset[i] for i in idx], slots)) for idx, slots in self._micro_batches(self.step)]
            local_tokens = sum(int((lab[1:] != IGNORE_INDEX).sum()) for b in micro for lab in b.labels)
            (global_tokens,) = self.dist.sum([float(local_tokens)], self.device)
            if global_tokens == 0:
                raise ValueError(f"the global batch of step {self.step} holds no answer token to learn from")
            normalizer = global_tokens / self.dist.world
            nll, alphas = 0.0, []
            for m, batch in enumerate(micro):
                sync = m == len(micro) - 1 or not self.dist.enabled
                with (contextlib.nullcontext() if sync else self.model.no_sync()), autocast:
                    out = self.model(batch, tau=tau, step=self.step, seed=cfg.seed, normalizer=normalizer)
                out.loss.backward()
                nll += out.nll_sum
                alphas.append(out.alpha)
            params = [p for p in self.objective.parameters() if p.grad is not None]
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            (nll_total,) = self.dist.sum([nll], self.device)
            metrics = {
                "step": self.step, "loss": nll_total / global_tokens, "tau": tau, "lr": lr, "grad_norm": grad_norm,
                **alpha_statistics(torch.cat(alphas)), "answer_tokens": int(global_tokens), "seconds": time.perf_counter() - t0,
            }
            if self.is_main:
                with open(os.path.join(self.output_dir, METRICS_NAME), "a") as fh:
                    fh.write(json.dumps(metrics) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tau=f"{tau:.3f}", bimodal=f"{metrics['alpha_bimodality']:.2f}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step, metrics)
        bar.close()
        self.save_checkpoint()
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Atomic checkpoint (tmp + rename) plus ``scorer/`` and ``denoiser/`` in save_pretrained form."""
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            state = {
                "step": self.step,
                "data_position": self.step * self.config.batch_size,
                "scorer": self.objective.scorer.state_dict(),
                "denoiser": self.objective.denoiser.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "config": self.config.to_dict(),
                "world_size": self.dist.world,
            }
            path = os.path.join(self.output_dir, CHECKPOINT_NAME)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
            _atomic_save_dir(self.objective.scorer, os.path.join(self.output_dir, "scorer"))
            _atomic_save_dir(self.objective.denoiser, os.path.join(self.output_dir, "denoiser"))
        self.dist.barrier()

    def _load_checkpoint(self) -> None:
        path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume: no {CHECKPOINT_NAME} in {self.output_dir}")
        # Our own file with RNG states (tuples, NumPy arrays) in it, hence weights_only=False.
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in RESUME_MUST_MATCH if saved.get(k) != getattr(self.config, k)]
        if changed:
            raise ValueError("resume: the run was started with other settings (" + "; ".join(changed) + ")")
        self.objective.scorer.load_state_dict(state["scorer"])
        self.objective.denoiser.load_state_dict(state["denoiser"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if state["data_position"] != self.step * self.config.batch_size:
            raise ValueError(f"resume: checkpoint data position {state['data_position']} does not match step {self.step}")
        _set_rng_state(state["rng"])

    def _truncate_metrics(self) -> None:
        """On resume, drop metric lines written after the checkpoint (a killed run may have logged more)."""
        path = os.path.join(self.output_dir, METRICS_NAME)
        if not os.path.exists(path):
            return
        with open(path) as fh:
            lines = [line for line in fh if line.strip() and json.loads(line)["step"] <= self.step]
        with open(path + ".tmp", "w") as fh:
            fh.writelines(lines)
        os.replace(path + ".tmp", path)


__all__ = ["Trainer", "build_objective", "lr_lambda", "CHECKPOINT_NAME", "METRICS_NAME"]
