"""Benchmark of the runner (``autoselect_fast.engine.runner``): each device stage eager against its CUDA-graph
replay, and (``--compile``) the language model compiled with ``torch.compile`` inside the graphs.

    python bench/bench_runner.py --preset llava-1.5-7b --device cuda --dtype fp16 --keep 64 --out bench/results/runner-h200.json
    python bench/bench_runner.py --preset llava-1.5-7b --device cuda --dtype fp16 --keep 64 --compile --out ...   # the torch.compile entry
    python bench/bench_runner.py --preset tiny --device cpu --dtype fp32 --repeats 2          # dry run of the script on a CPU

Rows (random weights, one synthetic request of ``preset.text_before + text_after`` text tokens and one
image, plus a batch of 8 such requests of different prompt lengths):

* ``llm``: the language model + ``lm_head`` over the packed batch with K kept tokens per image, and
  with every token (the unpruned length): the runner's eager path and its graph replay; with
  ``--compile`` also the compiled step's graph replay ("graph+torch.compile") on the first row only
  (batch 1, K kept tokens: the goal's case; each further shape would cost minutes of compilation).
* ``vision``: the CLIP tower, 1 and 8 images; ``prune``: Scorer + selection, 1 and 8 images.
* ``engine``: ``engine.prefill(requests)`` end to end (``prepare`` included) with ``cuda_graphs=False``
  and ``True``, when the engine takes a runner configuration.

Each entry is the median wall time per call (``timing.measure``: CUDA events around each call, so host
launch time the GPU waits for is included) over ``--repeats`` calls after ``--warmup`` calls (captures
and compilation happen in the warm-up and are reported separately as ``first_call_s``). On a CPU the
"graph" column is the runner's padded eager mode (no graphs exist there): a check of the script, not
a measurement. Results go to ``--out`` as JSON with the device named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.engine.runner import Runner, RunnerConfig
from autoselect_fast.models import get_adapter
from autoselect_fast.modules import Scorer
from autoselect_fast.presets import build_model, get_preset
from autoselect_fast.timing import environment, measure

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIXED = 8


def requests_for(engine: AutoSelectEngine, preset, count: int, seed: int = 0) -> list[Request]:
    """``count`` requests of one image each (random pixels of the preset's image size), prompts of different lengths."""
    adapter = engine.adapter
    gen = torch.Generator().manual_seed(seed)
    vocab = min(adapter.vocab_size, 30000)
    image_token = adapter.image_token_id
    height, width = preset.image_size
    size = adapter.image_size_of(height, width, engine.adapter.default_image_processor())
    tiles = adapter.num_tiles(size) if hasattr(adapter, "num_tiles") else None
    out = []
    for r in range(count):
        before, after = preset.text_before, preset.text_after + 7 * r
        ids = torch.randint(3, vocab, (before + after,), generator=gen).tolist()
        ids = [i if i != image_token else 3 for i in ids]
        prompt = ids[:before] + [image_token] + ids[before:]
        side = adapter.config.vision_config.image_size
        pixels = torch.randn((tiles, 3, side, side) if tiles else (3, side, side), generator=gen)
        out.append(Request(prompt, pixel_values=pixels, image_sizes=size))
    return out


def packed_for(engine: AutoSelectEngine, requests):
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    pruned = engine.prune(features, batch.budgets, keys=None, positions=batch.token_positions)
    return batch, features, engine.pack(batch, pruned)


def timed(fn, device, warmup, repeats) -> dict:
    t0 = time.perf_counter()
    fn()  # first call: captures (and compiles) happen here
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    result = measure(fn, device=device, warmup=warmup, repeats=repeats).as_dict()
    result["first_call_s"] = round(first, 3)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-1.5-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the compiled language model inside the graphs (slow to compile)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    preset = get_preset(args.preset)
    if preset.serving_batch:
        parser.error(f"--preset {preset.name}: this benchmark builds LLaVA-family requests (a Qwen2.5-VL tower is not graphed by the runner)")
    dtype = DTYPES[args.dtype or preset.default_dtype]
    torch.manual_seed(0)
    model = build_model(preset, device, dtype)
    scorer = Scorer(preset.scorer(get_adapter(model).feature_dim)).to(device=device, dtype=dtype).eval()
    pruned = AutoSelectEngine(model, scorer, keep=args.keep, score_cache_size=0, **_eager_engine_kwargs())
    full = AutoSelectEngine(model, scorer, keep=None, score_cache_size=0, **_eager_engine_kwargs())
    on_cuda = device.type == "cuda"

    def runner(**config) -> Runner:
        if not on_cuda:
            config.setdefault("pad_to_buckets", True)  # no graphs on a CPU: the padded path stands in (a dry run)
        return Runner(pruned.adapter, pruned.attention_backend, RunnerConfig(**config), scorer=scorer, select=pruned._select)

    one, mixed = requests_for(pruned, preset, 1), requests_for(pruned, preset, MIXED)
    results = {"environment": environment(device), "preset": preset.name, "dtype": str(dtype), "keep": args.keep,
               "graph_column": "cuda-graph replay" if on_cuda else "padded eager (CPU dry run: no graphs)", "rows": {}}
    rows = results["rows"]
    eager_runner = Runner(pruned.adapter, pruned.attention_backend, RunnerConfig(cuda_graphs=False), scorer=scorer, select=pruned._select)
    graph_runner = runner()
    compiled_runner = runner(compile_language_model=True) if args.compile else None

    def llm_row(name, engine, requests, compiled: bool = False):
        _, _, packed = packed_for(engine, requests)
        row = {"tokens": int(packed.embeds.shape[0]), "requests": len(requests)}
        row["eager"] = timed(lambda: eager_runner.prefill(packed), device, args.warmup, args.repeats)
        row["graph"] = timed(lambda: graph_runner.prefill(packed), device, args.warmup, args.repeats)
        if compiled and compiled_runner is not None:
            row["graph+torch.compile"] = timed(lambda: compiled_runner.prefill(packed), device, args.warmup, args.repeats)
        rows[name] = row
        print(name, json.dumps(row), flush=True)

    llm_row(f"llm, 1 request, K={args.keep}", pruned, one, compiled=True)  # the goal's row: the one compiled (a 7B compile takes minutes)
    llm_row("llm, 1 request, every token", full, one)
    llm_row(f"llm, {MIXED} requests, K={args.keep}", pruned, mixed)
    for count, requests in ((1, one), (MIXED, mixed)):
        batch, features, _ = packed_for(pruned, requests)
        if graph_runner.vision_graphable():
            rows[f"vision, {count} image(s)"] = {
                "eager": timed(lambda: pruned.adapter.encode(batch.pixel_values, batch.image_sizes), device, args.warmup, args.repeats),
                "graph": timed(lambda: graph_runner.encode(batch.pixel_values, batch.image_sizes), device, args.warmup, args.repeats),
            }
        positions = batch.token_positions.to(device)
        rows[f"prune, {count} image(s)"] = {
            "eager": timed(lambda: pruned.prune(features, batch.budgets, positions=positions), device, args.warmup, args.repeats),
            "graph": timed(lambda: graph_runner.select(features, batch.budgets, positions), device, args.warmup, args.repeats),
        }
        for key in (f"vision, {count} image(s)", f"prune, {count} image(s)"):
            if key in rows:
                print(key, json.dumps(rows[key]), flush=True)
    if "runner_config" in _engine_parameters():  # end to end, once the engine takes the runner's switches
        for name, requests in (("engine.prefill, 1 request", one), (f"engine.prefill, {MIXED} requests", mixed)):
            row = {}
            for graphs in (False, True):
                engine = AutoSelectEngine(model, scorer, keep=args.keep, score_cache_size=0, cuda_graphs=graphs,
                                          runner_config=None if on_cuda else RunnerConfig(pad_to_buckets=graphs))
                row["graphs" if graphs else "eager"] = timed(lambda: engine.prefill(requests), device, args.warmup, args.repeats)
            rows[name] = row
            print(name, json.dumps(row), flush=True)
    results["runner_stats"] = {"graph": graph_runner.stats_dict(), **({"compiled": compiled_runner.stats_dict()} if compiled_runner else {})}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
        print("wrote", args.out)
    return 0


def _engine_parameters():
    import inspect

    return inspect.signature(AutoSelectEngine.__init__).parameters


def _eager_engine_kwargs() -> dict:
    """The engine's own stages eager (they are the "eager" column), whatever the engine's default."""
    return {"cuda_graphs": False} if "cuda_graphs" in _engine_parameters() else {}


if __name__ == "__main__":
    sys.exit(main())
