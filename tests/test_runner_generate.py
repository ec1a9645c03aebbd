"""generate's prefill on the runner's padded / CUDA-graph path (``engine.runner``, ``engine.prefill_buffers``).

The padded step gives the language model a ``KVCapture`` as its cache, which copies every layer's
packed keys/values (the whole token bucket, padding included) into static buffers; after the step the
decode cache's writer (``kv_cache.PrefillWriter.scatter``) writes the real tokens into the decode cache.
On CPU the runner's ``"padded"`` mode runs exactly what a graph would replay, and every result is
compared at fp32, rtol = atol = 1e-5, with the eager path (the writer as the prefill's cache, layer by
layer): the decode cache's real columns (and nothing else written), the logits, and ``generate``'s
tokens, greedy and with seeded sampling, on LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL mixed batches (different
prompt lengths, a text-only request, a two-image request) in buckets on both sides of a boundary. The
stats must show the prefills padded; a batch above the largest bucket runs eagerly and says so; the K/V
buffers exist only once a prefill has filled a decode cache.

The CUDA test at the end (skipped without a GPU) checks the graphed prefill into a decode cache against
the eager writer in fp16, and that after warm-up it makes no synchronisation.
"""
import pytest
import torch
from test_runner import (  # noqa: F401 (setup: fixture)
    FP16,
    MODELS,
    TOL,
    cuda_engine,
    engine_pair,
    graph_runner,
    image_processor,
    llava_requests,
    packed_batch,
    padded_runner,
    requires_cuda,
    setup,
    tiny_llava,
    tiny_scorer,
)

from autoselect_fast.engine import AutoSelectEngine
from autoselect_fast.kv_cache import DecodeCache, text_config_shapes


def decode_cache_for(engine, packed, extra_rows=1):
    """A decode cache for ``packed`` (one spare row, as a graph bucket has) and its writer."""
    lengths = packed.cu_seqlens.diff().tolist()
    cache = DecodeCache.for_config(engine.adapter.language_model.config, len(lengths) + extra_rows, max(lengths) + 3,
                                   dtype=torch.float32, device="cpu")
    return cache, cache.prefill_writer(lengths), lengths


def check_same_decode_cache(got: DecodeCache, want: DecodeCache, lengths):
    """The real columns equal (fp32, 1e-5); nothing else written (a padding token would land past a row's length)."""
    assert got.lengths.tolist() == want.lengths.tolist() == lengths + [0] * (got.batch_size - len(lengths))
    for g, w in ((got.key_buffer, want.key_buffer), (got.value_buffer, want.value_buffer)):
        for r, n in enumerate(lengths):
            torch.testing.assert_close(g[:, r, :, :n], w[:, r, :, :n], **TOL)
            assert not g[:, r, :, n:].any()
        assert not g[:, len(lengths):].any()


def test_padded_prefill_fills_the_decode_cache_like_the_eager_writer(setup):
    """generate's prefill (a decode cache's writer) on the padded path: the step captures every layer's K/V of the
    whole bucket, the writer scatters the real tokens; logits and cache equal the eager writer's."""
    engine, packed, requests_in = setup
    tokens, requests = packed.embeds.shape[0], packed.cu_seqlens.numel() - 1
    want_cache, want_writer, lengths = decode_cache_for(engine, packed)
    want = engine.prefill_packed(packed, want_writer)  # eager: PrefillWriter.update, layer by layer
    torch.testing.assert_close(want, engine.prefill_packed(packed), rtol=0, atol=0)
    cases = [((tokens,), (requests,)), ((tokens - 1, tokens + 1), (requests,)), ((tokens - 1, 2 * tokens + 7), (1, requests + 1, 64)),
             ((8, 3 * tokens), (requests + 5,))]
    layers, kv_heads, head_dim = text_config_shapes(engine.adapter.language_model.config)
    for prefill_buckets, request_buckets in cases:
        runner = padded_runner(engine, prefill_buckets=prefill_buckets, request_buckets=request_buckets)
        torch.testing.assert_close(runner.prefill(packed), want, **TOL)
        assert runner.prefill_kv_bytes() == 0  # a prefill without a decode cache allocates no K/V buffers
        cache, writer, _ = decode_cache_for(engine, packed)
        torch.testing.assert_close(runner.prefill(packed, writer), want, **TOL)
        check_same_decode_cache(cache, want_cache, lengths)
        assert runner.stats_dict()["prefill"] == {"graph_replays": 0, "captures": 0, "padded": 2, "eager": {}}
        assert runner.prefill_kv_bytes() == 2 * layers * prefill_buckets[-1] * kv_heads * head_dim * 4
    # one set of shared buffers, a smaller batch in a smaller bucket in between: stale K/V rows are never scattered
    runner = padded_runner(engine, prefill_buckets=(tokens // 2, tokens, 4 * tokens), request_buckets=(1, 4))
    sub = packed_batch(engine, requests_in[1:2])
    sub_want_cache, sub_writer, sub_lengths = decode_cache_for(engine, sub, extra_rows=0)
    sub_want = engine.prefill_packed(sub, sub_writer)
    for batch, expected, expected_cache, n in ((packed, want, want_cache, lengths), (sub, sub_want, sub_want_cache, sub_lengths),
                                               (packed, want, want_cache, lengths)):
        cache, writer, _ = decode_cache_for(engine, batch, extra_rows=expected_cache.batch_size - len(n))
        torch.testing.assert_close(runner.prefill(batch, writer), expected, **TOL)
        check_same_decode_cache(cache, expected_cache, n)
    assert runner.stats["prefill"].padded == 3 and not runner.stats["prefill"].eager
    with pytest.raises(ValueError, match=f"places {tokens - lengths[-1]} tokens, the packed batch has {tokens}"):
        runner.prefill(packed, decode_cache_for(engine, packed)[0].prefill_writer(lengths[:-1]))


def test_a_decode_cache_above_the_largest_bucket_is_filled_eagerly(setup):
    engine, packed, _ = setup
    tokens = packed.embeds.shape[0]
    want_cache, want_writer, lengths = decode_cache_for(engine, packed)
    want = engine.prefill_packed(packed, want_writer)
    runner = padded_runner(engine, prefill_buckets=(tokens - 1,))
    cache, writer, _ = decode_cache_for(engine, packed)
    torch.testing.assert_close(runner.prefill(packed, writer), want, **TOL)
    check_same_decode_cache(cache, want_cache, lengths)
    assert runner.stats_dict()["prefill"] == {"graph_replays": 0, "captures": 0, "padded": 0, "eager": {"above_largest_bucket": 1}}
    assert runner.prefill_kv_bytes() == 0


def test_compiled_step_with_kv_capture_equals_eager():
    """``compile_language_model``: the step with K/V capture compiles too, its capture object traced as the cache
    (Dynamo's eager backend here: the plumbing, not Inductor)."""
    engine = AutoSelectEngine(tiny_llava(), tiny_scorer(32), keep=5, score_cache_size=0)
    packed = packed_batch(engine, llava_requests())
    tokens = packed.embeds.shape[0]
    runner = padded_runner(engine, prefill_buckets=(tokens + 3, 2 * tokens), compile_language_model=True, compile_options={"backend": "eager"})
    want_cache, want_writer, lengths = decode_cache_for(engine, packed)
    want = engine.prefill_packed(packed, want_writer)
    torch._dynamo.reset()
    for _ in range(2):
        cache, writer, _ = decode_cache_for(engine, packed)
        torch.testing.assert_close(runner.prefill(packed, writer), want, **TOL)
        check_same_decode_cache(cache, want_cache, lengths)
    assert runner.stats["prefill"].padded == 2 and not runner.stats["prefill"].eager


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2.5-vl"])
def test_engine_generate_with_a_padded_runner_equals_eager(family):
    """generate's prefill takes the padded path (its decode cache filled from the step's captured K/V): greedy and
    seeded sampled tokens equal the eager engine's, for batches in buckets on both sides of a boundary."""
    eager, padded, requests = engine_pair(family, prefill_buckets=(16, 48, 96, 160), request_buckets=(1, 2, 4), vision_buckets=(1, 4, 16))
    requests[0].max_new_tokens = 3  # different limits: a request finishes while the others decode
    batches = (requests, requests[:1], requests[1:2], requests[2:])  # mixed, one image, text only, two images (Qwen: + one)
    sampling = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=5)
    for batch in batches:
        for kwargs in ({}, sampling):
            want, got = eager.generate(batch, max_new_tokens=6, **kwargs), padded.generate(batch, max_new_tokens=6, **kwargs)
            assert got.token_ids == want.token_ids, (len(batch), kwargs)
            torch.testing.assert_close(got.prefill.logits, want.prefill.logits, **TOL)
    prefill = padded.runner.stats_dict()["prefill"]
    assert prefill == {"graph_replays": 0, "captures": 0, "padded": 2 * len(batches), "eager": {}}, prefill
    used = {key[0] for key in padded.runner._slots["prefill"] if key[2:] == ("kv",)}
    assert len(used) >= 2, used  # token buckets on both sides of a boundary, each with its K/V capture
    assert eager.runner.stats_dict()["prefill"]["eager"] == {"not_cuda": 2 * len(batches)}
    # a batch above the largest bucket fills its decode cache eagerly, and says so
    _, small, _ = engine_pair(family, prefill_buckets=(8,))
    assert small.generate(requests, max_new_tokens=6).token_ids == eager.generate(requests, max_new_tokens=6).token_ids
    assert small.runner.stats_dict()["prefill"]["eager"] == {"above_largest_bucket": 1}


# --------------------------------------------------------------------------------------------------
# CUDA: the graphed prefill into a decode cache (fp16), no synchronisation after warm-up
# --------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("family", ["llava-1.5", "qwen2.5-vl"])
def test_cuda_graphed_prefill_fills_the_decode_cache_without_sync(family):
    """The graphed prefill into a decode cache (captured K/V, scatter after the replay) equals the eager writer
    (fp16) and, after warm-up, makes no synchronisation: copy-in, replay, scatter."""
    build, dim, keep, make_requests = MODELS[family]
    kwargs = {"image_processor": image_processor()} if family == "qwen2.5-vl" else {}
    engine = cuda_engine(build, dim, **keep, **kwargs)
    packed = packed_batch(engine, make_requests())
    lengths = packed.cu_seqlens.diff().tolist()
    packed.cu_seqlens, packed.last_token_index = packed.cu_seqlens.cuda(), packed.last_token_index.cuda()  # as the engine hands them over

    def fresh_cache():
        return DecodeCache.for_config(engine.adapter.language_model.config, len(lengths) + 1, max(lengths) + 3,
                                      dtype=torch.float16, device="cuda")

    want_cache = fresh_cache()
    want = engine.prefill_packed(packed, want_cache.prefill_writer(lengths))
    runner = graph_runner(engine)
    runner.prefill(packed, fresh_cache().prefill_writer(lengths))  # captures
    cache = fresh_cache()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = runner.prefill(packed, cache.prefill_writer(lengths))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.float(), want.float(), **FP16)
    assert torch.equal(cache.lengths, want_cache.lengths)
    for g, w in ((cache.key_buffer, want_cache.key_buffer), (cache.value_buffer, want_cache.value_buffer)):
        torch.testing.assert_close(g.float(), w.float(), **FP16)  # columns past each length: zero in both
    stats = runner.stats_dict()["prefill"]
    assert (stats["captures"], stats["graph_replays"], stats["eager"]) == (1, 2, {}), stats
