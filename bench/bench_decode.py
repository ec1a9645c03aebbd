"""Decode throughput of the engine (pruned prefill, then batched decoding) on a preset, random weights.

    python bench/bench_decode.py [--preset default] [--device cpu] [--batches 1 8] [--new-tokens 32]
                                 [--keep 64] [--repeats 3] [--baseline] [--out bench/out/decode.json]

Decode tokens/s of a batch of B requests (each its own random image and prompt length; no stop token,
so every request runs to ``--new-tokens``) is measured as ``B * (N - 1) / (t(N) - t(1))``: ``t(n)`` is
the median wall time of ``engine.generate(..., max_new_tokens=n)``, so the prefill and the first token
cancel out and what remains is the N - 1 decode steps with everything around them (sampling, stop
checks, read-backs). On a CPU the same is also computed from the process's CPU time
(``decode_tokens_per_cpu_s``; run with ``OMP_NUM_THREADS=1``), which is steadier than wall time on a
machine shared with other work. ``--baseline`` adds the unmodified model's ``generate`` on the same requests
(every visual token, a left-padded batch; the static cache where it works, else the dynamic one, and the
JSON says which), measured the same way. transformers compiles the forward of a static-cache
``generate`` on CUDA by itself (minutes); that is switched off (``disable_compile=True``) unless
``--baseline-compile`` is given. The JSON holds device, versions, shapes, dtype and the times.
Benchmarks never assert timings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from autoselect_fast.engine import Request
from autoselect_fast.presets import get_preset
from autoselect_fast.report import BenchSetup
from autoselect_fast.timing import environment, measure

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_requests(setup: BenchSetup, batch: int, seed: int = 0) -> list[Request]:
    """``batch`` requests with the preset's prompt shape (text before + image + text after, the latter
    varied by up to +-50 % so lengths differ) and random images."""
    preset, adapter = setup.preset, setup.engine.adapter
    rng = random.Random(seed)
    vocab = min(adapter.vocab_size, 30000)
    requests = []
    for r in range(batch):
        after = max(1, round(preset.text_after * rng.uniform(0.5, 1.5))) if batch > 1 else preset.text_after
        words = [rng.randrange(3, vocab) for _ in range(preset.text_before + after)]
        prompt = words[:preset.text_before] + [adapter.image_token_id] + words[preset.text_before:]
        pixels = np.random.RandomState(seed * 1000 + r).randint(0, 256, (*preset.image_size, 3), dtype=np.uint8)
        requests.append(Request(prompt, image=Image.fromarray(pixels)))
    return requests


def token_ids(output) -> list[list[int]]:
    return output.token_ids if hasattr(output, "token_ids") else output


def process_ms(fn, warmup: int, repeats: int) -> float:
    """Median CPU time of the process per call (all its threads), in ms."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        samples.append((time.process_time() - t0) * 1e3)
    return statistics.median(samples)


def decode_rate(generate, batch: int, new_tokens: int, device, warmup: int, repeats: int) -> dict:
    """Median ``t(1)``, ``t(N)`` and the decode tokens/s between them. On a CPU also by the process's CPU
    time, which other processes sharing the cores change far less than the wall time."""
    first = measure(lambda: generate(1), device=device, warmup=warmup, repeats=repeats).median_ms
    full = measure(lambda: generate(new_tokens), device=device, warmup=warmup, repeats=repeats).median_ms
    tokens = batch * (new_tokens - 1)
    row = {"t1_ms": first, "tN_ms": full, "decode_ms": full - first,
           "decode_tokens_per_s": tokens / ((full - first) / 1e3) if full > first else float("nan")}
    if torch.device(device).type == "cpu":
        cpu_first, cpu_full = process_ms(lambda: generate(1), 0, repeats), process_ms(lambda: generate(new_tokens), 0, repeats)
        row.update(cpu_t1_ms=cpu_first, cpu_tN_ms=cpu_full,
                   decode_tokens_per_cpu_s=tokens / ((cpu_full - cpu_first) / 1e3) if cpu_full > cpu_first else float("nan"))
    return row


def transformers_generate(setup: BenchSetup, requests: list[Request], compile_forward: bool = False):
    """The unmodified model's ``generate`` over the same requests (left-padded batch, every visual token)."""
    engine, model = setup.engine, setup.model
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ValueError(f"--baseline builds LLaVA-1.5 inputs (one image per request); preset {setup.preset.name!r} is a {type(model).__name__}")
    batch = engine.prepare(requests)
    image_token = engine.adapter.image_token_id
    rows = []
    for r in range(batch.batch_size):
        s, e = batch.text_cu_seqlens[r].item(), batch.text_cu_seqlens[r + 1].item()
        text = batch.text_ids[s:e].tolist()
        cut = int(batch.insert_at[batch.images_of(r)[0]])
        rows.append(text[:cut] + [image_token] * batch.layouts[r].num_slots + text[cut:])
    longest = max(len(x) for x in rows)
    ids = torch.tensor([[0] * (longest - len(x)) + x for x in rows], device=setup.device)
    mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in rows], device=setup.device)
    pixels = torch.stack([p.reshape(-1, *p.shape[-3:])[0] for p in batch.pixel_values]).to(setup.device, setup.dtype)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, disable_compile=not compile_forward)
    try:  # the static cache where this transformers release supports it for the model
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        cache = "static"
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, then the dynamic cache
        print(f"transformers generate: static cache not usable ({type(exc).__name__}: {exc}); dynamic cache", file=sys.stderr)
        cache = "dynamic"

    def generate(n):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)

    return generate, cache


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the preset's")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="also time the unmodified model's generate")
    parser.add_argument("--baseline-compile", action="store_true", help="let transformers compile its static-cache generate")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    device, dtype = torch.device(args.device), DTYPES[args.dtype or preset.default_dtype]
    setup = BenchSetup.build(preset, device, dtype)
    engine = setup.engine_for(args.keep)
    results = []
    for batch in args.batches:
        requests = make_requests(setup, batch)
        row = {"batch": batch, "engine": decode_rate(lambda n: token_ids(engine.generate(requests, max_new_tokens=n)), batch,
                                                     args.new_tokens, device, args.warmup, args.repeats)}
        if args.baseline:
            generate, cache = transformers_generate(setup, requests, args.baseline_compile)
            row["transformers"] = decode_rate(generate, batch, args.new_tokens, device, args.warmup, args.repeats)
            row["transformers"].update(cache=cache, compiled=cache == "static" and args.baseline_compile)
            row["speedup"] = row["engine"]["decode_tokens_per_s"] / row["transformers"]["decode_tokens_per_s"]
        results.append(row)
        line = f"batch {batch}: engine {row['engine']['decode_tokens_per_s']:.1f} decode tokens/s"
        if "decode_tokens_per_cpu_s" in row["engine"]:
            line += f" ({row['engine']['decode_tokens_per_cpu_s']:.1f} per CPU-second)"
        if args.baseline:
            line += f", transformers ({row['transformers']['cache']} cache) {row['transformers']['decode_tokens_per_s']:.1f} ({row['speedup']:.2f}x)"
        print(line, flush=True)
    report = {"benchmark": "decode", "preset": preset.name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "keep": args.keep, "new_tokens": args.new_tokens, "repeats": args.repeats, "decode_stats": getattr(engine, "decode_stats", None),
              "threads": torch.get_num_threads(), "environment": environment(device), "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
