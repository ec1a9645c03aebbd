"""Checks the command line runs before any model is built, and the estimates behind them.

This module owns what can be known about a run without allocating a model: whether a device exists,
how many visual tokens a model makes of an image (from a model skeleton on the ``meta`` device, no
memory used), which budgets K are allowed, and a rough CPU time estimate for the benchmark report.
Every check raises :class:`UsageError` with a one-line message that names the argument, the value and
what is allowed; ``autoselect_fast.cli`` turns it into ``autoselect-fast <command>: error: ...`` and
exit status 2.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch
from torch import nn

# Above this much work on a CPU, `autoselect-fast bench` asks for --force. The rule counts FLOPs, not
# measured seconds, so a busy machine does not turn a CPU-sized preset into a refusal. With the default
# settings (every scenario, both contenders per K): `default` about 46 TFLOPs per run, `llava-next-cpu` 21,
# `qwen2.5-vl-cpu` 19; the full-size presets 1,897 (LLaVA-1.5-7B), 7,401 (LLaVA-NeXT-7B) and 4,378
# (Qwen2.5-VL-7B with its 16-request serving batch).
CPU_FORCE_THRESHOLD_FLOPS = 200e12


class UsageError(ValueError):
    """A bad command-line argument, found before any expensive work started."""


# --------------------------------------------------------------------------------------------------
# Devices and budgets
# --------------------------------------------------------------------------------------------------
def output_directory(flag: str, value: str, directory: str) -> None:
    """Create ``directory`` (where ``flag value`` writes) now and check it is writable, so a bad path
    fails in one line before the run rather than with a traceback after it."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {value}: cannot create directory {directory} ({exc.strerror or exc})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: directory {directory} is not writable")


def parse_device(value: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` that exists in this torch build on this machine.

    The messages leave out the flag's name: argparse prefixes ``argument --device:``."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{value!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{value!r}: allowed: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"{value}: this torch ({torch.__version__}) is a CPU-only build; use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError(f"{value}: torch {torch.__version__} sees no GPU on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{value}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return device


def check_budgets(keeps: Sequence[int], num_tokens: int, *, what: str, allow_all: bool) -> None:
    """Every K must be an int in 1..N (``allow_all``) or 1..N-1 (K = N is the full model)."""
    upper = num_tokens if allow_all else num_tokens - 1
    for k in keeps:
        if not 1 <= k <= upper:
            allowed = f"1 <= K <= {upper}" + ("" if allow_all else f" (K = {num_tokens} is the full model, which the report always includes)")
            raise UsageError(f"--keep {k}: {what} has N = {num_tokens} visual tokens; allowed: {allowed}")


# --------------------------------------------------------------------------------------------------
# Model skeletons: shapes without weights
# --------------------------------------------------------------------------------------------------
def meta_model(model_class, config) -> nn.Module:
    """The model built on the ``meta`` device: every shape and submodule, no memory, no weights."""
    with torch.device("meta"):
        return model_class(config)


def visual_tokens_of_image(adapter, image, image_processor) -> int:
    """N: visual tokens the adapter's model makes of a Pillow ``image`` (host-side processing only)."""
    _, size = adapter.process_image(image, image_processor)
    return adapter.layout(size).num_tokens


def preset_skeleton(preset):
    """The adapter of a report preset's model built on the ``meta`` device."""
    from transformers import AutoModelForImageTextToText

    from .models import get_adapter

    with torch.device("meta"):
        return get_adapter(AutoModelForImageTextToText.from_config(preset.build_config()))


def preset_visual_tokens(preset, skeleton=None) -> int:
    """N of a report preset's benchmark image, from the preset's model skeleton."""
    from .report.workloads import synthetic_image

    adapter = skeleton if skeleton is not None else preset_skeleton(preset)
    return visual_tokens_of_image(adapter, synthetic_image(*preset.image_size, seed=0), adapter.default_image_processor())


# --------------------------------------------------------------------------------------------------
# CPU time estimate of the benchmark report
# --------------------------------------------------------------------------------------------------
def matmul_flops_per_second(dtype: torch.dtype, rows: int = 256, width: int = 1024, repeats: int = 3) -> float:
    """This CPU's throughput in ``dtype`` on a linear-layer-shaped matmul (well under a second to measure;
    fp16 matmuls are very slow on most CPUs, which this captures)."""
    a = torch.randn(rows, width).to(dtype)
    b = torch.randn(width, width).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):  # the first call is a warm-up unless it alone is slow
        t0 = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - t0
        if i > 0 or elapsed > 0.25:
            best = min(best, elapsed)
        if elapsed > 0.25:
            break
    return 2 * rows * width * width / max(best, 1e-9)


def estimate_report_seconds(preset, keeps: Sequence[int], *, dtype: torch.dtype, batch: int, warmup: int, repeats: int,
                            flops_per_second: Optional[float] = None, skeleton=None, serving_batch: Optional[int] = None,
                            mixed_batch: int = 0, mixed_text: Sequence[int] = (0, 0), decode_batches: Sequence[int] = (),
                            decode_tokens: int = 0) -> tuple[float, float]:
    """``(seconds, total FLOPs)``: a rough CPU run time of ``autoselect-fast bench`` for ``preset``.

    Every prefill costs about 2 FLOPs per parameter per token (LLM over text + kept tokens, vision
    tower over every image patch), and so does every decoded token. The configurations are those the
    report times (``report.scenarios``, ``report.decode``): ``single`` (transformers, engine and peers
    with every token; engine and peers at each K), ``mixed`` (``mixed_batch`` requests of ``mixed_text``
    text tokens: two full-model rows, engine and peers at the smallest K), ``serving`` (its full-model
    rows and keep ratios over its own images) and each ``decode`` batch (``generate`` of one and of
    ``decode_tokens`` tokens, per decoder). Each runs ``warmup + repeats`` rounds, the prefill
    scenarios one more for the FLOP count. Real layers run slower than a bare matmul, so this is a
    lower bound more than an upper one.
    """
    from .report.contenders import vision_tower

    adapter = skeleton if skeleton is not None else preset_skeleton(preset)
    vision_params = sum(p.numel() for p in vision_tower(adapter).parameters())
    llm_params = sum(p.numel() for p in adapter.language_model.parameters()) + sum(p.numel() for p in adapter.lm_head.parameters())
    n = preset_visual_tokens(preset, adapter)
    vision_cfg = adapter.config.vision_config
    merge = getattr(adapter, "merge", None)  # native resolution (Qwen2.5-VL): one token per merge² patches
    if merge is not None:
        patches, tiles = n * merge**2, 1
    else:
        patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + 1
        tiles = max(1, round(n / (patches - 1)))  # LLaVA-NeXT: base tile + crops
    text = preset.text_before + preset.text_after

    def prefill(requests: int, text_tokens: float, kept: int) -> float:  # one prefill of `requests` preset images
        return 2 * (llm_params * (text_tokens + kept) + vision_params * patches * tiles * requests)

    per_round = [prefill(batch, text * batch, n * batch)] * 3  # single: transformers, engine, peers, every token
    per_round += [prefill(batch, text * batch, k * batch) for k in keeps for _ in ("engine", "peers")]
    if mixed_batch:
        mixed = mixed_batch * sum(mixed_text) / 2
        per_round += [prefill(mixed_batch, mixed, n * mixed_batch)] * 2
        if keeps:
            per_round += [prefill(mixed_batch, mixed, min(keeps) * mixed_batch)] * 2
    serving = preset.serving_batch if serving_batch is None else serving_batch
    if serving:
        from .report.workloads import SERVING_RATIOS, SERVING_TEXT, serving_visual_tokens

        tokens = serving_visual_tokens(adapter, preset, serving)
        text_total = serving * sum(SERVING_TEXT) / 2
        vision = vision_params * sum(tokens) * (merge or 1) ** 2
        for kept in [tokens, tokens] + [[max(1, round(r * t)) for t in tokens] for r in SERVING_RATIOS]:
            per_round.append(2 * (llm_params * (text_total + sum(kept)) + vision))
    flops = sum(per_round) * (warmup + repeats + 1)
    for b in decode_batches:  # per decoder and round: generate(1) and generate(decode_tokens), two prefills
        kept = [n] * 2 + ([min(keeps)] if keeps else [])
        flops += sum(2 * prefill(b, text * b, k * b) + 2 * llm_params * b * max(decode_tokens - 1, 0) for k in kept) * (warmup + repeats)
    rate = flops_per_second if flops_per_second is not None else matmul_flops_per_second(dtype)
    return flops / rate, flops


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
