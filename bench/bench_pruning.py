"""pytest-benchmark suite of the pruning module (Scorer + hard top-K selection) against its parts.

    pytest bench/bench_pruning.py                 # timings
    pytest bench/bench_pruning.py --benchmark-disable   # only checks that it runs (CI)

Shape: LLaVA-1.5, one image of N = 576 tokens of width d_v = 1024, K = 64, the published Scorer
(2 blocks, width 1024, 16 heads). Cases: the Scorer alone and the whole module, both as
``autoselect_fast.report.pruning`` builds them (the one home of this benchmark, shared with
``autoselect-fast pruning`` and the report), and selection alone (reference path, and the Triton
kernel on CUDA). Compare rows of one run; benchmarks never assert timings. The end-to-end view
(pruning inside TTFT) is ``autoselect-fast bench``.
"""
import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R
from autoselect_fast.report import pruning_calls, published_pruning_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N, D, K = 576, 1024, 64


def _group(device):
    return f"pruning module, N={N}, d={D}, K={K}, {device}"


def _inputs(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    scorer, (features,) = published_pruning_inputs(1, N, D, device=device, dtype=dtype)
    return scorer, features


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_alone(timed, device):
    scorer, features = _inputs(device)
    scores = timed(device, pruning_calls(scorer, [features], [K])["scorer_only"], _group(device))
    assert scores.shape == (N,) and torch.equal(scores, scorer(features).float())


@pytest.mark.parametrize("device", DEVICES)
def test_selection_reference(timed, device):
    scorer, features = _inputs(device)
    scores = scorer(features).detach()
    sel = timed(device, lambda: R.select_tokens(scores, features, K), _group(device))
    assert sel.features.shape == (K, D)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton selection kernel is only timed compiled, on CUDA")
def test_selection_triton(timed):
    scorer, features = _inputs("cuda")
    scores = scorer(features).detach()
    sel = timed("cuda", lambda: ops.select(scores, features, K, backend="triton"), _group("cuda"))
    assert torch.equal(sel.indices, R.select_tokens(scores, features, K).indices)


@pytest.mark.parametrize("device", DEVICES)
def test_pruning_module(timed, device):
    scorer, features = _inputs(device)
    sel = timed(device, pruning_calls(scorer, [features], [K])["pruning_module"], _group(device))
    assert torch.equal(sel.indices, R.select_tokens(scorer(features).detach().float(), features, K).indices)
