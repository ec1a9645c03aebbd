"""Benchmark of varlen packing: the extension (autoselect_fast._C via pack_varlen) against the
plain PyTorch reference, on one fixed batch of 16 requests of mixed sizes (docs/design.md, "Varlen packing format").

    pytest bench/bench_packing.py            # pytest-benchmark; CUDA variants skip without a GPU
    python bench/bench_packing.py [--out bench/out/packing.json] [--rounds 20]

The script prints the median time of both and the speedup per device, and writes them as JSON
(device, versions, shapes, dtype, times, ratio). Benchmarks never assert timings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import pytest
import torch

from autoselect_fast import packing
from autoselect_fast.packing import pack_varlen, pack_varlen_reference
from autoselect_fast.timing import environment, gpu_timeline_ms

SEED = 0
NUM_REQUESTS = 16
HIDDEN = 4096
DTYPE = torch.float16
TEXT_TOKENS = (20, 200)
IMAGES_PER_REQUEST = (1, 2)
KEPT_TOKENS = (64, 576)


def make_batch(device="cpu", seed=SEED):
    """pack_varlen's arguments for the benchmark batch (1-D positions, index tensors on the CPU)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    text_cu, visual_cu, image_request, image_insert_at = [0], [0], [], []
    for r in range(NUM_REQUESTS):
        text_len = rng.randint(*TEXT_TOKENS)
        for insert_at in sorted(rng.randint(0, text_len) for _ in range(rng.randint(*IMAGES_PER_REQUEST))):
            visual_cu.append(visual_cu[-1] + rng.randint(*KEPT_TOKENS))
            image_request.append(r)
            image_insert_at.append(insert_at)
        text_cu.append(text_cu[-1] + text_len)
    lt, kt = text_cu[-1], visual_cu[-1]
    return dict(
        text_embeds=torch.randn(lt, HIDDEN, generator=gen, dtype=DTYPE).to(device),
        text_cu_seqlens=torch.tensor(text_cu),
        text_positions=torch.arange(lt, device=device),
        visual_embeds=torch.randn(kt, HIDDEN, generator=gen, dtype=DTYPE).to(device),
        visual_cu_seqlens=torch.tensor(visual_cu),
        visual_positions=torch.arange(kt, device=device),
        image_request=torch.tensor(image_request),
        image_insert_at=torch.tensor(image_insert_at),
    )


def shapes(args):
    return {
        "requests": NUM_REQUESTS,
        "images": args["image_request"].numel(),
        "hidden": HIDDEN,
        "text_tokens": args["text_embeds"].shape[0],
        "visual_tokens": args["visual_embeds"].shape[0],
        "packed_tokens": args["text_embeds"].shape[0] + args["visual_embeds"].shape[0],
    }


IMPLS = {"extension": pack_varlen, "reference": pack_varlen_reference}

requires_extension = pytest.mark.skipif(
    not packing.extension_available(), reason="autoselect_fast._C is not built: pip install --no-build-isolation -e ."
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------


def _bench(benchmark, device, impl):
    args = make_batch(device)
    fn = IMPLS[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        out = fn(**args)
        sync()
        return out

    benchmark.group = f"pack_varlen {device}"
    benchmark.extra_info.update(shapes(args), dtype=str(DTYPE), device=device, impl=impl)
    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)


@requires_extension
@pytest.mark.parametrize("impl", list(IMPLS))
def test_pack_varlen_cpu(benchmark, impl):
    _bench(benchmark, "cpu", impl)


@requires_extension
@requires_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
def test_pack_varlen_cuda(benchmark, impl):
    _bench(benchmark, "cuda", impl)


# --------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------


def median_seconds(args, rounds, device):
    """Median time per implementation. Rounds alternate between the implementations so that load
    from other processes on a shared machine hits both alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {impl: [] for impl in IMPLS}
    for fn in IMPLS.values():  # warm-up
        fn(**args)
    sync()
    for _ in range(rounds):
        for impl, fn in IMPLS.items():
            start = time.perf_counter()
            fn(**args)
            sync()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "out", "packing.json"), help="JSON output path")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per implementation")
    opts = parser.parse_args(argv)
    if not packing.extension_available():
        raise SystemExit("autoselect_fast._C is not built: run `pip install --no-build-isolation -e .`")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        args = make_batch(device)
        times = median_seconds(args, opts.rounds, device)
        ratio = times["reference"] / times["extension"]
        if device == "cuda":
            # Every packed row is read once and written once: the goal compares the extension with a
            # device-to-device copy of the same bytes (the packer's goal in bench/README.md: >= 85 % of copy bandwidth).
            rows = torch.cat([args["text_embeds"], args["visual_embeds"]])
            copy_target = torch.empty_like(rows)
            moved = 2 * rows.numel() * rows.element_size()
            ext_ms, ext_how = gpu_timeline_ms(lambda: pack_varlen(**args))
            copy_ms, copy_how = gpu_timeline_ms(lambda: copy_target.copy_(rows))
            timeline = {"extension_ms": ext_ms, "extension_method": ext_how, "copy_ms": copy_ms, "copy_method": copy_how,
                        "bytes_moved": moved, "extension_GBps": moved / ext_ms / 1e6, "copy_GBps": moved / copy_ms / 1e6,
                        "fraction_of_copy_bandwidth": copy_ms / ext_ms}
        results.append({
            "device": device,
            "device_name": environment(device)["device"],
            "shapes": shapes(args),
            "dtype": str(DTYPE),
            "rounds": opts.rounds,
            "median_s": times,
            "speedup_extension_vs_reference": ratio,
            **({"gpu_timeline": timeline} if device == "cuda" else {}),
        })
        print(
            f"{device:4s} ({results[-1]['device_name']}): T={results[-1]['shapes']['packed_tokens']} H={HIDDEN} "
            f"{DTYPE}: extension {times['extension'] * 1e3:.2f} ms, reference {times['reference'] * 1e3:.2f} ms, "
            f"speedup {ratio:.2f}x"
        )
        if device == "cuda":
            print(f"cuda GPU timeline: extension {ext_ms * 1e3:.1f} us ({timeline['extension_GBps']:.0f} GB/s, {ext_how}), "
                  f"copy of the same bytes {copy_ms * 1e3:.1f} us ({timeline['copy_GBps']:.0f} GB/s): "
                  f"{timeline['fraction_of_copy_bandwidth']:.0%} of copy bandwidth")

    report = {
        "benchmark": "pack_varlen",
        "versions": environment("cuda" if torch.cuda.is_available() else "cpu"),
        "seed": SEED,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
