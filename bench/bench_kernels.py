"""Benchmarks of the Triton kernels (autoselect_fast.ops, backend "triton") against the reference path
and plain-PyTorch baselines of the same shapes (docs/design.md, "Conventions": ratios, never timed assertions).

    pytest bench/bench_kernels.py                  # pytest-benchmark
    python bench/bench_kernels.py [--out bench/out/kernels.json] [--rounds 20]

Cases (shapes in ``CASES``):
  * select        hard top-K K=64 of N=576, gather of d=1024 fp16 rows, batch 1 (LLaVA-1.5 inference)
  * soft_topk     Soft Top-K (laplace, τ=0.5) forward + backward, 32 images x 576 scores, fp32;
                  baseline: softmax forward + backward of the same (32, 576) tensor
  * vp_gate       VP gate forward + backward on 8 x 576 tokens x 1024 bf16 (fused: noise regenerated);
                  baseline: a clone of the same tensor (memory bandwidth)
On CPU the Triton kernels only run in Triton's interpreter, which is meaningless to time, so only the
reference path and the baselines run there (the Triton variants are skipped with that reason). On CUDA
everything runs, and the script also records the peak memory of the VP-gate training step and each
step's GPU timeline time (``timing.gpu_timeline_ms``: a captured CUDA graph replayed back to back, so
no Python launch overhead; the eager median includes it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R
from autoselect_fast.ragged import cu_seqlens_from_lengths
from autoselect_fast.timing import environment, gpu_timeline_ms

CASES = {
    "select": dict(batch=1, n=576, k=64, d=1024, dtype=torch.float16),
    "soft_topk": dict(batch=32, n=576, k=64, tau=0.5, f="laplace", dtype=torch.float32),
    "vp_gate": dict(batch=8, n=576, d=1024, dtype=torch.bfloat16),
}
BASELINES = {"select": "reference", "soft_topk": "softmax", "vp_gate": "clone"}
SKIP_CPU_TRITON = "Triton kernels run only in the interpreter on CPU; timing it is meaningless"


# --------------------------------------------------------------------------------------------------
# Workloads: make(device) -> a no-argument callable doing one step
# --------------------------------------------------------------------------------------------------
def _select(device, impl):
    c = CASES["select"]
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(c["batch"] * c["n"], generator=gen).to(c["dtype"]).to(device)
    features = torch.randn(c["batch"] * c["n"], c["d"], generator=gen).to(c["dtype"]).to(device)
    cu = cu_seqlens_from_lengths([c["n"]] * c["batch"]).to(device)
    if impl == "reference":
        return lambda: R.select_tokens(scores, features, c["k"], cu)
    return lambda: ops.select(scores, features, c["k"], cu, backend="triton")


def _soft_topk(device, impl):
    c = CASES["soft_topk"]
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(c["batch"] * c["n"], generator=gen).to(c["dtype"]).to(device).requires_grad_(True)
    upstream = torch.randn(c["batch"] * c["n"], generator=gen).to(c["dtype"]).to(device)
    cu = cu_seqlens_from_lengths([c["n"]] * c["batch"]).to(device)

    def step():
        scores.grad = None
        if impl == "softmax":
            out = torch.softmax(scores.view(c["batch"], c["n"]), dim=-1).view(-1)
        elif impl == "reference":
            out = R.soft_topk(scores, c["k"], cu, tau=c["tau"], f=c["f"])
        else:
            out = ops.soft_topk(scores, c["k"], cu, tau=c["tau"], f=c["f"], backend="triton")
        out.backward(upstream)

    return step


def _vp_gate(device, impl):
    c = CASES["vp_gate"]
    gen = torch.Generator().manual_seed(0)
    rows = c["batch"] * c["n"]
    x = torch.randn(rows, c["d"], generator=gen).to(c["dtype"]).to(device).requires_grad_(True)
    alpha = torch.rand(rows, generator=gen).to(device).requires_grad_(True)
    upstream = torch.randn(rows, c["d"], generator=gen).to(c["dtype"]).to(device)
    if impl == "clone":
        return lambda: x.detach().clone()

    def step():
        x.grad = alpha.grad = None
        if impl == "reference":
            out = R.vp_gate(x, alpha)  # noise from torch.randn, stored for the backward
        else:
            out = ops.vp_gate(x, alpha, seed=1234, backend="triton")
        out.backward(upstream)

    return step


WORKLOADS = {
    "select": (_select, ["reference", "triton"]),
    "soft_topk": (_soft_topk, ["reference", "triton", "softmax"]),
    "vp_gate": (_vp_gate, ["reference", "triton", "clone"]),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
PARAMS = [(name, impl) for name, (_, impls) in WORKLOADS.items() for impl in impls]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_kernel_benchmark(benchmark, device, case, impl):
    if device == "cpu" and impl == "triton":
        pytest.skip(SKIP_CPU_TRITON)
    step = WORKLOADS[case][0](device, impl)

    def run():
        step()
        _sync(device)

    benchmark.group = f"{case} {device}"
    benchmark.extra_info.update({k: str(v) for k, v in CASES[case].items()}, device=device, impl=impl)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)


# --------------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------------
def median_seconds(step, device, rounds):
    for _ in range(3):  # warm-up (and Triton compilation)
        step()
    _sync(device)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_bytes(step):
    """Peak CUDA memory allocated by one step beyond what was allocated before it."""
    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "out", "kernels.json"), help="JSON output path")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per implementation")
    opts = parser.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    print(f"{'case':10s} {'device':6s} {'impl':10s} {'median ms':>10s} {'vs baseline':>12s} {'vs reference':>13s}")
    for device in devices:
        for case, (make, impls) in WORKLOADS.items():
            times, skipped = {}, {}
            for impl in impls:
                if device == "cpu" and impl == "triton":
                    skipped[impl] = SKIP_CPU_TRITON
                    continue
                times[impl] = median_seconds(make(device, impl), device, opts.rounds)
            base = BASELINES[case]
            entry = {
                "case": case,
                "device": device,
                "device_name": environment(device)["device"],
                "shapes": {k: v for k, v in CASES[case].items() if k != "dtype"},
                "dtype": str(CASES[case]["dtype"]),
                "rounds": opts.rounds,
                "median_s": times,
                "baseline": base,
                "ratio_vs_baseline": {impl: t / times[base] for impl, t in times.items()},
                "ratio_vs_reference": {impl: t / times["reference"] for impl, t in times.items()},
                "skipped": skipped,
            }
            if device == "cuda":  # the GPU's own time per call, without Python launch overhead
                timeline = {impl: gpu_timeline_ms(make(device, impl), graph=impl != "reference") for impl in impls}
                entry["gpu_timeline_ms"] = {impl: ms for impl, (ms, _) in timeline.items()}
                entry["gpu_timeline_method"] = {impl: how for impl, (_, how) in timeline.items()}
            if device == "cuda" and case == "vp_gate":
                entry["peak_memory_bytes"] = {impl: peak_memory_bytes(make(device, impl)) for impl in ("reference", "triton")}
            results.append(entry)
            for impl in impls:
                if impl in times:
                    print(
                        f"{case:10s} {device:6s} {impl:10s} {times[impl] * 1e3:10.3f} "
                        f"{entry['ratio_vs_baseline'][impl]:11.2f}x {entry['ratio_vs_reference'][impl]:12.2f}x"
                    )
                else:
                    print(f"{case:10s} {device:6s} {impl:10s} {'skipped':>10s}  ({skipped[impl]})")
            for impl, ms in entry.get("gpu_timeline_ms", {}).items():
                print(f"{case:10s} {device:6s} {impl:10s} GPU timeline {ms * 1e3:9.1f} us  ({entry['gpu_timeline_method'][impl]})")
            if "peak_memory_bytes" in entry:
                mem = entry["peak_memory_bytes"]
                print(f"{case:10s} {device:6s} peak memory: reference {mem['reference'] / 2**20:.1f} MiB, triton {mem['triton'] / 2**20:.1f} MiB")

    report = {"benchmark": "kernels", "versions": environment("cuda" if torch.cuda.is_available() else "cpu"), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
