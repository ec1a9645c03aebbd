"""Varlen attention backends: every backend against per-segment SDPA and a dense block-diagonal causal
reference, with GQA, and through transformers' AttentionInterface (CUDA backends skip without a GPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from autoselect_fast.attention import (
    backend_unavailable_reason,
    register_varlen_attention,
    resolve_backend,
    varlen_attention,
)
from autoselect_fast.ragged import cu_seqlens_from_lengths

CUDA = torch.cuda.is_available()
# fp32 on CPU: the reference loop and the dense reference differ only in summation order.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _packed(lengths, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, hq, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(t, hkv, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(t, hkv, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v, cu_seqlens_from_lengths(lengths).to(device=device, dtype=torch.int32)


def dense_block_causal(q, k, v, cu, scale=None):
    """One softmax over all T keys with a (T, T) mask: same segment and key <= query. float64."""
    t, hq, d = q.shape
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff().long().cpu()).to(q.device)
    idx = torch.arange(t, device=q.device)
    allowed = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    groups = hq // k.shape[1]
    k64, v64 = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    logits = torch.einsum("qhd,khd->hqk", q.double(), k64) * (scale if scale is not None else d ** -0.5)
    probs = logits.masked_fill(~allowed, -math.inf).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v64)


def per_segment_sdpa(q, k, v, cu):
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].repeat_interleave(groups, 1).transpose(0, 1), v[s:e].repeat_interleave(groups, 1).transpose(0, 1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[5], [1, 7, 3], [16, 2, 9, 1]])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_backend_matches_per_segment_and_dense(lengths, hq, hkv):
    q, k, v, cu = _packed(lengths, hq, hkv, 8)
    out = varlen_attention(q, k, v, cu, backend="sdpa")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, per_segment_sdpa(q, k, v, cu), **TOL[torch.float32])
    torch.testing.assert_close(out.double(), dense_block_causal(q, k, v, cu), **TOL[torch.float32])


def test_sdpa_backend_float64_and_custom_scale():
    q, k, v, cu = _packed([4, 6], 2, 2, 16, dtype=torch.float64)
    out = varlen_attention(q, k, v, cu, scale=0.3, backend="sdpa")
    torch.testing.assert_close(out, dense_block_causal(q, k, v, cu, scale=0.3), **TOL[torch.float64])


def test_more_keys_than_queries_is_bottom_right_causal():
    """A segment with Lk > Lq (queries are the last Lq tokens): query i sees keys 0..Lk-Lq+i, as FlashAttention."""
    q, k, v, cu_k = _packed([6, 5], 2, 1, 8)
    lengths_q = [2, 3]
    take = torch.cat([torch.arange(4, 6), torch.arange(8, 11)])
    out = varlen_attention(q[take], k, v, cu_seqlens_from_lengths(lengths_q).to(torch.int32), cu_k, backend="sdpa")
    full = dense_block_causal(q, k, v, cu_k)[take]
    torch.testing.assert_close(out.double(), full, **TOL[torch.float32])


def test_auto_on_cpu_is_sdpa_and_cuda_backends_explain_themselves():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    for backend in ("flash_attn", "torch_varlen"):
        assert "CUDA" in backend_unavailable_reason(backend, torch.device("cpu"), torch.float16)
        with pytest.raises(ValueError, match="attention_backend"):
            resolve_backend(backend, torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        resolve_backend("xformers", torch.device("cpu"), torch.float32)


def test_bad_arguments():
    q, k, v, cu = _packed([3, 3], 4, 2, 8)
    with pytest.raises(ValueError, match="Hq divisible by Hkv"):
        varlen_attention(q[:, :3], k, v, cu, backend="sdpa")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varlen_attention(q, k, v, torch.tensor([0, 3, 5], dtype=torch.int32), backend="sdpa")
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        varlen_attention(q, k, v, cu.float(), backend="sdpa")


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_registered_function_as_transformers_calls_it(backend):
    """Through AttentionInterface: (1, H, T, d) inputs, GQA via module.num_key_value_groups, (1, T, H, d) output."""
    from transformers import AttentionInterface

    names = register_varlen_attention()
    fn = AttentionInterface()[names[backend]]
    q, k, v, cu = _packed([3, 8, 1], 4, 2, 8)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    out, weights = fn(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                      scaling=8 ** -0.5, dropout=0.0, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8)
    assert weights is None and out.shape == (1, q.shape[0], 4, 8)
    torch.testing.assert_close(out[0], per_segment_sdpa(q, k, v, cu), **TOL[torch.float32])
    with pytest.raises(ValueError, match="cu_seq_lens"):
        fn(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, scaling=1.0)


def test_llama_with_registered_backend_matches_each_sequence_alone():
    """A real LlamaModel called with packed inputs, explicit cu_seq_lens and gapped positions equals the
    sdpa model run on each sequence alone (with an explicit all-ones mask so transformers does not
    re-split the sequence at the position gaps)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)).eval()
    names = register_varlen_attention()
    lengths = [5, 9, 2]
    x = torch.randn(sum(lengths), 32)
    pos = torch.cat([torch.tensor([0, 1, 2, 7, 8]), torch.tensor([0, 3, 4, 5, 9, 10, 11, 12, 13]), torch.tensor([0, 1])])
    cu = cu_seqlens_from_lengths(lengths).to(torch.int32)
    with torch.no_grad():
        model.config._attn_implementation = names["sdpa"]
        packed = model(inputs_embeds=x[None], position_ids=pos[None], attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=9, max_length_k=9).last_hidden_state[0]
        model.config._attn_implementation = "sdpa"
        alone = torch.cat([
            model(inputs_embeds=x[None, s:e], position_ids=pos[None, s:e], attention_mask=torch.ones(1, e - s, dtype=torch.long)).last_hidden_state[0]
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())
        ])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# CPU fast path: the sdpa backend must take torch's flash-attention CPU kernel, never the math kernel
# --------------------------------------------------------------------------------------------------
def _sdpa_kernels_called(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(16, 16), (16, 4), (6, 1)])
def test_cpu_sdpa_backend_matches_reference_gqa_odd_lengths(hq, hkv, dtype):
    """GQA and odd segment lengths, with the strided (T, H, d) views transformers hands in, against the
    float64 dense reference; and the call takes the flash CPU kernel (math kernel: 5-10x slower)."""
    lengths = [37, 1, 111, 6]
    g = torch.Generator().manual_seed(1)
    # transformers gives (1, H, T, d) tensors; the registered function passes their (T, H, d) views.
    q, k, v = (torch.randn(1, h, sum(lengths), 32, generator=g).to(dtype)[0].transpose(0, 1) for h in (hq, hkv, hkv))
    cu = cu_seqlens_from_lengths(lengths).to(torch.int32)
    out = varlen_attention(q, k, v, cu, backend="sdpa")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_block_causal(q, k, v, cu), **TOL[dtype])
    kernels = _sdpa_kernels_called(lambda: varlen_attention(q, k, v, cu, backend="sdpa"))
    assert kernels == {"aten::_scaled_dot_product_flash_attention_for_cpu"}, kernels


def test_cpu_sdpa_backend_single_segment_and_bottom_right_mask_use_flash_kernel():
    q, k, v, cu = _packed([53], 8, 2, 16)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, backend="sdpa").double(), dense_block_causal(q, k, v, cu), **TOL[torch.float32])
    take = torch.arange(40, 53)
    cu_q = cu_seqlens_from_lengths([13]).to(torch.int32)
    kernels = _sdpa_kernels_called(lambda: varlen_attention(q[take], k, v, cu_q, cu, backend="sdpa"))
    assert kernels == {"aten::_scaled_dot_product_flash_attention_for_cpu"}, kernels


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 2)])
def test_cpu_sdpa_backend_matches_transformers_sdpa_attention(hq, hkv):
    """Same tokens through transformers' own ``sdpa`` attention function and through ours."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = hq // hkv, True
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 71, 64, generator=g) for h in (hq, hkv, hkv))
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    cu = torch.tensor([0, 71], dtype=torch.int32)
    got = varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, scale=0.125, backend="sdpa")
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def test_auto_on_cuda_without_a_varlen_kernel_warns():
    """fp32 on CUDA has no varlen kernel: 'auto' picks the SDPA loop, and says so (no silent slow path)."""
    with pytest.warns(RuntimeWarning, match="per-segment SDPA loop"):
        assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "sdpa"


# --------------------------------------------------------------------------------------------------
# CUDA backends
# --------------------------------------------------------------------------------------------------
def _skip_unless(backend, dtype):
    if not CUDA:
        pytest.skip(f"{backend}: no CUDA device on this machine")
    reason = backend_unavailable_reason(backend, torch.device("cuda"), dtype)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_cuda_backends_match_references(backend, dtype, hq, hkv):
    _skip_unless(backend, dtype)
    q, k, v, cu = _packed([1, 37, 128, 5], hq, hkv, 64, dtype=dtype, device="cuda")
    out = varlen_attention(q, k, v, cu, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    # The float32 reference runs on the CPU: CUDA's fused SDPA kernels take no float32 grouped-query
    # input (torch 2.11), and the CUDA fallback refuses the math kernel.
    reference = varlen_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), cu.cpu(), backend="sdpa")
    torch.testing.assert_close(out.float().cpu(), reference, **TOL[dtype])
    torch.testing.assert_close(out.double(), dense_block_causal(q, k, v, cu), **TOL[dtype])


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_cuda_backend_more_keys_than_queries(backend):
    _skip_unless(backend, torch.float16)
    q, k, v, cu_k = _packed([6, 5], 4, 2, 64, dtype=torch.float16, device="cuda")
    take = torch.cat([torch.arange(4, 6), torch.arange(8, 11)]).cuda()
    cu_q = cu_seqlens_from_lengths([2, 3]).to(device="cuda", dtype=torch.int32)
    out = varlen_attention(q[take], k, v, cu_q, cu_k, backend=backend)
    torch.testing.assert_close(out.double(), dense_block_causal(q, k, v, cu_k)[take], **TOL[torch.float16])
