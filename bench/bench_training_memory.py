"""Peak GPU memory of one training step: fused kernels (Triton Soft Top-K + VP gate, noise regenerated in
the backward) against the reference path (float64 Soft Top-K, VP gate with a stored noise tensor).

Needs a CUDA GPU (it stops with a message otherwise: the quantity is GPU memory; ``--cpu-check
--preset tiny`` runs both paths on CPU without memory figures, to check the script). Usage::

    python bench/bench_training_memory.py --preset llava-1.5-7b --batch 8 --keep 64 \
        --out bench/results/training-memory-<gpu>.json

Both paths run the same step (same model, Scorer, Denoiser, batch and seed) in one process, each
after ``torch.cuda.reset_peak_memory_stats``; reported are the peak allocated bytes during forward +
backward, their difference, and the step time (median of ``--repeats`` after one warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llava-1.5-7b", help="model preset of autoselect_fast.presets (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out/training-memory.json")
    p.add_argument("--cpu-check", action="store_true", help="run both paths on CPU (no memory figures): checks this script only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_check:
        print("bench_training_memory: no CUDA device: peak GPU memory cannot be measured on this machine", file=sys.stderr)
        return 2

    from autoselect_fast.models import get_adapter
    from autoselect_fast.presets import build_model, get_preset
    from autoselect_fast.timing import environment
    from autoselect_fast.training import TrainConfig, build_objective, collate
    from autoselect_fast.training.data import Sample

    device = torch.device("cpu" if args.cpu_check else "cuda")
    cuda = device.type == "cuda"
    if args.cpu_check:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    preset = get_preset(args.preset)
    model = build_model(preset, device, dtype)
    adapter = get_adapter(model)
    h, w = preset.image_size
    from PIL import Image

    image = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy()

    pixel_values, size = adapter.process_image(Image.fromarray(image), adapter.default_image_processor())
    token = adapter.image_token_id
    ids = torch.tensor([1] * preset.text_before + [token] + [2] * preset.text_after)
    labels = torch.full_like(ids, -100)
    labels[-8:] = ids[-8:]
    samples = [Sample(ids, labels, pixel_values, size) for _ in range(args.batch)]
    batch = collate(samples, list(range(args.batch)))

    results = {}
    for backend in ("triton", "reference"):
        config = TrainConfig(keep=args.keep, kernel_backend=backend, scorer_hidden_dim=preset.scorer(adapter.feature_dim).hidden_dim,
                             scorer_heads=preset.scorer(adapter.feature_dim).num_heads, progress=False)
        objective = build_objective(model, config).to(dtype)
        times, peaks = [], []
        for r in range(args.repeats + 1):
            objective.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and dtype == torch.bfloat16):
                out = objective(batch, tau=1.0, step=r, seed=0, normalizer=float(max(1, (labels != -100).sum() * args.batch)))
            out.loss.backward()
            if cuda:
                torch.cuda.synchronize()
            if r:  # the first repeat warms up (kernel compilation, allocator)
                times.append((time.perf_counter() - t0) * 1e3)
                peaks.append(torch.cuda.max_memory_allocated() - base if cuda else None)
        results[backend] = {"peak_step_bytes": max(peaks) if cuda else None, "step_ms_median": statistics.median(times)}
        del objective
        if cuda:
            torch.cuda.empty_cache()
    result = {
        "benchmark": "training_step_peak_memory",
        "environment": environment(device),
        "preset": args.preset, "batch": args.batch, "keep": args.keep, "dtype": args.dtype,
        "visual_tokens": adapter.layout(size).num_tokens, "feature_dim": adapter.feature_dim,
        "fused": results["triton"], "reference": results["reference"],
        "saved_bytes": results["reference"]["peak_step_bytes"] - results["triton"]["peak_step_bytes"] if cuda else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("fused", "reference", "saved_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
