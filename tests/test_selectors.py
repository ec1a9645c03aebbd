"""The training-free selectors against their float64 definitions (``autoselect_fast.selectors``), and
the [CLS] attention the adapters give ``visionzip`` against the model's own attention weights.

Every selector is checked through the engine's selection rule (``reference.select_tokens``: top-K,
ties to the lower index, ascending), so what is compared is the set of kept tokens.
"""
import os
import sys

import pytest
import torch

from autoselect_fast import reference
from autoselect_fast.ragged import cu_seqlens_from_lengths
from autoselect_fast.selectors import (
    SELECTORS,
    DivPruneSelector,
    NormSelector,
    RandomSelector,
    SelectorInputs,
    VisionZipSelector,
    divprune_order,
    make_selector,
    reference_divprune,
    reference_norm,
    reference_visionzip,
)


def kept(scores: list, budgets: list) -> list:
    """Indices the engine keeps for these per-image scores (reference.select_tokens), per image."""
    flat = torch.cat(scores)
    cu = cu_seqlens_from_lengths([s.numel() for s in scores])
    sel = reference.select_tokens(flat, None, torch.tensor(budgets), cu)
    bounds = sel.cu_seqlens.tolist()
    return [sel.indices[b:e] - int(cu[i]) for i, (b, e) in enumerate(zip(bounds[:-1], bounds[1:]))]


def inputs(features, budgets, keys=None, **extra):
    return SelectorInputs(features=features, budgets=budgets, keys=keys or [None] * len(features), **extra)


def test_norm_equals_argsort_of_norms():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(n, 12, generator=g) * torch.rand(n, 1, generator=g) for n in (37, 37, 50)]
    budgets = [5, 17, 1]
    got = kept(NormSelector()(inputs(features, budgets)), budgets)
    for f, k, idx in zip(features, budgets, got):
        assert idx.tolist() == reference_norm(f, k).tolist()
    # half precision features: the norm is taken in float32, the choice stays the float64 one
    half = [f.half() for f in features]
    got = kept(NormSelector()(inputs(half, budgets)), budgets)
    assert [i.tolist() for i in got] == [reference_norm(f.float(), k).tolist() for f, k in zip(half, budgets)]


def test_random_is_seeded_per_image():
    g = torch.Generator().manual_seed(1)
    features = [torch.randn(64, 4, generator=g) for _ in range(3)]
    keys = ["a", "b", "c"]
    budgets = [8, 8, 8]
    first = kept(RandomSelector(seed=3)(inputs(features, budgets, keys)), budgets)
    again = kept(RandomSelector(seed=3)(inputs(features, budgets, keys)), budgets)
    other = kept(RandomSelector(seed=4)(inputs(features, budgets, keys)), budgets)
    assert [a.tolist() for a in first] == [b.tolist() for b in again]
    assert all(a.tolist() != b.tolist() for a, b in zip(first, other))
    assert first[0].tolist() != first[1].tolist()  # different images, different draws
    # an image's draw does not depend on the batch it arrives in, nor on its place there
    alone = kept(RandomSelector(seed=3)(inputs([features[2]], [8], ["c"])), [8])
    assert alone[0].tolist() == first[2].tolist()
    # without keys: one generator seeded at construction, reproducible call after call
    s1, s2 = RandomSelector(seed=5), RandomSelector(seed=5)
    assert all(torch.equal(a, b) for _ in range(2) for a, b in zip(s1(inputs(features, budgets)), s2(inputs(features, budgets))))
    # uniform: over many keys every token is kept about K/N of the time
    counts = torch.zeros(64)
    for key in range(400):
        counts[kept(RandomSelector(seed=0)(inputs([features[0]], [8], [key])), [8])[0]] += 1
    assert counts.sum() == 400 * 8 and counts.min() > 20 and counts.max() < 90  # mean 50


def test_random_without_keys_is_one_unbroken_run_per_call_across_threads():
    """Calls without keys from several threads share one generator: each call's draws are one
    consecutive run of it (the draws a lone caller gets for some call), never interleaved with another's."""
    from concurrent.futures import ThreadPoolExecutor

    features = [torch.zeros(16384, 2) for _ in range(6)]
    calls = 32
    sequential = RandomSelector(seed=9)
    want = [torch.cat(sequential(inputs(features, [8] * 6))) for _ in range(calls)]
    shared = RandomSelector(seed=9)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda _: torch.cat(shared(inputs(features, [8] * 6))), range(calls)))
    matches = [[j for j, w in enumerate(want) if torch.equal(g, w)] for g in got]
    assert all(len(m) == 1 for m in matches) and sorted(m[0] for m in matches) == list(range(calls))


@pytest.mark.parametrize("n,d,k", [(30, 6, 7), (41, 16, 12), (9, 3, 9)])
def test_divprune_equals_brute_force_greedy_max_min(n, d, k):
    g = torch.Generator().manual_seed(n)
    features = [torch.randn(n, d, generator=g) for _ in range(3)]
    project = torch.nn.Linear(d, 5, dtype=torch.float32)
    torch.nn.init.normal_(project.weight, generator=g)
    budgets = [k, max(1, k // 2), 1]
    with torch.no_grad():
        scores = DivPruneSelector()(inputs(features, budgets, project=project))
        for f, kk, idx in zip(features, budgets, kept(scores, budgets)):
            assert idx.tolist() == reference_divprune(project(f), kk).tolist()


def test_divprune_order_is_greedy_prefix_and_skips_chosen_tokens():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 25, 4, generator=g)
    long, short = divprune_order(x, 20), divprune_order(x, 6)
    assert torch.equal(long[:, :6], short)  # the first K picks do not depend on the budget
    # duplicated tokens: every distance to a chosen copy is 0, still no token is chosen twice
    dup = torch.cat([x[:, :3]] * 4, dim=1)  # 12 tokens, 3 distinct
    order = divprune_order(dup, 12)
    assert all(len(set(row.tolist())) == 12 for row in order)
    assert sorted(order[0, :3].tolist()) == sorted(reference_divprune(dup[0], 3).tolist())
    with pytest.raises(ValueError, match="1 <= steps <= N"):
        divprune_order(x, 26)


def test_visionzip_scores_are_the_cls_attention():
    attention = [torch.rand(20), torch.rand(20)]
    features = [torch.zeros(20, 2), torch.zeros(20, 2)]
    got = kept(VisionZipSelector()(inputs(features, [4, 9], cls_attention=attention)), [4, 9])
    assert [i.tolist() for i in got] == [reference_visionzip(a, k).tolist() for a, k in zip(attention, [4, 9])]
    with pytest.raises(ValueError, match="cls_attention"):
        VisionZipSelector()(inputs(features, [4, 9]))


def test_make_selector_checks_its_arguments():
    assert [make_selector(name, scorer=None).name for name in SELECTORS if name != "scorer"] == ["random", "norm", "divprune", "visionzip"]
    with pytest.raises(ValueError, match="selector must be one of"):
        make_selector("fastv")
    with pytest.raises(ValueError, match="needs a Scorer"):
        make_selector("scorer")
    with pytest.raises(TypeError, match="seed must be an int"):
        make_selector("random", seed="1")


# --------------------------------------------------------------------------------------------------
# The [CLS] attention of the feature layer, against the model's own attention weights
# --------------------------------------------------------------------------------------------------
def tiny_llava(layers: int, feature_layer: int = -2, strategy: str = "default"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4, image_size=28, patch_size=7)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=40)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=39, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy)
    config.vision_config._attn_implementation = "eager"  # so the tower returns its attention weights
    return LlavaForConditionalGeneration(config).double().eval()


def cls_attention_by_hand(model, layer: int, hidden):
    """VisionZip's score of every token, head by head in float64: softmax_j(q_cls . k_j / sqrt(d)) summed over heads."""
    block = model.model.vision_tower.encoder.layers[layer]
    heads, d = block.self_attn.num_heads, block.self_attn.head_dim
    x = torch.nn.functional.layer_norm(hidden, (hidden.shape[-1],), block.layer_norm1.weight, block.layer_norm1.bias, block.layer_norm1.eps)
    q = x[0] @ block.self_attn.q_proj.weight.T + block.self_attn.q_proj.bias
    k = x @ block.self_attn.k_proj.weight.T + block.self_attn.k_proj.bias
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for h in range(heads):
        logits = k[:, h * d:(h + 1) * d] @ q[h * d:(h + 1) * d] / d ** 0.5
        total += torch.softmax(logits, dim=0)
    return total


@pytest.mark.parametrize("layers,feature_layer,strategy", [(3, -2, "default"), (3, -1, "full"), (1, -2, "default")])
def test_clip_cls_attention_is_the_model_attention(layers, feature_layer, strategy):
    from autoselect_fast.models import get_adapter

    model = tiny_llava(layers, feature_layer, strategy)
    adapter = get_adapter(model)
    assert adapter.cls_attention_unavailable() is None
    pixels = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        features, attention = adapter.encode_with_cls_attention(list(pixels), [None, None])
    f = feature_layer % (layers + 1)
    # VisionZip: the attention of the layer that computed the features (attentions[f-1] with hidden_states[f]);
    # features from the embeddings (f = 0) take the first layer's.
    layer = max(f - 1, 0)
    first = 1 if strategy == "default" else 0  # the [CLS] column is dropped with the [CLS] token
    by_hand = torch.stack([cls_attention_by_hand(model, layer, out.hidden_states[layer][i]) for i in range(2)])[:, first:]
    own = out.attentions[layer][:, :, 0, first:].sum(1)  # the model's own weights (its softmax runs in float32)
    for i in range(2):
        assert features[i].shape == (16 + (strategy == "full"), 16)
        torch.testing.assert_close(features[i], out.hidden_states[f][i, first:], rtol=0, atol=0)
        torch.testing.assert_close(attention[i], by_hand[i], rtol=0, atol=1e-13)
        torch.testing.assert_close(attention[i], own[i], rtol=0, atol=1e-7)
        assert reference_visionzip(own[i], 5).tolist() == reference_visionzip(by_hand[i], 5).tolist()
    # and the selector's choice through the engine's rule is the definition's
    scores = VisionZipSelector()(inputs(features, [5, 5], cls_attention=attention))
    assert [k.tolist() for k in kept(scores, [5, 5])] == [reference_visionzip(by_hand[i], 5).tolist() for i in range(2)]


def test_visionzip_is_refused_where_there_is_no_cls_attention():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from autoselect_fast.models import get_adapter

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, spatial_merge_size=2,
                           patch_size=14, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                         vocab_size=50, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=45, video_token_id=46, vision_start_token_id=47, vision_end_token_id=48)
    adapter = get_adapter(Qwen2_5_VLForConditionalGeneration(config))
    with pytest.raises(ValueError, match=r"selector='visionzip' .* Qwen2_5_VLForConditionalGeneration .* no \[CLS\] token"):
        VisionZipSelector().check_model(adapter)
    layered = get_adapter(tiny_llava(3, feature_layer=[-3, -2]))  # features of two layers: no single attention
    with pytest.raises(ValueError, match=r"list of layers \(\[-3, -2\]\)"):
        VisionZipSelector().check_model(layered)


# --------------------------------------------------------------------------------------------------
# Through the engine: the selector's choice, with the engine's contract (order, positions, packing)
# --------------------------------------------------------------------------------------------------
sys.path.insert(0, os.path.dirname(__file__))
from test_engine_llava import (  # noqa: E402 - the LLaVA fixtures and hand-built references
    BASE_TOKENS,
    IMAGE_TOKEN,
    PINPOINTS,
    PROMPTS,
    TEXT,
    VISION,
    llava,
    model_image_features,
    picture,
    processed,
    pruned_sequence,
    reference_logits,
    scorer,
)


def expected_kept(engine, name, image, k):
    """What the selector's definition keeps of the engine's own features of ``image``."""
    from autoselect_fast.engine import Request

    batch = engine.prepare(Request([1, 127, 2], image=image))
    features, attention = engine.encode_images(batch.pixel_values, batch.image_sizes, cls_attention=True)
    f = features[0]
    if name == "norm":
        return reference_norm(f, k)
    if name == "divprune":
        with torch.no_grad():
            return reference_divprune(engine.adapter.project(f), k)
    if name == "visionzip":
        return reference_visionzip(attention[0], k)
    scores = make_selector("random", seed=0)(inputs([f], [k], batch.image_keys))  # seeded by the image's pixel key
    return reference_visionzip(scores[0], k)  # (top-k, ties to the lower index)


@pytest.mark.parametrize("name", ["random", "norm", "divprune", "visionzip"])
def test_engine_keeps_the_selectors_choice_with_the_same_contract(llava, name):
    """Kept tokens = the definition's; logits = the unmodified model fed those tokens at their original
    positions (the hand-built reference of tests/test_engine_llava.py)."""
    from autoselect_fast.engine import AutoSelectEngine, Request

    engine = AutoSelectEngine(llava, keep=5, selector=name)
    image, prompt = picture(3), PROMPTS[0]
    out = engine.prefill(Request(prompt, image=image))
    kept = out.kept_indices[0]
    assert kept.tolist() == expected_kept(engine, name, image, 5).tolist()
    assert out.kept_tokens == [5]
    embeds, positions = pruned_sequence(llava, prompt, model_image_features(llava, **processed(engine, image))[0], kept.tolist(), "original")
    torch.testing.assert_close(out.logits[0], reference_logits(llava, embeds, positions), rtol=1e-5, atol=1e-5)


def test_engine_selector_arguments(llava, scorer):
    from autoselect_fast.engine import AutoSelectEngine, Request

    everything = AutoSelectEngine(llava)  # no Scorer, no budget: every token, nothing to choose
    assert everything.prefill(Request(PROMPTS[0], image=picture(1))).kept_tokens == [16]
    with pytest.raises(ValueError, match="needs a Scorer"):
        AutoSelectEngine(llava, keep=4)
    with pytest.raises(ValueError, match="selector must be one of"):
        AutoSelectEngine(llava, scorer, keep=4, selector="fastv")
    with pytest.raises(TypeError, match="scorer must be an autoselect_fast.modules.Scorer"):
        AutoSelectEngine(llava, "scorer.pt", keep=4)
    # a training-free selector ignores a Scorer passed along
    assert AutoSelectEngine(llava, scorer, keep=4, selector="norm").scorer is None


def test_engine_caches_budget_dependent_scores_per_budget(llava):
    """DivPrune's scores depend on K: a cached image asked with a larger K gets that K's greedy set."""
    from autoselect_fast.engine import AutoSelectEngine, Request

    engine = AutoSelectEngine(llava, keep=3, selector="divprune")
    image = picture(5)
    batch = engine.prepare(Request(PROMPTS[0], image=image))
    features = engine.encode_images(batch.pixel_values)
    small = engine.prune(features, [3], keys=batch.image_keys).kept_indices()[0]
    large = engine.prune(features, [9], keys=batch.image_keys).kept_indices()[0]
    with torch.no_grad():
        projected = engine.adapter.project(features[0])
    assert small.tolist() == reference_divprune(projected, 3).tolist()
    assert large.tolist() == reference_divprune(projected, 9).tolist()
    assert engine.scored_images == 2
    engine.prune(features, [9], keys=batch.image_keys)
    assert engine.scored_images == 2  # (key, K) cached


def test_visionzip_on_llava_next_ranks_every_tiles_cls_attention():
    """LLaVA-NeXT: a token's score is its own tile's [CLS] attention (the model's own weights), one K over all tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from autoselect_fast.engine import AutoSelectEngine, Request

    torch.manual_seed(1)
    config = LlavaNextConfig(vision_config=VISION.to_dict(), text_config=TEXT.to_dict(), image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
    config.vision_config._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration(config).eval()
    engine = AutoSelectEngine(model, keep=7, selector="visionzip")
    image = picture(4, size=(50, 30))
    out = engine.prefill(Request(PROMPTS[0], image=image))
    batch = engine.prepare(Request(PROMPTS[0], image=image))
    pixels = batch.pixel_values[0]
    layout = batch.layouts[0]
    with torch.no_grad():
        attn = model.model.vision_tower(pixels, output_attentions=True).attentions
    per_tile = attn[max(config.vision_feature_layer % (VISION.num_hidden_layers + 1) - 1, 0)][:, :, 0, 1:].sum(1)  # (tiles, P)
    by_token = per_tile.reshape(-1)[layout.source_index]
    assert out.kept_indices[0].tolist() == reference_visionzip(by_token, 7).tolist()
    assert len(out.kept_indices[0]) == 7 and layout.num_tokens > 2 * BASE_TOKENS  # base tile + crops


def test_divprune_on_qwen_uses_the_merger_and_visionzip_is_refused():
    """Qwen2.5-VL: DivPrune compares merged tokens (the merger is the projector); images of mixed sizes."""
    from test_engine_qwen import image_processor, image_prompt, tiny_qwen
    from test_engine_qwen import picture as qwen_picture

    from autoselect_fast.engine import AutoSelectEngine, Request

    model = tiny_qwen()
    engine = AutoSelectEngine(model, keep_ratio=0.3, selector="divprune", image_processor=image_processor())
    requests = [Request(image_prompt(9, 10), image=qwen_picture(0, (84, 56))), Request(image_prompt(11), image=qwen_picture(1, (56, 112)))]
    out = engine.prefill(requests)
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    assert len({f.shape[0] for f in features}) == 2
    for f, kept in zip(features, out.kept_indices):
        with torch.no_grad():
            merged = model.model.visual.merger(f.reshape(-1, model.config.vision_config.hidden_size))
        assert kept.tolist() == reference_divprune(merged, max(1, round(0.3 * f.shape[0]))).tolist()
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        AutoSelectEngine(model, keep=4, selector="visionzip")
