"""The runner (``autoselect_fast.engine.runner``): padding to buckets never changes a real result, eager fallbacks
are counted, concurrent calls through the shared static buffers equal sequential ones.

On CPU the runner's ``"padded"`` mode runs exactly what a CUDA graph would replay (static buffers,
the batch padded to its bucket with one padding segment, fixed ``max_seqlen``), eagerly. Every
padded result is compared with the eager (unpadded) one at fp32, rtol = atol = 1e-5, on the real
transformers classes with small random weights: LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL, mixed batches
holding a text-only request and a two-image request, with buckets chosen around each batch's own
size (exactly on a bucket, one token below it, far below it, above the largest). ``generate``'s prefill
on the padded path (K/V capture into a decode cache): ``tests/test_runner_generate.py``.

The CUDA tests at the end (names contain ``cuda``; skipped without a GPU) check graph replay against
eager within fp16 tolerance for each stage, and a warmed-up graphed call under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine_llava import IMAGE_TOKEN, PINPOINTS, TEXT, VISION
from test_engine_qwen import BATCH as QWEN_BATCH
from test_engine_qwen import SIZES as QWEN_SIZES
from test_engine_qwen import image_input, image_processor, tiny_qwen
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.engine.runner import (
    DEFAULT_REQUEST_BUCKETS,
    Runner,
    RunnerConfig,
    bucket_for,
    prefill_bucket_schedule,
)
from autoselect_fast.modules import Scorer, ScorerConfig

TOL = dict(rtol=1e-5, atol=1e-5)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def picture(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tiny_llava(seed: int = 0):
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=VISION.to_dict(), text_config=TEXT.to_dict(), image_token_id=IMAGE_TOKEN, image_seq_length=16)
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(seed: int = 1):
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=VISION.to_dict(), text_config=TEXT.to_dict(), image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_scorer(input_dim: int, seed: int = 2):
    torch.manual_seed(seed)
    return Scorer(ScorerConfig(input_dim=input_dim, hidden_dim=32, num_layers=1, num_heads=4)).eval()


def llava_requests():
    """One image, text only, two images: three requests of different lengths."""
    return [
        Request([1, 5, 6, IMAGE_TOKEN, 7, 8], image=picture(0)),
        Request([1, 9, 10, 11, 12]),
        Request([1, IMAGE_TOKEN, 13, 14, IMAGE_TOKEN, 2], images=[picture(1), picture(2)]),
    ]


def llava_next_requests():
    """Images of different sizes (2-, 3- and 5-tile layouts), a text-only request, a two-image request."""
    return [
        Request([1, 5, IMAGE_TOKEN, 7], image=picture(10, (40, 30))),
        Request([1, 9, 10, 11, 12, 13]),
        Request([1, IMAGE_TOKEN, 13, IMAGE_TOKEN, 2], images=[picture(11, (20, 60)), picture(12, (56, 56))]),
    ]


def qwen_requests():
    """test_engine_qwen's serving batch: a wide multi-window image, text only, two images, a medium image."""
    proc = image_processor()
    processed = {}
    for i, (name, size) in enumerate(QWEN_SIZES.items()):
        p = proc(images=[picture(i, size)], return_tensors="pt")
        processed[name] = (p["pixel_values"], p["image_grid_thw"][0])
    requests = []
    for names, prompt in QWEN_BATCH:
        names = () if names is None else (names,) if isinstance(names, str) else names
        requests.append(Request(prompt, images=[image_input(processed, n) for n in names]))
    return requests


MODELS = {
    "llava-1.5": (tiny_llava, 32, dict(keep=5), llava_requests),
    "llava-next": (tiny_llava_next, 32, dict(keep=12), llava_next_requests),
    "qwen2.5-vl": (tiny_qwen, 128, dict(keep_ratio=0.3), qwen_requests),
}


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    """``(engine (eager, no runner padding), the packed batch of its mixed requests, the requests)``."""
    build, scorer_dim, keep, make_requests = MODELS[request.param]
    kwargs = {"image_processor": image_processor()} if request.param == "qwen2.5-vl" else {}
    engine = AutoSelectEngine(build(), tiny_scorer(scorer_dim), score_cache_size=0, **keep, **kwargs)
    requests = make_requests()
    return engine, packed_batch(engine, requests), requests


def packed_batch(engine, requests):
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    pruned = engine.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions)
    return engine.pack(batch, pruned)


def padded_runner(engine, **config):
    return Runner(engine.adapter, engine.attention_backend, RunnerConfig(pad_to_buckets=True, **config),
                  scorer=engine.scorer, select=engine.select_fn)


# --------------------------------------------------------------------------------------------------
# Buckets and configuration
# --------------------------------------------------------------------------------------------------
def test_bucket_schedule():
    schedule = prefill_bucket_schedule()
    assert schedule[:16] == tuple(range(32, 513, 32))
    assert schedule[16:24] == tuple(range(576, 1025, 64))
    assert schedule[24:32] == tuple(range(1152, 2049, 128))
    assert schedule[32:] == tuple(range(2304, 4097, 256))
    # padding stays under 1/8 of the tokens above 256 (below, weight reads dominate the cost)
    for tokens in range(257, 4097):
        assert (bucket_for(tokens, schedule) - tokens) / tokens < 0.125
    assert prefill_bucket_schedule(600)[-3:] == (512, 576, 600)
    assert prefill_bucket_schedule(20) == (20,)
    assert bucket_for(32, schedule) == 32 and bucket_for(33, schedule) == 64 and bucket_for(1, schedule) == 32
    assert bucket_for(4097, schedule) is None


def test_config_errors():
    with pytest.raises(ValueError, match="prefill_buckets must be a non-empty list of increasing ints >= 1, got \\[64, 32\\]"):
        RunnerConfig(prefill_buckets=[64, 32])
    with pytest.raises(ValueError, match="request_buckets must be"):
        RunnerConfig(request_buckets=[])
    with pytest.raises(ValueError, match="largest must be an int >= 1"):
        RunnerConfig(largest_prefill_bucket=0)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        RunnerConfig(cuda_graphs="yes")
    with pytest.raises(ValueError, match="max_graphs must be an int >= 0"):
        RunnerConfig(max_graphs=-1)
    with pytest.raises(ValueError, match="mode='reduce-overhead' captures its own CUDA graphs"):
        RunnerConfig(compile_language_model=True, compile_options={"mode": "reduce-overhead"})
    assert RunnerConfig().request_buckets == DEFAULT_REQUEST_BUCKETS


def test_modes_on_cpu():
    engine = AutoSelectEngine(tiny_llava(), tiny_scorer(32), keep=5)
    assert Runner(engine.adapter, engine.attention_backend).mode == "eager"  # graphs asked for, but a CPU cannot replay them
    assert Runner(engine.adapter, engine.attention_backend, RunnerConfig(cuda_graphs=False)).mode == "eager"
    assert padded_runner(engine).mode == "padded"


# --------------------------------------------------------------------------------------------------
# Prefill: padded == unpadded, across bucket boundaries, for the three model families
# --------------------------------------------------------------------------------------------------
def test_padded_prefill_equals_unpadded(setup):
    engine, packed, _ = setup
    tokens, requests = packed.embeds.shape[0], packed.cu_seqlens.numel() - 1
    want = engine.prefill_packed(packed)
    cases = [
        ((tokens,), (requests,)),               # exactly on both buckets: an empty padding segment, no empty ones after it
        ((tokens - 1, tokens + 1), (requests,)),  # one padding token
        ((tokens - 1, 2 * tokens + 7), (1, requests + 1, 64)),  # many padding tokens, one empty segment
        ((8, 3 * tokens), (requests + 5,)),    # a long padding segment and several empty segments
    ]
    for prefill_buckets, request_buckets in cases:
        runner = padded_runner(engine, prefill_buckets=prefill_buckets, request_buckets=request_buckets)
        got = runner.prefill(packed)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL)
        assert runner.stats["prefill"].padded == 1 and not runner.stats["prefill"].eager
    # the same runner, a second batch in another bucket and the first again: the shared buffers are rewritten cleanly
    runner = padded_runner(engine, prefill_buckets=(tokens // 2, tokens, 4 * tokens), request_buckets=(1, 4))
    sub = packed_batch(engine, setup[2][1:2])  # the text-only request alone: a small bucket
    sub_want = engine.prefill_packed(sub)
    for batch, expected in ((packed, want), (sub, sub_want), (packed, want)):
        torch.testing.assert_close(runner.prefill(batch), expected, **TOL)
    assert runner.stats_dict()["prefill"] == {"graph_replays": 0, "captures": 0, "padded": 3, "eager": {}}


def test_batches_that_do_not_fit_run_eagerly_and_are_counted(setup):
    engine, packed, _ = setup
    tokens, requests = packed.embeds.shape[0], packed.cu_seqlens.numel() - 1
    want = engine.prefill_packed(packed)
    above = padded_runner(engine, prefill_buckets=(tokens - 1,))
    torch.testing.assert_close(above.prefill(packed), want, **TOL)
    assert above.stats_dict()["prefill"] == {"graph_replays": 0, "captures": 0, "padded": 0, "eager": {"above_largest_bucket": 1}}
    crowded = padded_runner(engine, prefill_buckets=(2 * tokens,), request_buckets=(requests - 1,))
    torch.testing.assert_close(crowded.prefill(packed), want, **TOL)
    assert crowded.stats["prefill"].eager == {"too_many_requests": 1}
    eager = Runner(engine.adapter, engine.attention_backend, RunnerConfig(cuda_graphs=False))
    torch.testing.assert_close(eager.prefill(packed), want, **TOL)
    assert eager.stats["prefill"].eager == {"graphs_off": 1}


def test_padded_calls_under_a_flop_counter_count_what_runs():
    """A padded call runs every op in Python, so FlopCounterMode sees the padded work (graphs go eager, CUDA test)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = AutoSelectEngine(tiny_llava(), tiny_scorer(32), keep=5, score_cache_size=0)
    packed = packed_batch(engine, llava_requests())  # 29 tokens
    runner = padded_runner(engine, prefill_buckets=(64,))
    with FlopCounterMode(display=False) as eager_counter:
        want = engine.prefill_packed(packed)
    with FlopCounterMode(display=False) as counter:
        got = runner.prefill(packed)
    torch.testing.assert_close(got, want, **TOL)
    assert counter.get_total_flops() > eager_counter.get_total_flops() > 0  # 64 tokens' worth against 29
    assert runner.stats["prefill"].padded == 1


def test_padded_stages_read_no_device_value(monkeypatch):
    """tests/device_values.py's tracker over a whole engine prefill whose runner pads every stage: the padded
    copies, the padding segment and the captured-shape Scorer + selection read nothing on the host (the CPU
    attention loop's own reads of the segment bounds aside, as in tests/test_host_sync.py)."""
    from test_host_sync import engine_reads, llava_requests, tracked_engine

    engine, tracker = tracked_engine(monkeypatch, tiny_llava(), tiny_scorer(32), keep=5, runner_config=RunnerConfig(pad_to_buckets=True))
    requests = llava_requests()
    want = engine.prefill(requests)  # untracked: creates the static buffers
    for tensor in engine.runner.static_tensors():  # on a GPU they live on the device
        tracker.mark(tensor)
    with tracker:
        got = engine.prefill(requests)
    assert [str(r) for r in engine_reads(tracker)] == [] and tracker.syncs == []
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert {stage: s["padded"] for stage, s in engine.runner.stats_dict().items()} == {"prefill": 2, "vision": 2, "prune": 2}


def test_a_dynamic_cache_is_filled_on_the_eager_path(setup):
    from transformers import DynamicCache

    engine, packed, _ = setup
    runner = padded_runner(engine, prefill_buckets=(4 * packed.embeds.shape[0],))
    cache = DynamicCache()
    torch.testing.assert_close(runner.prefill(packed, cache), engine.prefill_packed(packed), **TOL)
    assert cache.get_seq_length() == packed.embeds.shape[0]  # the real tokens only: no padding in the cache
    assert runner.stats["prefill"].eager == {"kv_cache": 1}


def test_compiled_prefill_step_equals_eager():
    """``compile_language_model`` compiles the padded step (Dynamo's eager backend here: the plumbing, not Inductor)."""
    engine = AutoSelectEngine(tiny_llava(), tiny_scorer(32), keep=5, score_cache_size=0)
    packed = packed_batch(engine, llava_requests())
    tokens = packed.embeds.shape[0]
    runner = padded_runner(engine, prefill_buckets=(tokens + 3, 2 * tokens), compile_language_model=True, compile_options={"backend": "eager"})
    want = engine.prefill_packed(packed)
    torch._dynamo.reset()
    for _ in range(2):
        torch.testing.assert_close(runner.prefill(packed), want, **TOL)
    assert runner.stats["prefill"].padded == 2


# --------------------------------------------------------------------------------------------------
# Vision and pruning
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava-1.5", "llava-next"])
def test_padded_vision_equals_the_adapter(family):
    build, dim, keep, _ = MODELS[family]
    engine = AutoSelectEngine(build(), tiny_scorer(dim), **keep)
    sizes = [(40, 30), (20, 60), (56, 56), (30, 30), (60, 20)]
    batch = engine.prepare([Request([1, IMAGE_TOKEN, 4, IMAGE_TOKEN, 5, IMAGE_TOKEN, 6], images=[picture(20 + i, s) for i, s in enumerate(sizes[:3])]),
                            Request([1, IMAGE_TOKEN, 7, IMAGE_TOKEN], images=[picture(30 + i, s) for i, s in enumerate(sizes[3:])])])
    want = engine.adapter.encode(batch.pixel_values, batch.image_sizes)
    tiles = engine.adapter.tower_input(batch.pixel_values).shape[0]  # 5 images; LLaVA-NeXT: 2 to 5 tiles each
    for buckets in [(tiles,), (1, tiles + 3), (2 * tiles, 4 * tiles)]:
        runner = padded_runner(engine, vision_buckets=buckets)
        got = runner.encode(batch.pixel_values, batch.image_sizes)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
        assert runner.stats["vision"].padded == 1
    above = padded_runner(engine, vision_buckets=(tiles - 1,))
    for g, w in zip(above.encode(batch.pixel_values, batch.image_sizes), want):
        torch.testing.assert_close(g, w, **TOL)
    assert above.stats["vision"].eager == {"above_largest_bucket": 1}


def test_qwen_vision_is_not_graphed_here():
    engine = AutoSelectEngine(tiny_qwen(), tiny_scorer(128), keep_ratio=0.3, image_processor=image_processor())
    batch = engine.prepare(qwen_requests())
    runner = padded_runner(engine)
    assert not runner.vision_graphable()
    for g, w in zip(runner.encode(batch.pixel_values, batch.image_sizes), engine.adapter.encode(batch.pixel_values, batch.image_sizes)):
        torch.testing.assert_close(g, w, **TOL)
    assert runner.stats["vision"].eager == {"model_not_graphable": 1}


def test_padded_scorer_and_selection_equal_the_engines_prune():
    """LLaVA-1.5 with a fixed K: every image has N = 16 and K = 5, padded to the image-count bucket."""
    engine = AutoSelectEngine(tiny_llava(), tiny_scorer(32), keep=5, score_cache_size=0)
    batch = engine.prepare(llava_requests())
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    want = engine.prune(features, batch.budgets, positions=batch.token_positions)
    for buckets in [(3,), (2, 4), (8,)]:
        runner = padded_runner(engine, vision_buckets=buckets)
        scores, selection = runner.select(features, batch.budgets, batch.token_positions)
        torch.testing.assert_close(scores, want.scores, **TOL)
        for name in ("indices", "features", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(selection, name), getattr(want.selection, name)), name
        assert runner.stats["prune"].padded == 1
    runner = padded_runner(engine, vision_buckets=(2,))
    assert runner.select(features, batch.budgets, batch.token_positions) is None
    assert runner.select(features, [5, 4, 5], batch.token_positions) is None
    assert runner.stats["prune"].eager == {"above_largest_bucket": 1, "unequal_budgets": 1}


@pytest.mark.parametrize("family", ["llava-next", "qwen2.5-vl"])
def test_selection_of_images_with_different_n_is_left_to_the_engine(family):
    build, dim, keep, make_requests = MODELS[family]
    kwargs = {"image_processor": image_processor()} if family == "qwen2.5-vl" else {}
    engine = AutoSelectEngine(build(), tiny_scorer(dim), **keep, **kwargs)
    batch = engine.prepare(make_requests())
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    assert len({f.shape[0] for f in features}) > 1
    runner = padded_runner(engine)
    assert runner.select(features, batch.budgets, batch.token_positions) is None
    assert runner.stats["prune"].eager == {"dynamic_n": 1}


# --------------------------------------------------------------------------------------------------
# Through the engine: AutoSelectEngine(runner_config=...) pads every stage, results unchanged
# --------------------------------------------------------------------------------------------------
def engine_pair(family, **config):
    """The same model and Scorer behind an eager engine and one whose runner pads to the given buckets."""
    build, dim, keep, make_requests = MODELS[family]
    kwargs = {"image_processor": image_processor()} if family == "qwen2.5-vl" else {}
    model, scorer = build(), tiny_scorer(dim)
    eager = AutoSelectEngine(model, scorer, score_cache_size=0, **keep, **kwargs)
    padded = AutoSelectEngine(model, scorer, score_cache_size=0, runner_config=RunnerConfig(pad_to_buckets=True, **config), **keep, **kwargs)
    return eager, padded, make_requests()


@pytest.mark.parametrize("family", list(MODELS))
def test_engine_prefill_padded_equals_eager(family):
    eager, padded, requests = engine_pair(family, prefill_buckets=(16, 48, 96, 160), request_buckets=(1, 2, 4), vision_buckets=(1, 4, 16))
    assert eager.runner.mode == "eager" and padded.runner.mode == "padded"
    for batch in (requests, requests[:1], requests[1:2], requests[2:]):  # mixed, one image, text only, two images (+ more)
        want, got = eager.prefill(batch), padded.prefill(batch)
        torch.testing.assert_close(got.logits, want.logits, **TOL)
        assert got.sequence_lengths == want.sequence_lengths and got.kept_tokens == want.kept_tokens
        for a, b in zip(got.kept_indices, want.kept_indices):
            assert torch.equal(a, b)
    stats = padded.runner.stats_dict()
    assert stats["prefill"] == {"graph_replays": 0, "captures": 0, "padded": 4, "eager": {}}, stats
    # the vision tower is padded for the LLaVA family; pruning wherever a batch's images share N and K:
    # always for LLaVA-1.5, only the one-image batch for the others (dynamic N)
    assert stats["vision"]["padded"] == (3 if family != "qwen2.5-vl" else 0)
    assert stats["prune"]["padded"] == (3 if family == "llava-1.5" else 1)
    assert stats["prune"]["eager"] == ({} if family == "llava-1.5" else {"dynamic_n": 2})
    assert eager.runner.stats_dict()["prefill"]["eager"] == {"not_cuda": 4}


def test_engine_batch_above_the_largest_bucket_runs_eagerly():
    eager, padded, requests = engine_pair("llava-1.5", prefill_buckets=(16,), vision_buckets=(1, 2))
    want, got = eager.prefill(requests), padded.prefill(requests)  # 3 images, ~25 tokens
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    stats = padded.runner.stats_dict()
    assert stats["prefill"]["eager"] == {"above_largest_bucket": 1} and stats["prefill"]["padded"] == 0
    assert stats["vision"]["eager"] == {"above_largest_bucket": 1} and stats["prune"]["eager"] == {"above_largest_bucket": 1}


def test_cuda_graphs_switch_and_runner_config_errors():
    model, scorer = tiny_llava(), tiny_scorer(32)
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        AutoSelectEngine(model, scorer, keep=5, cuda_graphs=1)
    with pytest.raises(TypeError, match="runner_config must be a RunnerConfig or None, got dict"):
        AutoSelectEngine(model, scorer, keep=5, runner_config={"cuda_graphs": True})
    off = AutoSelectEngine(model, scorer, keep=5, cuda_graphs=False, runner_config=RunnerConfig(pad_to_buckets=True))
    assert off.runner.config.cuda_graphs is False and off.runner.mode == "padded"  # padding without graphs, as asked


# --------------------------------------------------------------------------------------------------
# Threads: one runner, shared static buffers
# --------------------------------------------------------------------------------------------------
def test_concurrent_padded_calls_equal_sequential_ones():
    """Six threads through one runner's shared static buffers (prefill and vision), in shapes of different buckets."""
    engine = AutoSelectEngine(tiny_llava(seed=3), tiny_scorer(32), keep=5, score_cache_size=0)
    requests = llava_requests()
    batches = [requests, requests[:1], requests[1:], [requests[2], requests[0]]]
    packed = [packed_batch(engine, b) for b in batches]
    prepared = [engine.prepare(b) for b in batches]  # every batch holds images
    # buckets that put the batches into different shapes of one set of shared buffers
    runner = padded_runner(engine, prefill_buckets=(8, 16, 24, 32, 64), request_buckets=(1, 2, 4), vision_buckets=(1, 2, 4))
    serial = [runner.prefill(p) for p in packed]
    serial_features = [runner.encode(b.pixel_values, b.image_sizes) for b in prepared]
    for p, s in zip(packed, serial):
        torch.testing.assert_close(s, engine.prefill_packed(p), **TOL)
    mismatches, failures = [], []
    barrier = threading.Barrier(6)

    def worker(offset):
        try:
            barrier.wait()
            for i in range(8):
                k = (offset + i) % len(packed)
                got = runner.prefill(packed[k])
                if not torch.equal(got, serial[k]):
                    mismatches.append(("prefill", k, float((got - serial[k]).abs().max())))
                j = (offset + i) % len(prepared)
                feats = runner.encode(prepared[j].pixel_values, prepared[j].image_sizes)
                if not all(torch.equal(a, b) for a, b in zip(feats, serial_features[j])):
                    mismatches.append(("vision", j))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and mismatches == []
    assert runner.stats["prefill"].padded == len(packed) + 6 * 8 and not runner.stats["prefill"].eager


# --------------------------------------------------------------------------------------------------
# CUDA: graph replay == eager (fp16), captures counted, no synchronisation after warm-up
# --------------------------------------------------------------------------------------------------
FP16 = dict(rtol=2e-2, atol=2e-2)


def cuda_engine(build, scorer_dim, **kwargs):
    """An fp16 CUDA engine whose own stages stay eager (the references); the runners under test are built beside it."""
    model = build().to(device="cuda", dtype=torch.float16)
    scorer = tiny_scorer(scorer_dim).to(device="cuda", dtype=torch.float16)
    return AutoSelectEngine(model, scorer, score_cache_size=0, cuda_graphs=False, **kwargs)


def graph_runner(engine, **config):
    return Runner(engine.adapter, engine.attention_backend, RunnerConfig(**config), scorer=engine.scorer, select=engine.select_fn)


@requires_cuda
@pytest.mark.parametrize("family", list(MODELS))
def test_cuda_prefill_graph_replay_equals_eager(family):
    build, dim, keep, make_requests = MODELS[family]
    kwargs = {"image_processor": image_processor()} if family == "qwen2.5-vl" else {}
    engine = cuda_engine(build, dim, **keep, **kwargs)
    requests = make_requests()
    packed = packed_batch(engine, requests)
    sub = packed_batch(engine, requests[:1])
    runner = graph_runner(engine)
    assert runner.mode == "graphs"
    for batch in (packed, sub, packed, sub):
        torch.testing.assert_close(runner.prefill(batch).float(), engine.prefill_packed(batch).float(), **FP16)
    stats = runner.stats["prefill"]
    assert (stats.captures, stats.graph_replays, dict(stats.eager)) == (2, 4, {}), runner.stats_dict()
    # a graph replays with new inputs in its static buffers: same shape key, other values
    other = packed_batch(engine, requests[1:2] + requests[:1]) if family != "qwen2.5-vl" else packed_batch(engine, requests[3:4])
    torch.testing.assert_close(runner.prefill(other).float(), engine.prefill_packed(other).float(), **FP16)


@requires_cuda
@pytest.mark.parametrize("family", ["llava-1.5", "llava-next"])
def test_cuda_vision_graph_replay_equals_eager(family):
    build, dim, keep, make_requests = MODELS[family]
    engine = cuda_engine(build, dim, **keep)
    runner = graph_runner(engine)
    batches = [engine.prepare(make_requests()), engine.prepare(make_requests()[:1])]
    for batch in batches + batches:
        got = runner.encode(batch.pixel_values, batch.image_sizes)
        want = engine.adapter.encode(batch.pixel_values, batch.image_sizes)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), **FP16)
    stats = runner.stats["vision"]
    assert (stats.captures, stats.graph_replays, dict(stats.eager)) == (2, 4, {}), runner.stats_dict()


@requires_cuda
def test_cuda_prune_graph_replay_equals_eager():
    engine = cuda_engine(tiny_llava, 32, keep=5)
    batch = engine.prepare(llava_requests())
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    runner = graph_runner(engine)
    for _ in range(2):
        want = engine.prune(features, batch.budgets, positions=batch.token_positions)
        scores, selection = runner.select(features, batch.budgets, batch.token_positions)
        torch.testing.assert_close(scores, want.scores, **FP16)
        # the selection is exact given the scores: check it against the reference on the graph's own scores
        from autoselect_fast.reference import select_tokens

        cu = torch.tensor([0, 16, 32, 48])
        ref = select_tokens(scores.cpu(), torch.cat(features).cpu(), 5, cu, positions=batch.token_positions)
        assert torch.equal(selection.indices.cpu(), ref.indices) and torch.equal(selection.position_ids.cpu(), ref.position_ids)
        assert torch.equal(selection.features.cpu(), ref.features) and selection.cu_seqlens.tolist() == [0, 5, 10, 15]
    assert (runner.stats["prune"].captures, runner.stats["prune"].graph_replays) == (1, 2)


@requires_cuda
def test_cuda_graphed_stages_make_no_sync_after_warm_up():
    engine = cuda_engine(tiny_llava, 32, keep=5)
    runner = graph_runner(engine)
    batch = engine.prepare(llava_requests())
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    packed = packed_batch(engine, llava_requests())
    # offsets and positions on the device, as the engine hands them over (host pixels are staged through pinned memory)
    packed.cu_seqlens, packed.last_token_index = packed.cu_seqlens.cuda(), packed.last_token_index.cuda()
    pixels, positions = batch.pixel_values, batch.token_positions.cuda()
    want = (runner.prefill(packed), runner.encode(pixels, batch.image_sizes), runner.select(features, batch.budgets, positions))  # captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = runner.prefill(packed)
        tower = runner.encode(pixels, batch.image_sizes)
        scores, _ = runner.select(features, batch.budgets, positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(logits, want[0], rtol=0, atol=0)
    for g, w in zip(tower, want[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(scores, want[2][0], rtol=0, atol=0)
    assert all(runner.stats[s].graph_replays == 2 for s in ("prefill", "vision", "prune")), runner.stats_dict()


@requires_cuda
def test_cuda_concurrent_graph_replays_equal_sequential_ones():
    engine = cuda_engine(tiny_llava, 32, keep=5)
    requests = llava_requests()
    packed = [packed_batch(engine, b) for b in (requests, requests[:1], requests[1:])]  # 29, 10, 19 tokens; 3, 1, 2 requests
    runner = graph_runner(engine, request_buckets=(1, 2, 4))  # three shape keys: (32, 4), (32, 1), (32, 2)
    serial = [runner.prefill(p) for p in packed]
    torch.cuda.synchronize()  # the inputs and serial results are complete before other streams read them
    failures = []

    def worker(offset):
        stream = torch.cuda.Stream()  # each thread on its own stream: the runner orders them with an event
        with torch.cuda.stream(stream):
            for i in range(10):
                k = (offset + i) % len(packed)
                got = runner.prefill(packed[k])
                stream.synchronize()
                if not torch.equal(got, serial[k]):
                    failures.append(k)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert runner.stats["prefill"].captures == 3


@requires_cuda
def test_cuda_compiled_graphs_equal_eager():
    engine = cuda_engine(tiny_llava, 32, keep=5)
    packed = packed_batch(engine, llava_requests())
    runner = graph_runner(engine, compile_language_model=True)
    torch._dynamo.reset()
    for _ in range(2):
        torch.testing.assert_close(runner.prefill(packed).float(), engine.prefill_packed(packed).float(), **FP16)
    assert (runner.stats["prefill"].captures, runner.stats["prefill"].graph_replays) == (1, 2)


@requires_cuda
def test_cuda_engine_prefill_with_graphs_equals_eager():
    """The default engine on CUDA: all three stages graphed (LLaVA-1.5, fixed K). The reference runs the same
    padded shapes eagerly (``cuda_graphs=False, pad_to_buckets=True``: the very kernels the graphs replay),
    so the top-K decisions cannot flip on fp16 rounding and the kept tokens must be identical."""
    eager = cuda_engine(tiny_llava, 32, keep=5)
    padded = AutoSelectEngine(eager.model, eager.scorer, keep=5, score_cache_size=0, cuda_graphs=False,
                              runner_config=RunnerConfig(pad_to_buckets=True))
    graphed = AutoSelectEngine(eager.model, eager.scorer, keep=5, score_cache_size=0)
    assert (graphed.runner.mode, padded.runner.mode) == ("graphs", "padded")
    requests = llava_requests()
    for batch in (requests, requests[:1], requests):
        want, got = padded.prefill(batch), graphed.prefill(batch)
        torch.testing.assert_close(got.logits.float(), want.logits.float(), **FP16)
        assert got.sequence_lengths == want.sequence_lengths
        assert all(torch.equal(a, b) for a, b in zip(got.kept_indices, want.kept_indices))
    stats = graphed.runner.stats_dict()
    for stage in ("vision", "prune", "prefill"):
        assert stats[stage]["graph_replays"] == 3 and stats[stage]["captures"] == 2 and not stats[stage]["eager"], stats
    # generate's prefill replays a graph of its own (K/V captured into static buffers, then scattered into the decode cache)
    got, want = graphed.generate(requests, max_new_tokens=4), padded.generate(requests, max_new_tokens=4)
    assert got.token_ids == want.token_ids
    prefill = graphed.runner.stats_dict()["prefill"]
    assert (prefill["captures"], prefill["graph_replays"], prefill["eager"]) == (3, 4, {}), prefill


@requires_cuda
def test_cuda_graphed_calls_under_a_flop_counter_run_eagerly():
    """The report counts FLOPs with FlopCounterMode: a replay would hide them, so graphed calls go eager."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = cuda_engine(tiny_llava, 32, keep=5)
    packed = packed_batch(engine, llava_requests())
    runner = graph_runner(engine)
    runner.prefill(packed)  # captured
    with FlopCounterMode(display=False) as eager_counter:
        want = engine.prefill_packed(packed)
    with FlopCounterMode(display=False) as counter:
        got = runner.prefill(packed)
    torch.testing.assert_close(got.float(), want.float(), **FP16)
    assert counter.get_total_flops() == eager_counter.get_total_flops() > 0
    assert runner.stats["prefill"].eager == {"dispatch_mode": 1}


@requires_cuda
def test_cuda_capture_prefill_up_front():
    engine = cuda_engine(tiny_llava, 32, keep=5)
    runner = graph_runner(engine, prefill_buckets=(32, 64), request_buckets=(1, 4))
    assert runner.capture_prefill() == 4
    packed = packed_batch(engine, llava_requests())
    torch.testing.assert_close(runner.prefill(packed).float(), engine.prefill_packed(packed).float(), **FP16)
    assert runner.stats["prefill"].captures == 4  # the served call found its graph


@requires_cuda
def test_cuda_whole_engine_prefill_makes_no_sync_after_warm_up():
    """The default engine (all three stages graphed, LLaVA-1.5): prepare, vision, pruning, packing and the
    prefill of a mixed batch after warm-up, under ``set_sync_debug_mode("error")``."""
    eager = cuda_engine(tiny_llava, 32, keep=5)
    engine = AutoSelectEngine(eager.model, eager.scorer, keep=5, score_cache_size=0)
    requests = llava_requests()
    want = engine.prefill(requests)  # captures
    engine.prefill(requests)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = engine.prefill(requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert all(engine.runner.stats[s].graph_replays == 3 for s in ("vision", "prune", "prefill")), engine.runner.stats_dict()
