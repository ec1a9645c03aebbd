"""The benchmark report: TTFT breakdown, pruning overhead and FLOPs, full model against pruned budgets.

``autoselect-fast bench`` builds a preset (``autoselect_fast.presets``: real transformers classes,
random weights), then for the full model and every budget K runs the engine's prefill repeatedly after
warm-up and reports, per configuration:

* vision encoding, pruning module (Scorer + selection), glue (projector on the kept tokens, embeddings,
  positions, packing), LLM prefill and TTFT = their sum — medians over the repeats, with min-max;
* the pruning module timed on its own (``engine.prune`` without the score cache) as well as inside TTFT;
* FLOPs of the LLM prefill, counted with ``torch.utils.flop_counter``;
* speedups against the full model measured in the same run, and the FLOP ratio they can be held to.

Everything lands in a JSON file (device, library versions, dtype, shapes, every figure) and a PNG plot
of TTFT and prefill against K. Timing on CUDA synchronises around each stage (the engine's stopwatch)
or uses CUDA events (``timing.measure``). Random weights are fine for timing: pruning changes which
tokens reach the LLM, not how long a token takes.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .engine import AutoSelectEngine, Request
from .modules import Scorer
from .presets import Preset, build_model, get_preset
from .progress import heartbeat
from .timing import environment, measure

STAGES = ("vision", "prune", "pack", "prefill", "total")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ReportSettings:
    preset: str = "default"
    keeps: Sequence[int] = ()  # budgets to time; empty: the preset's defaults
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: Optional[str] = None  # default: the preset's
    batch: int = 1
    warmup: int = 2
    repeats: int = 5
    out_dir: str = "bench/out"
    plot: bool = True
    progress: bool = True


def synthetic_image(height: int, width: int, seed: int):
    """A deterministic picture made in code: colour gradients with a few shapes, as a Pillow image."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, height, width, generator=gen) * 55
    image = Image.fromarray(rgb.permute(1, 2, 0).to(torch.uint8).numpy())
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x0, y0 = int(width * (0.1 + 0.2 * i)), int(height * (0.15 + 0.15 * i))
        draw.ellipse((x0, y0, x0 + width // 6, y0 + height // 6), fill=(255 - 50 * i, 40 * i, 120))
    return image


def synthetic_requests(engine: AutoSelectEngine, preset: Preset, batch: int) -> list[Request]:
    """``batch`` requests of the preset's prompt shape, processed by the model's real image processor."""
    vocab = engine.adapter.language_model.config.vocab_size
    image_token = engine.adapter.image_token_id
    processor = engine.adapter.default_image_processor()
    requests = []
    for i in range(batch):
        gen = torch.Generator().manual_seed(1000 + i)
        words = torch.randint(3, min(vocab, image_token) - 1, (preset.text_before - 1 + preset.text_after,), generator=gen).tolist()
        prompt = [1] + words[: preset.text_before - 1] + [image_token] + words[preset.text_before - 1 :]
        pixel_values, size = engine.adapter.process_image(synthetic_image(*preset.image_size, seed=i), processor)
        requests.append(Request(prompt, pixel_values=pixel_values, image_sizes=size))
    return requests


def _median_range(values: list[float]) -> dict:
    return {"median_ms": statistics.median(values), "min_ms": min(values), "max_ms": max(values)}


def _prefill_flops(engine: AutoSelectEngine, requests: list[Request]) -> int:
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    pruned = engine.prune(features, batch.budgets, positions=batch.token_positions)
    packed = engine.pack(batch, pruned)
    with FlopCounterMode(display=False) as counter:
        engine.prefill_packed(packed)
    return counter.get_total_flops()


def _bench_config(engine, requests, settings, bar) -> dict:
    for _ in range(settings.warmup):
        engine.prefill(requests)
        bar.update(1)
    runs = []
    for _ in range(settings.repeats):
        runs.append(engine.prefill(requests))
        bar.update(1)
    out = runs[-1]
    result = {
        "keep": engine.keep,
        "visual_tokens": out.visual_tokens,
        "kept_tokens": out.kept_tokens,
        "sequence_lengths": out.sequence_lengths,
        "stages": {stage: _median_range([run.timings_ms[stage] for run in runs]) for stage in STAGES},
        "prefill_flops": _prefill_flops(engine, requests),
    }
    if engine.keep is not None:
        batch = engine.prepare(requests)
        features = engine.encode_images(batch.pixel_values, batch.image_sizes)
        alone = measure(
            lambda: engine.prune(features, batch.budgets, positions=batch.token_positions),
            device=engine.device, warmup=settings.warmup, repeats=max(settings.repeats, 10),
        )
        result["pruning_module_alone"] = alone.as_dict()
    return result


def run_report(settings: ReportSettings) -> dict:
    """Build the preset, benchmark every configuration, print the table, write JSON and PNG."""
    preset = get_preset(settings.preset)
    dtype_name = settings.dtype or preset.default_dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    dtype, device = DTYPES[dtype_name], torch.device(settings.device)
    if settings.batch < 1 or settings.repeats < 1 or settings.warmup < 0:
        raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got batch={settings.batch}, repeats={settings.repeats}, warmup={settings.warmup}")
    keeps = sorted(set(settings.keeps or preset.default_keeps), reverse=True)

    say = print if settings.progress else (lambda *a, **k: None)
    say(f"[1/3] building preset {preset.name!r} on {device} in {dtype_name}: {preset.description}")
    torch.manual_seed(0)
    with heartbeat("building the model with random weights", enabled=settings.progress):
        model = build_model(preset, device, dtype)
    engine = AutoSelectEngine(model, _scorer_for(preset, model, device, dtype), keep=None, score_cache_size=0)
    requests = synthetic_requests(engine, preset, settings.batch)
    n_tokens = engine.prepare(requests).layouts[0].num_tokens
    keeps = [k for k in keeps if k < n_tokens]

    say(f"[2/3] timing full model and K in {keeps}: {settings.warmup} warm-up + {settings.repeats} timed prefills each")
    configs = [None, *keeps]
    results = []
    with tqdm(total=len(configs) * (settings.warmup + settings.repeats), desc="prefills", disable=not settings.progress, leave=False) as bar:
        for keep in configs:
            engine = AutoSelectEngine(model, engine.scorer, keep=keep, score_cache_size=0)
            bar.set_postfix_str("full" if keep is None else f"K={keep}")
            with torch.inference_mode():
                results.append(_bench_config(engine, requests, settings, bar))

    full = results[0]
    for r in results:
        r["speedup"] = {
            "prefill": full["stages"]["prefill"]["median_ms"] / r["stages"]["prefill"]["median_ms"],
            "ttft": full["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"],
            "flops_ratio": full["prefill_flops"] / r["prefill_flops"],
        }
        r["pruning_share_of_ttft"] = r["stages"]["prune"]["median_ms"] / r["stages"]["total"]["median_ms"] if r["keep"] else 0.0

    report = {
        "benchmark": "ttft_report",
        "preset": preset.name,
        "description": preset.description,
        "environment": environment(device),
        "dtype": dtype_name,
        "batch": settings.batch,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "shapes": {
            "image_size": list(preset.image_size),
            "visual_tokens_per_image": n_tokens,
            "text_tokens_per_request": preset.text_before + preset.text_after,
            "scorer": vars(engine.scorer.config),
        },
        "backends": {"selection": engine.selection_backend, "attention": engine.attention_backend, "packer": engine.packer_backend},
        "results": results,
    }
    say("[3/3] results")
    print(format_table(report))
    os.makedirs(settings.out_dir, exist_ok=True)
    stem = os.path.join(settings.out_dir, f"report-{preset.name}-{device.type}")
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"JSON: {stem}.json")
    if settings.plot:
        plot_report(report, stem + ".png")
        print(f"plot: {stem}.png")
    return report


def _scorer_for(preset: Preset, model, device, dtype) -> Scorer:
    from .models import get_adapter

    return Scorer(preset.scorer(get_adapter(model).feature_dim)).to(device=device, dtype=dtype).eval()


def format_table(report: dict) -> str:
    """The human-readable table: one row per configuration, medians with [min-max]."""
    env = report["environment"]
    lines = [
        f"{report['preset']} | {env['device']} | {report['dtype']} | batch {report['batch']} | "
        f"N = {report['shapes']['visual_tokens_per_image']} | median of {report['repeats']} [min-max], ms",
        f"{'config':>8} {'seq':>5} {'vision':>17} {'pruning':>17} {'glue':>9} {'LLM prefill':>19} {'TTFT':>19} {'GFLOPs':>8} {'prefill x':>9} {'TTFT x':>7} {'FLOP x':>7}",
    ]

    def cell(stage: dict, width: int) -> str:
        return f"{stage['median_ms']:.2f} [{stage['min_ms']:.1f}-{stage['max_ms']:.1f}]".rjust(width)

    for r in report["results"]:
        s = r["stages"]
        name = "full" if r["keep"] is None else f"K={r['keep']}"
        lines.append(
            f"{name:>8} {max(r['sequence_lengths']):>5} {cell(s['vision'], 17)} {cell(s['prune'], 17)} {s['pack']['median_ms']:>9.2f} "
            f"{cell(s['prefill'], 19)} {cell(s['total'], 19)} {r['prefill_flops'] / 1e9:>8.3g} "
            f"{r['speedup']['prefill']:>9.2f} {r['speedup']['ttft']:>7.2f} {r['speedup']['flops_ratio']:>7.2f}"
        )
    for r in report["results"]:
        if r["keep"] is not None:
            lines.append(
                f"pruning module at K={r['keep']}: {r['pruning_module_alone']['median_ms']:.3f} ms timed alone, "
                f"{r['stages']['prune']['median_ms']:.3f} ms inside TTFT = {100 * r['pruning_share_of_ttft']:.2f} % of TTFT"
            )
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [r for r in report["results"] if r["keep"] is not None]
    full = report["results"][0]
    ks = [r["keep"] for r in pruned]
    fig, ax = plt.subplots(figsize=(6, 4))
    for stage, label, colour in (("total", "TTFT", "tab:blue"), ("prefill", "LLM prefill", "tab:orange")):
        ax.plot(ks, [r["stages"][stage]["median_ms"] for r in pruned], "o-", color=colour, label=f"{label}, pruned")
        ax.axhline(full["stages"][stage]["median_ms"], color=colour, linestyle="--", label=f"{label}, all {report['shapes']['visual_tokens_per_image']} tokens")
    ax.set_xlabel("visual tokens kept (K)")
    ax.set_ylabel("ms (median)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['preset']} on {report['environment']['device']}, {report['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
