"""The report's scenarios and how each is timed.

A scenario is a list of ``(contender name, keep)`` configurations over one list of requests; the first
configuration is its baseline, the second ``transformers + CUDA graph`` (the stronger baseline, CUDA
only). ``single``: ``batch`` requests of the preset's prompt shape, the full model and every budget K.
``mixed``: requests whose prompts hold different numbers of text tokens, at the smallest K (what
packing buys over padding). ``serving`` (native-resolution presets, Qwen2.5-VL): images of different
resolutions, so different N_i, and prompts of different lengths, at keep ratios.

:func:`run_scenario` times the configurations interleaved (one prefill of each per round, so every
contender sees the same machine state; the order turns each round, so none always runs first), records
which of the engine runner's stages replayed graphs and which ran eagerly, then computes ratios against the baseline (and the engine's
TTFT against ``transformers + CUDA graph`` and the peers where they ran) and flags a speedup above the
FLOP ratio as suspect and a wide spread as noisy. A contender that cannot run here
(:class:`~.contenders.ContenderUnavailable`) is left out, with its reason under ``absent``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..engine import Request
from ..timing import is_noisy, summarize, turning_order
from .contenders import CONTENDERS, STAGES, BenchSetup, Contender, ContenderUnavailable, Keep
from .graphed import GRAPHED, GRAPHS_NEED_CUDA
from .profile import kernel_profile
from .pruning import pruning_calls, time_pruning_module
from .render import keep_label
from .settings import ReportPlan, ReportSettings
from .workloads import (
    SERVING_RATIOS,
    SERVING_TEXT,
    mixed_text_lengths,
    request_text_tokens,
    request_visual_tokens,
    serving_requests,
    synthetic_requests,
)

# A speedup more than this factor above the FLOP ratio is flagged: less work cannot explain it.
SUSPECT_MARGIN = 1.05


@dataclass
class Scenario:
    name: str
    description: str
    requests: list[Request]
    configs: list[tuple[str, Keep]]  # (contender, keep); the first is the baseline
    text_tokens: list[int]  # per request, its prompt's text tokens
    visual_tokens: list[int]  # per request, N of its image(s) before pruning
    absent: dict[str, str] = field(default_factory=dict)  # contenders left out on this device -> why

    @classmethod
    def of(cls, setup: BenchSetup, name: str, description: str, requests: list[Request], configs: list[tuple[str, Keep]]) -> "Scenario":
        """A scenario with its requests' token counts taken from the setup's engine; after the baseline
        ``transformers + CUDA graph`` on CUDA, and elsewhere the reason it is absent."""
        engine = setup.engine
        absent = {}
        if setup.device.type == "cuda":
            configs = configs[:1] + [(GRAPHED, None)] + configs[1:]
        else:
            absent[GRAPHED] = GRAPHS_NEED_CUDA.format(device=setup.device.type)
        return cls(name, description, requests, configs, [request_text_tokens(engine, r) for r in requests],
                   request_visual_tokens(engine, requests), absent)


def run_scenario(setup: BenchSetup, scenario: Scenario, settings: ReportSettings, bar,
                 contenders: Optional[dict[str, Callable[..., Contender]]] = None) -> dict:
    """Time every configuration interleaved (one run of each per round), then compute ratios to the baseline.

    ``contenders``: the contender builders by name (default :data:`~.contenders.CONTENDERS`).
    """
    builders = CONTENDERS if contenders is None else contenders
    runs, absent = [], dict(scenario.absent)
    for name, keep in scenario.configs:
        try:
            runs.append(builders[name](setup, scenario.requests, keep))
        except ContenderUnavailable as exc:
            absent[name] = str(exc)
            if getattr(bar, "total", None) is not None:  # its rounds will not run
                bar.total -= settings.warmup + settings.repeats
    samples: list[dict[str, list[float]]] = [{stage: [] for stage in STAGES} for _ in runs]
    for round_ in range(settings.warmup + settings.repeats):
        if round_ == settings.warmup:  # the runners' counts cover the timed rounds only (captures happen while warming up)
            for c in runs:
                if c.runner is not None:
                    c.runner.reset_stats()
        for i in turning_order(len(runs), round_):
            c, store = runs[i], samples[i]
            bar.set_postfix_str(f"{scenario.name}: {c.name} {keep_label(c.keep)}")
            with torch.inference_mode():
                ms, _ = c.run()
            if round_ >= settings.warmup:
                for stage in STAGES:
                    store[stage].append(ms[stage])
            bar.update(1)
    rows = []
    for c, store in zip(runs, samples):
        stages = {stage: summarize(store[stage]) for stage in STAGES}
        rows.append({
            "contender": c.name,
            "keep": c.keep,
            "sequence_lengths": c.sequence_lengths,
            "llm_tokens": c.llm_tokens,
            "stages": stages,
            **runner_paths(c),  # before flops() and the profile, whose calls would add to the counts
            "prefill_flops": c.flops(),
            "gpu": kernel_profile(c.run, torch.device(settings.device), stages["total"]["median_ms"]),
        })
    base = rows[0]
    graphed = next((p for p in rows if p["contender"] == GRAPHED), None)
    for r in rows:
        r["speedup"] = {
            "ttft": base["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"],
            "prefill": base["stages"]["prefill"]["median_ms"] / r["stages"]["prefill"]["median_ms"],
            "flops_ratio": base["prefill_flops"] / r["prefill_flops"],
        }
        limit = r["speedup"]["flops_ratio"] * SUSPECT_MARGIN
        r["suspect"] = [k for k in ("ttft", "prefill") if r["speedup"][k] > limit]
        r["noisy"] = [stage for stage in ("prefill", "total") if is_noisy(r["stages"][stage])]
        peers = next((p for p in rows if p["contender"] == "peers" and p["keep"] == r["keep"]), None)
        if r["contender"] == "engine" and peers is not None:
            r["ttft_speedup_vs_peers"] = peers["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"]
        if r["contender"] == "engine" and graphed is not None:
            r["ttft_speedup_vs_graphed"] = graphed["stages"]["total"]["median_ms"] / r["stages"]["total"]["median_ms"]
    return {
        "name": scenario.name,
        "description": scenario.description,
        "batch": len(scenario.requests),
        "text_tokens": scenario.text_tokens,
        "visual_tokens": scenario.visual_tokens,
        "baseline": base["contender"],
        "rows": rows,
        "absent": absent,
    }


def runner_paths(contender: Contender) -> dict:
    """The runner's mode and, per stage, its graph replays, captures, padded and eager runs over the timed
    rounds; ``eager_stages`` names the stages that ran eagerly although the runner replays graphs (a
    batch above the largest bucket, images of different N, ...), so a GPU number never hides that."""
    runner = contender.runner
    if runner is None:
        return {}
    stats = runner.stats_dict()
    eager = {stage: s["eager"] for stage, s in stats.items() if s["eager"]} if runner.mode == "graphs" else {}
    return {"runner": {"mode": runner.mode, "stages": stats}, "eager_stages": eager}


def build_scenarios(setup: BenchSetup, settings: ReportSettings, plan: ReportPlan) -> list[Scenario]:
    """``single``, then ``mixed`` and ``serving`` unless their batch is 0."""
    preset, keeps = setup.preset, plan.keeps
    configs = [("transformers", None), ("engine", None), ("peers", None)]
    configs += [(name, k) for k in keeps for name in ("engine", "peers")]
    scenarios = [Scenario.of(
        setup, "single", f"batch {settings.batch}, {preset.text_before + preset.text_after} text tokens per prompt; full model and every K",
        synthetic_requests(setup.engine, preset, settings.batch), configs,
    )]
    if plan.mixed_batch:
        low, high = settings.mixed_text
        lengths = mixed_text_lengths(plan.mixed_batch, low, high)
        k = min(keeps) if keeps else None
        configs = [("transformers", None), ("engine", None)] + ([("engine", k), ("peers", k)] if k is not None else [])
        scenarios.append(Scenario.of(
            setup, "mixed", f"batch {plan.mixed_batch}, prompts of {low}-{high} text tokens ({', '.join(map(str, lengths))}); K = {k}",
            synthetic_requests(setup.engine, preset, plan.mixed_batch, lengths), configs,
        ))
    if plan.serving_batch:
        scenarios.append(serving_scenario(setup, plan.serving_batch, settings.serving_ratios))
    return scenarios


def serving_scenario(setup: BenchSetup, batch: int, ratios: Sequence[float] = SERVING_RATIOS) -> Scenario:
    """``batch`` requests of mixed image sizes and prompt lengths: (a) transformers' padded batch (and the
    same with CUDA graphs), (b) the engine with every token, (c) the engine at each keep ratio."""
    requests = serving_requests(setup.engine, setup.preset, batch)
    configs = [("transformers", None), ("engine", None)] + [("engine", float(r)) for r in ratios]
    scenario = Scenario.of(setup, "serving", "", requests, configs)
    low, high = SERVING_TEXT
    n = scenario.visual_tokens
    scenario.description = (f"batch {batch}, images of N = {min(n)}-{max(n)} tokens, prompts of {low}-{high} text tokens; keep ratios "
                            + ", ".join(f"{r:.3f}" for r in ratios))
    return scenario


def pruning_module_alone(setup: BenchSetup, requests: list[Request], keeps: list[int], settings: ReportSettings) -> list[dict]:
    """Scorer + selection timed on its own (no score cache) at every K, on the single scenario's images."""
    engine = setup.engine
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    out = []
    for k in keeps:
        calls = pruning_calls(setup.scorer, features, [k] * len(features), positions=batch.token_positions)
        timed = time_pruning_module({"pruning_module": calls["pruning_module"]}, device=setup.device,
                                    warmup=settings.warmup, repeats=max(settings.repeats, 10))
        out.append({"keep": k, **timed.pop("pruning_module"), **timed})
    return out
