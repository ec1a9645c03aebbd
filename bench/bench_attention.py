"""pytest-benchmark suite: the engine's packed attention against transformers' own ``sdpa`` attention.

    pytest bench/bench_attention.py                       # timings
    pytest bench/bench_attention.py --benchmark-disable   # only checks that it runs (CI)

Same tokens, same head layout, one layer's attention: transformers' ``sdpa_attention_forward`` on a
``(1, H, L, d)`` batch (what the unmodified model runs) against ``varlen_attention`` on the packed
``(T, H, d)`` views the registered backend receives. Shapes: the default preset's LLM (16 heads of
64) at the unpruned length (L = 624) and at K = 64 (L = 112), a GQA layout (32 query / 8 key-value
heads of 128) and odd lengths. On CUDA the fp16 cases also time the varlen backend ``auto`` picks.
Compare rows of one group in one run; benchmarks never assert timings.
"""
import pytest
import torch

from autoselect_fast.attention import resolve_backend, varlen_attention

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (query heads, key/value heads, head dim, segment lengths)
SHAPES = [
    (16, 16, 64, [624]),
    (16, 16, 64, [112]),
    (32, 8, 128, [333]),
    (16, 4, 64, [37, 111, 5, 250]),
]


def _inputs(device, hq, hkv, d, lengths):
    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    t = sum(lengths)
    # As the model hands them over: (1, H, T, d) views of (1, T, H, d) projections.
    q, k, v = (torch.randn(1, t, h, d, device=device, dtype=dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    return q, k, v, cu


def _group(device, hq, hkv, d, lengths):
    return f"attention Hq={hq} Hkv={hkv} d={d} lengths={lengths}, {device}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,lengths", SHAPES)
def test_transformers_sdpa(timed, device, hq, hkv, d, lengths):
    """transformers' own attention, one call per request (it cannot pack), as the unmodified model runs it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, cu = _inputs(device, hq, hkv, d, lengths)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = hq // hkv, True
    bounds = cu.tolist()

    def per_request():
        return [sdpa_attention_forward(module, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, scaling=d ** -0.5)[0]
                for s, e in zip(bounds[:-1], bounds[1:])]

    outs = timed(device, per_request, _group(device, hq, hkv, d, lengths))
    assert sum(o.shape[1] for o in outs) == sum(lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv,d,lengths", SHAPES)
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_varlen_attention(timed, device, hq, hkv, d, lengths, backend):
    q, k, v, cu = _inputs(device, hq, hkv, d, lengths)
    if backend == "auto" and resolve_backend("auto", q.device, q.dtype) == "sdpa":
        pytest.skip("auto is the sdpa backend here")
    views = [x[0].transpose(0, 1) for x in (q, k, v)]  # (T, H, d), as the registered backend receives them
    out = timed(device, lambda: varlen_attention(*views, cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
                                                            scale=d ** -0.5, backend=backend), _group(device, hq, hkv, d, lengths))
    assert out.shape == views[0].shape
