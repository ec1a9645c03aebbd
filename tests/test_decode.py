"""Decoding from the static KV cache (autoselect_fast.engine.decode) against the previous decode loop.

The reference, :func:`previous_generate`, is the engine's decode as it was before the static cache,
kept here verbatim in substance: the packed prefill fills a transformers ``DynamicCache``, which is
copied into a left-padded ``(B, Hkv, L_max, d)`` ``DynamicCache`` with a 2-D mask; every step extends
the mask with ``torch.cat``, runs the model's own attention, samples with the same
``sample_next_tokens`` and reads the tokens back. ``engine.generate`` must give the same tokens,
greedy and sampled (the same generators, the same draws in the same order), on mixed batches of
LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL: different prompt lengths, a text-only request, a two-image
request, per-request ``max_new_tokens`` and a stop token hit mid-way, with the host reading back after
every step, every 3 steps or every 8; torch's global generator ends where the previous loop left it. The CUDA tests (skipped without a GPU) check that a decode step
after warm-up makes no synchronisation, graph replay against the eager step (fp16), and graphed
generation against eager generation.
"""
import copy

import pytest
import torch
from test_engine_llava import (  # noqa: F401 (llava, llava_next: fixtures)
    IMAGE_TOKEN,
    NEXT_IMAGES,
    llava,
    llava_next,
    picture,
    scorer,  # noqa: F401 (fixture)
)
from test_engine_llava import processed as llava_processed
from test_engine_qwen import batch_requests, image_processor, processed, tiny_qwen  # noqa: F401 (processed: fixture)
from transformers import DynamicCache

from autoselect_fast.engine import AutoSelectEngine, ImageInput, Request
from autoselect_fast.engine.decode import BATCH_BUCKETS, batch_bucket, capacity_bucket
from autoselect_fast.engine.request import stop_set
from autoselect_fast.engine.sampling import request_generators, sample_next_tokens
from autoselect_fast.modules import Scorer, ScorerConfig
from autoselect_fast.ragged import segment_bounds

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
READ_EVERY = [1, 3, 8]


@pytest.fixture(scope="module")
def qwen_scorer():
    torch.manual_seed(3)
    return Scorer(ScorerConfig(input_dim=4 * 32, hidden_dim=32, num_layers=1, num_heads=4)).eval()  # test_engine_qwen's Scorer


# --------------------------------------------------------------------------------------------------
# The previous decode loop (left-padded DynamicCache, mask concatenated per step, a read every step)
# --------------------------------------------------------------------------------------------------
def previous_padded_cache(packed_cache, cu_seqlens, device):
    bounds = segment_bounds(cu_seqlens)
    longest = max(e - s for s, e in bounds)
    mask = torch.zeros(len(bounds), longest, dtype=torch.int64, device=device)
    for r, (s, e) in enumerate(bounds):
        mask[r, longest - (e - s):] = 1
    padded = DynamicCache()
    for layer_idx, layer in enumerate(packed_cache.layers):
        kv = []
        for t in (layer.keys, layer.values):
            out = t.new_zeros(len(bounds), t.shape[1], longest, t.shape[3])
            for r, (s, e) in enumerate(bounds):
                out[r, :, longest - (e - s):] = t[0, :, s:e]
            kv.append(out)
        padded.update(kv[0], kv[1], layer_idx)
    return padded, mask


@torch.inference_mode()
def previous_generate(engine, requests, max_new_tokens=32, eos_token_id=None, *, do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                      sample_next_tokens=sample_next_tokens):
    batch = engine.prepare(requests)
    limits = [m if m is not None else max_new_tokens for m in batch.max_new_tokens]
    stops = [stop_set("eos_token_id", eos_token_id) | own for own in batch.stop_token_ids]
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                    generators=request_generators(batch.seeds, seed, engine.device))
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    packed = engine.pack(batch, engine.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions))
    packed_cache = DynamicCache()
    logits = engine.prefill_packed(packed, packed_cache)
    positions = torch.stack([packed.position_ids.view(-1, packed.embeds.shape[0])[:, s:e].max() + 1
                             for s, e in segment_bounds(packed.cu_seqlens)]).to(engine.device)
    cache, attention_mask = previous_padded_cache(packed_cache, packed.cu_seqlens, engine.device)
    b = len(limits)
    tokens = sample_next_tokens(logits, **sampling)
    outputs, done = [[] for _ in range(b)], [False] * b
    lm, embed = engine.adapter.language_model, engine.adapter.embed_tokens
    for _ in range(max(limits)):
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                outputs[r].append(t)
                done[r] = t in stops[r] or len(outputs[r]) >= limits[r]
        if all(done):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        hidden = lm(inputs_embeds=embed(tokens)[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                    use_cache=True, **{engine.runner.cache_kwarg: cache}).last_hidden_state
        tokens = sample_next_tokens(engine.adapter.lm_head(hidden[:, -1]), **sampling)
        positions = positions + 1
    return outputs


def midway_stop(tokens: list[int]) -> int:
    """A token first emitted at index >= 1 and before the last: stopping at it cuts the request mid-way."""
    for i in range(1, len(tokens) - 1):
        if tokens[i] not in tokens[:i]:
            return tokens[i]
    raise AssertionError(f"no token to stop at mid-way in {tokens}")


def with_limits_and_stop(make_requests, engine, stop_request: int, limited: dict[int, int], max_new_tokens: int):
    """Requests with per-request limits and a stop token that request ``stop_request`` hits mid-way."""
    free = previous_generate(engine, make_requests(), max_new_tokens=max_new_tokens)
    requests = make_requests()
    for r, limit in limited.items():
        requests[r].max_new_tokens = limit
    requests[stop_request].stop_token_ids = [midway_stop(free[stop_request])]
    return requests


def recording(logits_seen: list):
    """``sample_next_tokens`` that also keeps every logits tensor it is given (one per step)."""
    def sample(logits, **kwargs):
        logits_seen.append(logits.clone())
        return sample_next_tokens(logits, **kwargs)

    return sample


def check_mixed_batch(engine, make_requests, stop_request, limited, max_new_tokens=8):
    requests = with_limits_and_stop(make_requests, engine, stop_request, limited, max_new_tokens)
    want_logits, got_logits = [], []
    want = previous_generate(engine, requests, max_new_tokens=max_new_tokens, sample_next_tokens=recording(want_logits))
    assert len({len(w) for w in want}) >= 2, f"the requests should finish at different steps: {want}"
    assert len(want[stop_request]) < max_new_tokens
    # Every step's logits (every request, finished ones too) equal the previous loop's: positions, cache
    # and mask are right, not just argmax-robust.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("autoselect_fast.engine.engine.sample_next_tokens", recording(got_logits))
        assert engine.generate(copy.deepcopy(requests), max_new_tokens=max_new_tokens, read_every=1).token_ids == want
    assert len(got_logits) == len(want_logits) == max(len(w) for w in want)
    for got_step, want_step in zip(got_logits, want_logits):
        torch.testing.assert_close(got_step, want_step, rtol=1e-5, atol=1e-5)
    for read_every in READ_EVERY:
        got = engine.generate(copy.deepcopy(requests), max_new_tokens=max_new_tokens, read_every=read_every).token_ids
        assert got == want, read_every
    sampling = dict(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    assert engine.generate(requests, max_new_tokens=max_new_tokens, seed=7, **sampling).token_ids == \
        previous_generate(engine, requests, max_new_tokens=max_new_tokens, seed=7, **sampling)
    torch.manual_seed(11)  # no seed: torch's global generator, drawn in the same order
    got = engine.generate(requests, max_new_tokens=max_new_tokens, read_every=3, **sampling).token_ids
    torch.manual_seed(11)
    assert got == previous_generate(engine, requests, max_new_tokens=max_new_tokens, **sampling)
    assert engine.decode_stats["eager_steps"] > 0 and engine.decode_stats["graph_steps"] == 0


# --------------------------------------------------------------------------------------------------
# Equal to the previous decode, token for token
# --------------------------------------------------------------------------------------------------
def llava_requests():
    return [
        Request([1, 5, IMAGE_TOKEN, 6, IMAGE_TOKEN, 7, 8], images=[picture(60), picture(61)]),  # two images
        Request([1, 9, 10, 11]),  # text only
        Request([1, 9, IMAGE_TOKEN, 10, 11, 12, 13, 14, 2], image=picture(62)),
        Request([IMAGE_TOKEN, 3], image=picture(63)),
    ]


def test_llava_decode_equals_previous_decode(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=5)
    check_mixed_batch(engine, llava_requests, stop_request=3, limited={0: 3, 2: 5})


def test_llava_next_decode_equals_previous_decode(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer, keep=7)

    def requests():
        return [
            Request([1, 5, IMAGE_TOKEN, 6, IMAGE_TOKEN, 7], images=[picture(70, NEXT_IMAGES[0]), picture(71, NEXT_IMAGES[1])]),
            Request([1, 12, 13]),
            Request([IMAGE_TOKEN, 3], image=picture(72, NEXT_IMAGES[2])),
        ]

    check_mixed_batch(engine, requests, stop_request=0, limited={1: 4})


def test_qwen_decode_equals_previous_decode(processed, qwen_scorer):
    engine = AutoSelectEngine(tiny_qwen(), qwen_scorer, keep_ratio=0.5, image_processor=image_processor())
    check_mixed_batch(engine, lambda: batch_requests(processed), stop_request=2, limited={0: 3, 3: 6})


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=5)
    requests = llava_requests()
    for r, req in enumerate(requests):
        req.seed = 40 + r
    sampling = dict(max_new_tokens=7, do_sample=True, temperature=1.3, top_k=30)
    together = engine.generate(requests, read_every=2, **sampling).token_ids
    assert together == engine.generate(requests, read_every=5, **sampling).token_ids
    for r in range(len(requests)):
        assert engine.generate([requests[r]], **sampling).token_ids[0] == together[r]
    assert engine.generate(requests[::-1], **sampling).token_ids == together[::-1]


def test_global_generator_ends_where_the_previous_loop_left_it(llava, scorer):
    """Every request stops early (stop tokens from the greedy run), so the loop runs past the last token
    until its read-back; top_k=1 samples the greedy tokens but still draws from torch's global generator."""
    engine = AutoSelectEngine(llava, scorer, keep=5)
    free = previous_generate(engine, llava_requests(), max_new_tokens=12)
    requests = llava_requests()
    for req, tokens in zip(requests, free):
        req.stop_token_ids = [midway_stop(tokens)]
    want = previous_generate(engine, requests, max_new_tokens=12)
    assert max(len(w) for w in want) < 12 and max(len(w) for w in want) % 8  # the read-back after 8 steps does not see the end
    for read_every in (8, 5):
        torch.manual_seed(21)
        got = engine.generate(requests, max_new_tokens=12, do_sample=True, top_k=1, read_every=read_every).token_ids
        after = torch.rand(4)
        torch.manual_seed(21)
        assert previous_generate(engine, requests, max_new_tokens=12, do_sample=True, top_k=1) == want == got
        assert torch.equal(after, torch.rand(4)), read_every


def test_buckets_and_read_every_errors(llava, scorer):
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert batch_bucket(BATCH_BUCKETS[-1] + 1) is None
    assert [capacity_bucket(n) for n in (1, 256, 257, 700, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]
    engine = AutoSelectEngine(llava, scorer, keep=5)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="read_every must be an int >= 1"):
            engine.generate(Request([1, 9, 10]), read_every=bad)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        AutoSelectEngine(llava, scorer, keep=5, cuda_graphs="yes")


# --------------------------------------------------------------------------------------------------
# CUDA: sync-free decode step, graph replay against eager, graphed generation against eager
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_llava(llava, scorer):
    return copy.deepcopy(llava).to("cuda", torch.float16), copy.deepcopy(scorer).to("cuda", torch.float16)


def cuda_requests(engine):
    pixels = [llava_processed(engine, picture(80 + i))["pixel_values"].to("cuda", torch.float16) for i in range(3)]
    return [
        Request([1, 5, IMAGE_TOKEN, 6, IMAGE_TOKEN, 7, 8], images=[ImageInput(pixels[0]), ImageInput(pixels[1])]),
        Request([1, 9, 10, 11]),
        Request([IMAGE_TOKEN, 3], pixel_values=pixels[2]),
    ]


@requires_cuda
def test_cuda_decode_step_is_sync_free_and_graph_replay_equals_eager(cuda_llava):
    model, scorer = cuda_llava
    engine = AutoSelectEngine(model, scorer, keep=5)
    engine.generate(cuda_requests(engine), max_new_tokens=4)  # warm-up: captures the (4, 256) graph
    assert engine.decode_stats["captures"] == 1 and engine.decode_stats["graph_steps"] == 3
    batch = engine.prepare(cuda_requests(engine))
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    packed = engine.pack(batch, engine.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions))
    lengths = packed.cu_seqlens.diff().tolist()
    state = engine.decoder.acquire(len(lengths), max(lengths) + 4)
    try:
        assert state.graph is not None and state.rows == 4
        engine.prefill_packed(packed, state.cache.prefill_writer(lengths))
        state.tokens.copy_(torch.tensor([5, 6, 7, 0], device="cuda"))
        state.positions.copy_(torch.tensor([30, 4, 20, 0], device="cuda"))
        before = {name: getattr(state, name).clone() for name in ("tokens", "positions")}
        cache_before = ([k.clone() for k in state.cache.keys], [v.clone() for v in state.cache.values], state.cache.lengths.clone())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            state.step()  # graph replay
            replayed = (state.logits.clone(), [k.clone() for k in state.cache.keys], state.cache.lengths.clone(), state.positions.clone())
            for name, value in before.items():
                getattr(state, name).copy_(value)
            for dst, src in zip(state.cache.keys + state.cache.values, cache_before[0] + cache_before[1]):
                dst.copy_(src)
            state.cache.lengths.copy_(cache_before[2])
            engine.decoder.model_step(state)  # the same step, eager
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(replayed[0][:3], state.logits[:3], rtol=1e-3, atol=1e-3)
        for k_graph, k_eager in zip(replayed[1], state.cache.keys):
            torch.testing.assert_close(k_graph, k_eager, rtol=1e-3, atol=1e-3)
        assert torch.equal(replayed[2], state.cache.lengths) and torch.equal(replayed[3], state.positions)
        assert state.cache.lengths.tolist() == [n + 1 for n in lengths] + [1]
    finally:
        engine.decoder.release(state)


@requires_cuda
def test_cuda_graphed_generation_equals_eager_generation(cuda_llava):
    model, scorer = cuda_llava
    graphed = AutoSelectEngine(model, scorer, keep=5)
    eager = AutoSelectEngine(model, scorer, keep=5, cuda_graphs=False)
    requests = cuda_requests(graphed)
    requests[0].max_new_tokens = 3
    for kwargs in (dict(), dict(do_sample=True, temperature=1.5, top_k=20, seed=3)):
        assert graphed.generate(requests, max_new_tokens=9, **kwargs).token_ids == eager.generate(requests, max_new_tokens=9, **kwargs).token_ids
    assert graphed.decode_stats["graph_steps"] == 16 and graphed.decode_stats["eager_steps"] == 0
    assert eager.decode_stats["graph_steps"] == 0 and eager.decode_stats["eager_steps"] == 16
