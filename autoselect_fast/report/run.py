"""One report run: validate the settings, build the preset, time every scenario, write the files."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..progress import heartbeat
from ..timing import NOISE_MAX_OVER_MIN, environment
from .contenders import BenchSetup
from .decode import run_decode
from .graphed import GRAPHED_DESCRIPTION
from .render import format_markdown, format_report, plot_report, report_summary, report_warnings
from .scenarios import build_scenarios, pruning_module_alone, run_scenario
from .settings import ReportPlan, ReportSettings


def report_stem(preset: str, device: torch.device, dtype_name: str, batch: int, mixed_batch: int, serving_batch: int = 0,
                decode_batches=(), keeps=None) -> str:
    """File name stem: preset, device, dtype, batch scenarios and budgets given with ``--keep`` (``keeps``;
    None: the preset's), so different runs do not overwrite each other."""
    return (f"report-{preset}-{device.type}-{dtype_name}-b{batch}" + (f"-mixed{mixed_batch}" if mixed_batch else "")
            + (f"-serving{serving_batch}" if serving_batch else "") + "".join(f"-decode{b}" for b in decode_batches)
            + ("-k" + "-".join(map(str, keeps)) if keeps else ""))


def run_report(settings: ReportSettings, plan: Optional[ReportPlan] = None) -> dict:
    """Build the preset, time every scenario, print the tables, write JSON, markdown and PNG.

    ``plan``: what ``settings.validate()`` returned, when the caller has validated them already.
    """
    plan = settings.validate() if plan is None else plan
    preset, device = plan.preset, plan.device
    say = print if settings.progress else (lambda *a, **k: None)
    say(f"[1/3] building preset {preset.name!r} on {device} in {plan.dtype_name}: {preset.description}")
    with heartbeat("building the model with random weights", enabled=settings.progress):
        setup = BenchSetup.build(preset, device, plan.dtype)
    scenarios = build_scenarios(setup, settings, plan)

    rounds = settings.warmup + settings.repeats
    runs = sum(len(s.configs) for s in scenarios) * rounds + len(plan.decode_batches) * (3 if plan.keeps else 2) * rounds
    say(f"[2/3] timing {runs} prefills and generate pairs, contenders interleaved: {settings.warmup} warm-up + "
        f"{settings.repeats} timed rounds per scenario")
    with tqdm(total=runs, desc="runs", disable=not settings.progress, leave=False) as bar:
        results = [run_scenario(setup, scenario, settings, bar) for scenario in scenarios]
        decode = [run_decode(setup, b, plan.keeps, settings, bar) for b in plan.decode_batches]
    pruning_alone = pruning_module_alone(setup, scenarios[0].requests, plan.keeps, settings)

    engine = setup.engine
    report = {
        "benchmark": "ttft_report",
        "preset": preset.name,
        "description": preset.description,
        "environment": environment(device),
        "dtype": plan.dtype_name,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "settings": {"batch": settings.batch, "keeps": plan.keeps, "mixed_batch": plan.mixed_batch, "mixed_text": list(settings.mixed_text),
                     "serving_batch": plan.serving_batch, "serving_ratios": list(settings.serving_ratios),
                     "decode_batches": list(plan.decode_batches), "decode_tokens": settings.decode_tokens,
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "baseline": (f"transformers: unmodified {type(setup.model).__name__}.forward (attn_implementation="
                     f"{setup.model.config._attn_implementation}, its own left-padded batch, logits_to_keep=1, no KV cache)"),
        "graphed_baseline": GRAPHED_DESCRIPTION,
        "shapes": {
            "image_size": list(preset.image_size),
            "visual_tokens_per_image": plan.visual_tokens,
            "text_tokens_per_request": preset.text_before + preset.text_after,
            "scorer": vars(setup.scorer.config),
        },
        "backends": {"selection": engine.selection_backend, "attention": engine.attention_backend, "packer": engine.packer_backend},
        "scenarios": results,
        "decode": decode,
        "pruning_module_alone": pruning_alone,
        "noise_threshold_max_over_min": NOISE_MAX_OVER_MIN,
    }
    report["summary"] = report_summary(report)
    report["warnings"] = report_warnings(report)
    say("[3/3] results")
    print(format_report(report))
    os.makedirs(settings.out_dir, exist_ok=True)
    stem = os.path.join(settings.out_dir, report_stem(preset.name, device, plan.dtype_name, settings.batch, plan.mixed_batch,
                                                      plan.serving_batch, plan.decode_batches, settings.keeps))
    with open(stem + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    with open(stem + ".md", "w") as fh:
        fh.write(format_markdown(report))
    print(f"JSON: {stem}.json\nmarkdown tables: {stem}.md")
    if settings.plot:
        plot_report(report, stem + ".png")
        print(f"plot: {stem}.png")
    return report
