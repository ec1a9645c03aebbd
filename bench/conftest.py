"""Shared by the pytest-benchmark suites in bench/."""
import pytest
import torch


@pytest.fixture
def timed(benchmark):
    """``timed(device, fn, group)``: benchmark ``fn`` under inference mode, synchronising CUDA after each
    call so GPU work is inside the timed region; returns ``fn``'s result."""

    def run(device, fn, group):
        def step():
            with torch.inference_mode():
                out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = group
        return benchmark(step)

    return run
