"""The decode KV cache (autoselect_fast.kv_cache): the prefill scatter (layer by layer, and all layers at once
from a padded bucket's K/V), the per-row decode writes and mask, the decode attention against per-row SDPA
(float64), and real transformers language models (Llama with GQA, Qwen2.5-VL's M-RoPE text model)
decoding from it equal to a cache-free forward on each request alone (float32, rtol = atol = 1e-5).
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel, Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

from autoselect_fast.attention import attention_call, install_dispatch, varlen_call
from autoselect_fast.kv_cache import DecodeCache, decode_attention, text_config_shapes

TOL = dict(rtol=1e-5, atol=1e-5)


def packed_kv(lengths, kv_heads=2, head_dim=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return (torch.randn(1, kv_heads, total, head_dim, generator=g, dtype=dtype),
            torch.randn(1, kv_heads, total, head_dim, generator=g, dtype=dtype))


def test_prefill_writer_scatters_each_request_to_its_row():
    lengths = [3, 5, 1]
    cache = DecodeCache(2, 4, 2, 3, 8, dtype=torch.float64, device="cpu")  # row 3: a padding row
    writer = cache.prefill_writer(lengths)
    cu = [0, 3, 8, 9]
    for layer in range(2):
        k, v = packed_kv(lengths, seed=layer)
        got_k, got_v = writer.update(k, v, layer)
        assert got_k is k and got_v is v  # the varlen prefill attends over the packed tensors themselves
        for r, n in enumerate(lengths):
            assert torch.equal(cache.keys[layer][r, :, :n], k[0, :, cu[r]:cu[r + 1]])
            assert torch.equal(cache.values[layer][r, :, :n], v[0, :, cu[r]:cu[r + 1]])
            assert not cache.keys[layer][r, :, n:].any() and not cache.values[layer][r, :, n:].any()
        assert not cache.keys[layer][3].any()
    assert cache.lengths.tolist() == [3, 5, 1, 0]


def test_scatter_of_all_layers_equals_the_per_layer_writes():
    """PrefillWriter.scatter (the runner's padded path: every layer's K/V of a bucket, padding after the real
    tokens) writes exactly what update writes layer by layer, into one (layers, B, Hkv, C, d) tensor whose
    per-layer views are cache.keys / cache.values."""
    lengths, layers, bucket = [3, 5, 1], 3, 13  # 9 real tokens, 4 padding tokens
    g = torch.Generator().manual_seed(7)
    keys, values = (torch.randn(layers, bucket, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    want = DecodeCache(layers, 4, 2, 3, 8, dtype=torch.float64, device="cpu")
    writer = want.prefill_writer(lengths)
    for layer in range(layers):
        writer.update(keys[layer, :9].transpose(0, 1)[None], values[layer, :9].transpose(0, 1)[None], layer)
    got = DecodeCache(layers, 4, 2, 3, 8, dtype=torch.float64, device="cpu")
    scatter = got.prefill_writer(lengths)
    assert scatter.tokens == 9
    scatter.scatter(keys, values)
    assert torch.equal(got.key_buffer, want.key_buffer) and torch.equal(got.value_buffer, want.value_buffer)
    assert torch.equal(got.key_buffer[2, 1, :, :5], keys[2, 3:8].transpose(0, 1))  # request 1, layer 2
    assert not got.key_buffer[:, 3].any() and not got.key_buffer[:, 2, :, 1:].any()  # the padding tokens went nowhere
    for layer in range(layers):  # per-layer views: a decode step's write shows in the shared buffer
        assert got.keys[layer].data_ptr() == got.key_buffer[layer].data_ptr() and got.keys[layer].is_contiguous()
        assert got.values[layer].data_ptr() == got.value_buffer[layer].data_ptr()
    got.update(torch.ones(4, 2, 1, 3, dtype=torch.float64), torch.ones(4, 2, 1, 3, dtype=torch.float64), 1)
    assert (got.key_buffer[1, 0, :, 3] == 1).all() and (got.value_buffer[1, 1, :, 5] == 1).all()
    assert got.memory_bytes() == 2 * layers * 4 * 2 * 8 * 3 * 8
    with pytest.raises(ValueError, match=r"keys must be \(layers, T >= 9, Hkv, d\) with \(layers, Hkv, d\) = \(3, 2, 3\), got \(3, 8, 2, 3\)"):
        scatter.scatter(keys[:, :8], values)
    with pytest.raises(ValueError, match=r"values must be .* got \(2, 13, 2, 3\)"):
        scatter.scatter(keys, values[:2])


def test_decode_step_writes_at_each_rows_length_and_masks_the_rest():
    cache = DecodeCache(1, 3, 2, 3, 6, dtype=torch.float64, device="cpu")
    cache.prefill_writer([2, 4, 1]).update(*packed_kv([2, 4, 1]), 0)
    mask = cache.prepare_step()
    assert mask is cache.mask and mask.shape == (3, 1, 1, 6)
    assert mask[:, 0, 0].tolist() == [[c <= n for c in range(6)] for n in (2, 4, 1)]
    before = cache.keys[0].clone()
    new_k, new_v = torch.randn(3, 2, 1, 3, dtype=torch.float64), torch.randn(3, 2, 1, 3, dtype=torch.float64)
    keys, values = cache.update(new_k, new_v, 0)
    assert keys is cache.keys[0] and values is cache.values[0]
    for r, n in enumerate((2, 4, 1)):
        assert torch.equal(keys[r, :, n], new_k[r, :, 0]) and torch.equal(values[r, :, n], new_v[r, :, 0])
        assert torch.equal(keys[r, :, :n], before[r, :, :n])  # earlier tokens untouched
    cache.advance()
    assert cache.lengths.tolist() == [3, 5, 2]
    assert cache.prepare_step()[:, 0, 0].sum(-1).tolist() == [4, 6, 3]


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3), (6, 1)])
def test_decode_attention_equals_sdpa_over_each_rows_valid_columns(heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, capacity, dim, valid = 3, 7, 5, [1, 7, 4]
    query = torch.randn(batch, heads, 1, dim, generator=g, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, capacity, dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, capacity, dim, generator=g, dtype=torch.float64)
    mask = (torch.arange(capacity)[None] < torch.tensor(valid)[:, None]).view(batch, 1, 1, capacity)
    out, weights = decode_attention(None, query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (batch, 1, heads, dim)
    for r, n in enumerate(valid):
        k = key[r:r + 1, :, :n].repeat_interleave(heads // kv_heads, dim=1)
        v = value[r:r + 1, :, :n].repeat_interleave(heads // kv_heads, dim=1)
        want = F.scaled_dot_product_attention(query[r:r + 1], k, v, scale=0.3)  # (1, H, 1, d)
        torch.testing.assert_close(out[r, 0], want[0, :, 0], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Real language models: packed varlen prefill into the cache, then decode steps
# --------------------------------------------------------------------------------------------------
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaModel(config).eval()


def qwen_text():
    torch.manual_seed(1)
    config = Qwen2_5_VLTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  vocab_size=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    return Qwen2_5_VLTextModel(config).eval()


def cache_kwarg(lm) -> str:
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"  # renamed in transformers 5.2x


def gapped_positions(lengths, rows, seed):
    """Increasing positions with gaps per request, (T,) or (3, T) (the M-RoPE rows differ inside, as for images)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        base = torch.cumsum(torch.randint(1, 4, (n,), generator=g), 0) - 1
        if rows == 1:
            parts.append(base[None])
        else:
            parts.append(torch.stack([base, base + torch.randint(0, 2, (n,), generator=g), base]))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("build, rows", [(llama, 1), (qwen_text, 3)])
def test_language_model_decodes_from_the_cache_like_each_request_alone(build, rows):
    lm = build()
    install_dispatch(lm.config)
    lengths, steps = [5, 2, 7], 4
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(14, 64, generator=g)
    positions = gapped_positions(lengths, rows, seed=6)  # (rows, T)
    cache = DecodeCache.for_config(lm.config, 4, max(lengths) + steps, dtype=torch.float32, device="cpu")  # one padding row
    kwarg = cache_kwarg(lm)
    with torch.no_grad(), varlen_call("sdpa"):
        lm(inputs_embeds=embeds[None], position_ids=positions[:, None] if rows == 3 else positions, attention_mask=None,
           cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7, use_cache=True, **{kwarg: cache.prefill_writer(lengths)})
    sequences = [embeds[s:e] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    seq_positions = [positions[:, s:e] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    next_position = torch.tensor([p.max() + 1 for p in seq_positions] + [0])
    for step in range(steps):
        new = torch.randn(4, 1, 64, generator=g)
        with torch.no_grad(), attention_call(decode_attention):
            hidden = lm(inputs_embeds=new, attention_mask=cache.prepare_step(), position_ids=next_position[:, None] + step,
                        use_cache=True, **{kwarg: cache}).last_hidden_state
        cache.advance()
        for r in range(3):
            sequences[r] = torch.cat([sequences[r], new[r]])
            seq_positions[r] = torch.cat([seq_positions[r], (next_position[r] + step).expand(rows, 1)], dim=1)
            with torch.no_grad():
                alone = lm(inputs_embeds=sequences[r][None], position_ids=seq_positions[r][:, None] if rows == 3 else seq_positions[r],
                           attention_mask=torch.ones(1, sequences[r].shape[0], dtype=torch.long)).last_hidden_state
            torch.testing.assert_close(hidden[r, 0], alone[0, -1], **TOL)
    assert cache.lengths.tolist() == [n + steps for n in lengths] + [steps]


def test_config_shapes_and_errors():
    assert text_config_shapes(llama().config) == (2, 2, 16)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="full-attention layers only"):
        text_config_shapes(config)
    with pytest.raises(ValueError, match="capacity must be an int >= 1"):
        DecodeCache(1, 1, 1, 1, 0, dtype=torch.float32, device="cpu")
    cache = DecodeCache(1, 2, 2, 3, 4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"lie in \[1, 4\]"):
        cache.prefill_writer([2, 5])
    with pytest.raises(ValueError, match="1 to 2 entries"):
        cache.prefill_writer([1, 1, 1])
    with pytest.raises(ValueError, match="one new token per row"):
        cache.update(torch.zeros(2, 2, 2, 3), torch.zeros(2, 2, 2, 3), 0)
    with pytest.raises(ValueError, match=r"expected keys of shape \(1, Hkv, 3, d\)"):
        cache.prefill_writer([1, 2]).update(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4, 3), 0)
    with pytest.raises(ValueError, match="bool mask"):
        decode_attention(None, torch.zeros(2, 2, 1, 3), cache.keys[0], cache.values[0], None)
    mask = cache.prepare_step()
    with pytest.raises(ValueError, match="cache of 4 columns exceeds sliding_window=3"):
        decode_attention(None, torch.zeros(2, 2, 1, 3), cache.keys[0], cache.values[0], mask, sliding_window=3)
    out, _ = decode_attention(None, torch.zeros(2, 2, 1, 3), cache.keys[0], cache.values[0], mask, sliding_window=4)  # the window covers the cache
    assert out.shape == (2, 1, 2, 3)
