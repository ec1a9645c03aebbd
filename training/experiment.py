"""The learning experiment: does a trained Scorer keep the tokens that carry the answer?

One command (CPU, a few minutes)::

    python -m autoselect_fast.training.experiment --out-dir bench/results

1. Generate the synthetic "which colour?" task (``training.synthetic``: one of N = 64 tokens holds the
   answer, 12 hold achromatic distractors).
2. Pretrain a tiny LLaVA (real transformers classes) on it with every token; freeze it.
3. Train Scorer + Denoiser at K = N/8 with ``training.Trainer`` (VP gate, identity-mask Denoiser), and
   the paper's two ablations (scale gate ``x·α``; Denoiser with global attention).
4. Answer held-out questions through ``AutoSelectEngine`` with hard top-K for: every token, the trained
   Scorer, the ablations, K random tokens, and a training-free baseline (K tokens of largest feature
   norm). Also recorded: how often the answer-carrying token is among the kept ones.
5. Write ``training-experiment-<tag>.json`` and ``.png`` (accuracy per method, kept tokens drawn on a few
   held-out images).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import synthetic as S
from .config import TrainConfig
from .data import SampleList
from .trainer import Trainer, build_objective


# --------------------------------------------------------------------------------------------------
# Training-free scorers, run through the engine like the trained one
# --------------------------------------------------------------------------------------------------
class _FixedScorer(nn.Module):
    """Base of the baselines: reads features of width ``input_dim`` and has no trained weights."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.input_dim = input_dim
        # The engine reads the Scorer's dtype from its parameters; an empty one answers without weights.
        self.dtype_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def check_input_dim(self, vision_dim: int) -> None:
        if vision_dim != self.input_dim:
            raise ValueError(f"{type(self).__name__} reads features of width {self.input_dim}, got {vision_dim}")


class FeatureNormScorer(_FixedScorer):
    """Score = L2 norm of the token's pre-projector feature (a common training-free heuristic)."""

    def forward(self, features: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        return features.float().norm(dim=-1)


class RandomScorer(_FixedScorer):
    """Independent uniform scores from a seeded generator: K random tokens per image."""

    def __init__(self, input_dim: int, seed: int = 0):
        super().__init__(input_dim)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, features: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        # flat (ΣN, d) or, from the engine's equal-size batch, (B, N, d): one score per token either way
        return torch.rand(features.shape[:-1], generator=self.generator).to(features.device)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------
@dataclass
class ExperimentSettings:
    tag: str = "cpu"
    out_dir: str = "bench/results"
    work_dir: Optional[str] = None  # checkpoints of the runs (default: <out_dir>/training-experiment-<tag>-runs, removed after)
    seed: int = 0
    train_samples: int = 3000
    test_samples: int = 400
    distractors: int = 12
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 1e-3
    keep: int = 8  # K = N/8 of N = 64
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    tau_start: float = 2.0
    tau_end: float = 0.1
    scorer_hidden_dim: int = 64
    scorer_layers: int = 2
    scorer_heads: int = 4
    ablations: bool = True
    backend: str = "auto"  # kernels of training (ops) and engine selection: "auto" or "reference"
    threads: Optional[int] = 1  # torch threads; 0: torch's default. README figures: 1 thread (tiny model, little to gain)
    plot: bool = True
    progress: bool = True
    eval_batch: int = 50
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Evaluation through the engine
# --------------------------------------------------------------------------------------------------
def evaluate(model, scorer, keep: Optional[int], samples: list, batch: int = 50, backend: str = "auto") -> dict:
    """Accuracy of the first answer token through ``AutoSelectEngine`` (hard top-K), and how often the
    token holding the answer is kept."""
    from ..engine import AutoSelectEngine, Request

    engine = AutoSelectEngine(model, scorer, keep=keep, score_cache_size=0, selection_backend="reference" if backend == "reference" else "auto")
    correct, target_kept, kept = 0, 0, []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        out = engine.prefill([Request(prompt=s.prompt_ids, pixel_values=s.sample.pixel_values) for s in chunk])
        pred = out.logits.argmax(-1).tolist()
        for s, p, k in zip(chunk, pred, out.kept_indices):
            correct += int(p == s.answer_id)
            target_kept += int(s.target_cell in set(k.tolist()))
            kept.append(k.cpu())
    n = len(samples)
    return {"accuracy": correct / n, "target_kept_rate": target_kept / n, "kept_indices": kept}


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------
def train_scorer(model, train_set, settings: ExperimentSettings, run_dir: str, *, gate: str = "vp", denoiser_attention: str = "identity") -> tuple[str, dict, float]:
    config = TrainConfig(
        output_dir=run_dir, keep=settings.keep, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
        warmup_steps=settings.warmup_steps, tau_start=settings.tau_start, tau_end=settings.tau_end,
        scorer_hidden_dim=settings.scorer_hidden_dim, scorer_layers=settings.scorer_layers, scorer_heads=settings.scorer_heads,
        denoiser_mlp_ratio=2.0, gate=gate, denoiser_attention=denoiser_attention, seed=settings.seed, save_every=0,
        progress=settings.progress, kernel_backend=settings.backend,
    )
    objective = build_objective(model, config)
    trainer = Trainer(objective, train_set, config)
    t0 = time.perf_counter()
    last = trainer.train()
    return os.path.join(run_dir, "scorer"), last, time.perf_counter() - t0


def run_experiment(settings: ExperimentSettings, log=print) -> dict:
    import shutil

    from ..models import get_adapter
    from ..modules import Scorer
    from ..timing import environment

    if settings.threads:
        torch.set_num_threads(settings.threads)
    t_start = time.perf_counter()
    name = f"training-experiment-{settings.tag}"
    work_dir = settings.work_dir or os.path.join(settings.out_dir, f"{name}-runs")
    if os.path.exists(os.path.join(work_dir, "vp-identity", "checkpoint.pt")):
        raise ValueError(f"{work_dir} holds runs of an earlier experiment; remove it or give another --work-dir")

    tokenizer = S.build_tokenizer()
    model = S.build_tiny_llava(tokenizer, seed=settings.seed)
    adapter = get_adapter(model)
    n_tokens = adapter.layout(None).num_tokens
    if settings.backend not in ("auto", "reference"):
        raise ValueError(f"backend must be 'auto' or 'reference', got {settings.backend!r}")
    if not 1 <= settings.keep <= n_tokens:
        raise ValueError(f"keep must satisfy 1 <= keep <= {n_tokens} (the tiny model's N), got {settings.keep}")
    processor = adapter.default_image_processor()
    log(f"[1/4] task: {settings.train_samples} training and {settings.test_samples} held-out samples, N = {n_tokens}, K = {settings.keep}")
    train = S.make_samples(settings.train_samples, settings.seed * 2 + 1, tokenizer, processor, distractors=settings.distractors)
    test = S.make_samples(settings.test_samples, settings.seed * 2 + 2, tokenizer, processor, distractors=settings.distractors)

    log(f"[2/4] pretraining the tiny LLaVA with every token ({settings.pretrain_steps} steps)")
    t0 = time.perf_counter()
    losses = S.pretrain_vlm(model, train, steps=settings.pretrain_steps, batch_size=settings.pretrain_batch,
                            lr=settings.pretrain_lr, seed=settings.seed, log=log if settings.progress else None)
    pretrain_s = time.perf_counter() - t0
    frozen = {k: v.clone() for k, v in model.state_dict().items()}

    train_set = SampleList([s.sample for s in train], [n_tokens] * len(train))
    runs = [("trained", "vp", "identity")]
    if settings.ablations:
        runs += [("ablation: scale gate", "scale", "identity"), ("ablation: global denoiser", "vp", "global")]
    trained = {}
    log(f"[3/4] training Scorer + Denoiser at K = {settings.keep} ({settings.steps} steps each, {len(runs)} run(s))")
    for label, gate, attention in runs:
        path, last, seconds = train_scorer(model, train_set, settings, os.path.join(work_dir, f"{gate}-{attention}"), gate=gate, denoiser_attention=attention)
        trained[label] = (Scorer.from_pretrained(path, expected_input_dim=adapter.feature_dim), last, seconds, gate, attention)
        log(f"  {label}: final loss {last['loss']:.4f}, α bimodality {last['alpha_bimodality']:.3f} ({seconds:.0f} s)")
    unchanged = all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())

    log("[4/4] answering held-out questions through AutoSelectEngine (hard top-K)")
    d = adapter.feature_dim
    methods: dict[str, dict] = {}
    methods["every token"] = evaluate(model, FeatureNormScorer(d), None, test, settings.eval_batch, settings.backend)
    for label, (scorer, last, seconds, gate, attention) in trained.items():
        methods[label] = evaluate(model, scorer, settings.keep, test, settings.eval_batch, settings.backend)
        methods[label].update(train_seconds=seconds, final_train_metrics=last, gate=gate, denoiser_attention=attention)
    methods["random K"] = evaluate(model, RandomScorer(d, seed=settings.seed), settings.keep, test, settings.eval_batch, settings.backend)
    methods["feature norm"] = evaluate(model, FeatureNormScorer(d), settings.keep, test, settings.eval_batch, settings.backend)
    for label, m in methods.items():
        log(f"  {label:28s} accuracy {m['accuracy']:.3f}   answer token kept {m['target_kept_rate']:.3f}")

    full, ours, rnd = methods["every token"]["accuracy"], methods["trained"]["accuracy"], methods["random K"]["accuracy"]
    result = {
        "experiment": "training-learning",
        "environment": environment(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
        "task": {"visual_tokens": n_tokens, "keep": settings.keep, "colours": list(S.COLOURS), "chance_accuracy": 1 / len(S.COLOURS),
                 "random_keeps_answer_token": settings.keep / n_tokens},
        "pretrain": {"seconds": pretrain_s, "final_loss": float(np.mean(losses[-20:]))},
        "frozen_vlm_bit_identical": unchanged,
        "methods": {k: {kk: vv for kk, vv in v.items() if kk != "kept_indices"} for k, v in methods.items()},
        "summary": {
            "every_token_accuracy": full, "trained_accuracy": ours, "random_accuracy": rnd,
            "trained_fraction_of_every_token": ours / full if full else None, "trained_minus_random_points": 100 * (ours - rnd),
            "goal_90_percent_of_every_token": bool(full and ours >= 0.9 * full), "goal_25_points_over_random": bool(100 * (ours - rnd) >= 25),
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    os.makedirs(settings.out_dir, exist_ok=True)
    json_path = os.path.join(settings.out_dir, f"{name}.json")
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=2)
    log(f"results: {json_path}")
    if settings.plot:
        png = os.path.join(settings.out_dir, f"{name}.png")
        plot(methods, test, settings.keep, png)
        log(f"plot: {png}")
    if settings.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


def plot(methods: dict, test: list, keep: int, path: str, images: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    drawn = [m for m in ("trained", "feature norm", "random K") if m in methods]
    fig = plt.figure(figsize=(3 * images, 3.2 + 2.6 * len(drawn)))
    grid = fig.add_gridspec(1 + len(drawn), images, height_ratios=[1.4] + [1] * len(drawn))
    ax = fig.add_subplot(grid[0, :])
    names = list(methods)
    acc = [100 * methods[n]["accuracy"] for n in names]
    kept = [100 * methods[n]["target_kept_rate"] for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, acc, 0.4, label="accuracy (%)", color="#3070b0")
    ax.bar(x + 0.2, kept, 0.4, label="answer token kept (%)", color="#a0c0e0")
    for xi, a in zip(x, acc):
        ax.text(xi - 0.2, a + 1, f"{a:.0f}", ha="center", fontsize=8)
    ax.axhline(100 / len(S.COLOURS), color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Held-out accuracy through AutoSelectEngine, K = {keep} of {S.GRID * S.GRID} tokens")
    for r, method in enumerate(drawn):
        for c in range(images):
            a = fig.add_subplot(grid[1 + r, c])
            a.imshow(test[c].image)
            for idx in methods[method]["kept_indices"][c].tolist():
                row, col = S.cell_of_token(idx)
                a.add_patch(patches.Rectangle((col * S.CELL - 0.5, row * S.CELL - 0.5), S.CELL, S.CELL, fill=False, ec="lime", lw=1.5))
            row, col = S.cell_of_token(test[c].target_cell)
            a.add_patch(patches.Rectangle((col * S.CELL - 0.5, row * S.CELL - 0.5), S.CELL, S.CELL, fill=False, ec="red", lw=1, ls="--"))
            a.set_xticks([]), a.set_yticks([])
            if c == 0:
                a.set_ylabel(method, fontsize=9)
    fig.text(0.5, 0.005, "green: kept tokens; red dashed: the token holding the answer", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autoselect_fast.training.experiment", description=__doc__.split("\n\n")[0])
    defaults = ExperimentSettings()
    for f in ExperimentSettings.__dataclass_fields__.values():
        if f.name in ("extra",):
            continue
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            kind = int if f.name == "threads" else (type(value) if value is not None else str)
            p.add_argument(flag, type=kind, default=value)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = ExperimentSettings(**vars(args))
    result = run_experiment(settings)
    s = result["summary"]
    print(f"every token {s['every_token_accuracy']:.3f} | trained {s['trained_accuracy']:.3f} "
          f"({100 * (s['trained_fraction_of_every_token'] or 0):.1f} % of every token) | random {s['random_accuracy']:.3f} "
          f"| trained - random = {s['trained_minus_random_points']:.1f} points | {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
