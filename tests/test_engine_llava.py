"""AutoSelectEngine on LLaVA-1.5 and LLaVA-NeXT: the real transformers classes, small random weights.

References are built by hand from the unmodified transformers model: its own (projected) image
features, ``inputs_embeds`` holding only the kept tokens, explicit position ids with the gaps, and an
explicit all-ones attention mask (without it transformers would read the position gaps as packed
sequence boundaries). Tolerances: fp32, rtol = atol = 1e-5 on logits (observed differences ~1e-7).
"""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from autoselect_fast.engine import AutoSelectEngine, Request, build_requests
from autoselect_fast.models import ImageLayout
from autoselect_fast.modules import Scorer, ScorerConfig
from autoselect_fast.reference import hard_topk_indices

IMAGE_TOKEN = 127
TOL = dict(rtol=1e-5, atol=1e-5)
VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
TEXT = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
BASE_TOKENS = 16  # (28 / 7)² tokens per tile


def picture(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=VISION.to_dict(), text_config=TEXT.to_dict(), image_token_id=IMAGE_TOKEN, image_seq_length=16)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(1)
    config = LlavaNextConfig(vision_config=VISION.to_dict(), text_config=TEXT.to_dict(), image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(2)
    return Scorer(ScorerConfig(input_dim=32, hidden_dim=32, num_layers=1, num_heads=4)).eval()


# --------------------------------------------------------------------------------------------------
# Hand-built references from the unmodified model
# --------------------------------------------------------------------------------------------------
def model_image_features(model, **inputs) -> list[torch.Tensor]:
    """The model's own projected features per image (LLaVA-NeXT: arranged, with newlines)."""
    with torch.no_grad():
        out = model.model.get_image_features(**inputs)
    return list(getattr(out, "pooler_output", out))


def processed(engine, image):
    out = engine.adapter.default_image_processor()(images=image, return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values", "image_sizes")}


def full_logits(model, prompt, num_slots, inputs):
    """Unmodified model on the expanded prompt: last-token logits."""
    a = prompt.index(IMAGE_TOKEN)
    ids = torch.tensor([prompt[:a] + [IMAGE_TOKEN] * num_slots + prompt[a + 1:]])
    with torch.no_grad():
        return model(input_ids=ids, **inputs).logits[0, -1]


def pruned_sequence(model, prompt, image_embeds, kept_slots, mode):
    """inputs_embeds and positions of the pruned prompt: text, the image's kept slots, text."""
    a = prompt.index(IMAGE_TOKEN)
    before, after = torch.tensor(prompt[:a]), torch.tensor(prompt[a + 1:])
    embed = model.get_input_embeddings()
    kept_slots = torch.as_tensor(sorted(kept_slots))
    with torch.no_grad():
        embeds = torch.cat([embed(before), image_embeds[kept_slots], embed(after)])
    if mode == "original":
        positions = torch.cat([torch.arange(a), a + kept_slots, a + image_embeds.shape[0] + torch.arange(after.numel())])
    else:
        positions = torch.arange(embeds.shape[0])
    return embeds, positions


def reference_logits(model, embeds, positions):
    with torch.no_grad():
        out = model(inputs_embeds=embeds[None], position_ids=positions[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
    return out.logits[0, -1]


def stepwise_greedy(model, embeds, positions, steps):
    """No cache: a full forward over the pruned sequence plus the generated tokens at every step."""
    tokens = []
    for _ in range(steps):
        token = int(reference_logits(model, embeds, positions).argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
        positions = torch.cat([positions, positions.max()[None] + 1])
    return tokens


def next_kept_slots(image_embeds, newline, kept_tokens):
    """Slots kept under the newline rule, derived from the model's own arranged features."""
    is_newline = (image_embeds == newline).all(-1)
    token_slots = torch.nonzero(~is_newline)[:, 0]
    kept = set(token_slots[kept_tokens].tolist())
    row = []
    for slot in range(BASE_TOKENS, image_embeds.shape[0]):
        if is_newline[slot]:
            if kept.intersection(row):
                kept.add(slot)
            row = []
        else:
            row.append(slot)
    return kept


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------------
PROMPTS = [[1, 5, 6, IMAGE_TOKEN, 7, 8], [1, 9, IMAGE_TOKEN, 10, 11, 12, 13, 14, 2], [IMAGE_TOKEN, 3]]


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_keep_all_equals_unmodified_model(llava, scorer, mode):
    engine = AutoSelectEngine(llava, scorer, position_mode=mode)
    images = [picture(i) for i in range(3)]
    expanded = PROMPTS[1][:2] + [IMAGE_TOKEN] * 16 + PROMPTS[1][3:]  # an already expanded placeholder
    out = engine.prefill(build_requests([PROMPTS[0], expanded, PROMPTS[2]], images))
    assert out.kept_tokens == out.visual_tokens == [16, 16, 16]
    assert engine.scorer_calls == 0  # keeping every token needs no scores
    for r, (prompt, image) in enumerate(zip(PROMPTS, images)):
        torch.testing.assert_close(out.logits[r], full_logits(llava, prompt, 16, processed(engine, image)), **TOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_pruned_equals_hand_built_reference(llava, scorer, mode):
    engine = AutoSelectEngine(llava, scorer, keep=5, position_mode=mode)
    image, prompt = picture(3), PROMPTS[0]
    out = engine.prefill(Request(prompt, image=image))
    kept = out.kept_indices[0]
    # The engine kept the Scorer's top-5 of the model's pre-projector features.
    inputs = processed(engine, image)
    features = engine.encode_images([inputs["pixel_values"][0]])[0]
    with torch.no_grad():
        assert torch.equal(kept, hard_topk_indices(scorer(features), 5)[0])
    assert out.kept_tokens == [5] and out.sequence_lengths == [len(prompt) - 1 + 5]
    embeds, positions = pruned_sequence(llava, prompt, model_image_features(llava, **inputs)[0], kept.tolist(), mode)
    torch.testing.assert_close(out.logits[0], reference_logits(llava, embeds, positions), **TOL)
    assert int(out.next_positions[0]) == int(positions.max()) + 1
    # Pruning changes the answer's inputs: the reference is not trivially the full model.
    assert not torch.allclose(out.logits[0], full_logits(llava, prompt, 16, inputs), atol=1e-3)


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_generation_equals_stepwise_reference(llava, scorer, mode):
    engine = AutoSelectEngine(llava, scorer, keep=6, position_mode=mode)
    images, prompts = [picture(4), picture(5)], [PROMPTS[1], PROMPTS[0]]  # different lengths: padded decode
    result = engine.generate(build_requests(prompts, images), max_new_tokens=10)
    generated, kept = result.token_ids, result.prefill.kept_indices
    for r, (prompt, image) in enumerate(zip(prompts, images)):
        features = model_image_features(llava, **processed(engine, image))[0]
        embeds, positions = pruned_sequence(llava, prompt, features, kept[r].tolist(), mode)
        assert generated[r] == stepwise_greedy(llava, embeds, positions, 10)


def test_llava_generation_stops_at_eos(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=6)
    requests = build_requests([PROMPTS[0], PROMPTS[1]], [picture(4), picture(5)])
    free = engine.generate(requests, max_new_tokens=8).token_ids
    eos = free[0][2]
    stopped = engine.generate(requests, max_new_tokens=8, eos_token_id=eos).token_ids
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_packed_batch_equals_each_request_alone(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=7)
    images = [picture(6), picture(7), picture(8)]
    batch = engine.prefill(build_requests(PROMPTS, images))
    assert len(set(batch.sequence_lengths)) == 3
    for r, (prompt, image) in enumerate(zip(PROMPTS, images)):
        alone = engine.prefill(Request(prompt, image=image))
        torch.testing.assert_close(batch.logits[r], alone.logits[0], **TOL)
        assert torch.equal(batch.kept_indices[r], alone.kept_indices[0])


def test_selection_positions_are_the_full_sequence_positions(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=4)
    batch = engine.prepare(build_requests(PROMPTS[:2], [picture(9), picture(10)]))
    features = engine.encode_images(batch.pixel_values)
    pruned = engine.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions)
    packed = engine.pack(batch, pruned)
    for r, kept in enumerate(pruned.kept_indices()):
        a = int(batch.insert_at[r])
        assert torch.equal(pruned.selection.position_ids[4 * r: 4 * r + 4], a + kept)
        seq = packed.position_ids[int(packed.cu_seqlens[r]): int(packed.cu_seqlens[r + 1])]
        assert torch.equal(seq[a: a + 4], a + kept)
    logits = engine.prefill_packed(packed)
    torch.testing.assert_close(logits, engine.prefill(build_requests(PROMPTS[:2], [picture(9), picture(10)])).logits, **TOL)


def test_second_turn_reuses_cached_scores(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=5)
    calls = []
    hook = engine.scorer.register_forward_hook(lambda *args: calls.append(1))
    try:
        image = picture(11)
        first = engine.prefill(Request(PROMPTS[0], image=image))
        second = engine.prefill(Request(PROMPTS[1], image=image))  # another question, same image
        assert engine.scorer_calls == len(calls) == 1
        assert torch.equal(first.kept_indices[0], second.kept_indices[0])
        engine.prefill(build_requests(PROMPTS[:2], [image, picture(12)]))  # one cached, one new image
        assert engine.scorer_calls == len(calls) == 2 and engine.scored_images == 2
        # An explicit image id is the key, whatever the pixels.
        engine.prefill(Request(PROMPTS[0], image=picture(13), image_id="cat.jpg"))
        engine.prefill(Request(PROMPTS[2], image=picture(13), image_id="cat.jpg"))
        assert engine.scorer_calls == len(calls) == 3
        engine.clear_score_cache()
        engine.prefill(Request(PROMPTS[0], image=image))
        assert engine.scorer_calls == len(calls) == 4
    finally:
        hook.remove()


def test_no_pixel_hash_without_a_score_cache(llava, scorer, monkeypatch):
    """Hashing an image's pixels (host work, a device read for GPU pixels) happens only for the score cache:
    with ``score_cache_size=0`` prepare computes no fingerprint and the logits are the cached engine's."""
    from autoselect_fast.engine import request as request_module

    hashed = []
    real = request_module.image_fingerprint
    monkeypatch.setattr(request_module, "image_fingerprint", lambda *a, **k: hashed.append(1) or real(*a, **k))
    requests = build_requests(PROMPTS[:2], [picture(21), picture(22)])
    uncached = AutoSelectEngine(llava, scorer, keep=5, score_cache_size=0)
    batch = uncached.prepare(requests)
    assert hashed == [] and batch.image_keys == [None, None]
    cached = AutoSelectEngine(llava, scorer, keep=5)
    assert len(cached.prepare(requests).image_keys) == 2 and len(hashed) == 2
    torch.testing.assert_close(uncached.prefill(requests).logits, cached.prefill(requests).logits, rtol=0, atol=0)


def test_pixel_values_and_string_prompts(llava, scorer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "USER:": 1, "what": 5, "is": 6, "this?": 7, "ASSISTANT:": 8, "<image>": IMAGE_TOKEN}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    engine = AutoSelectEngine(llava, scorer, keep=5, tokenizer=tokenizer)
    image = picture(14)
    from_text = engine.prefill(Request("USER: <image> what is this? ASSISTANT:", image=image))
    pixel_values = processed(engine, image)["pixel_values"]
    from_ids = engine.prefill(Request(torch.tensor([[1, IMAGE_TOKEN, 5, 6, 7, 8]]), pixel_values=pixel_values))
    torch.testing.assert_close(from_text.logits, from_ids.logits, rtol=0, atol=0)


def test_keep_ratio(llava, scorer):
    out = AutoSelectEngine(llava, scorer, keep_ratio=0.3).prefill(Request(PROMPTS[0], image=picture(15)))
    assert out.kept_tokens == [5] and out.kept_indices[0].numel() == 5  # round(0.3 * 16)


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT
# --------------------------------------------------------------------------------------------------
NEXT_IMAGES = [(40, 30), (20, 60), (56, 56)]  # (width, height): wide, tall, square


def test_llava_next_arrangement_is_the_models_own(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer)
    newline = llava_next.model.image_newline
    for i, size in enumerate(NEXT_IMAGES):
        inputs = processed(engine, picture(20 + i, size))
        layout = engine.adapter.layout(inputs["image_sizes"][0])
        own = model_image_features(llava_next, **inputs)[0]
        assert own.shape[0] == layout.num_slots
        with torch.no_grad():
            ours = engine.adapter.project(engine.encode_images([inputs["pixel_values"][0]], inputs["image_sizes"].tolist())[0])
        torch.testing.assert_close(ours, own[layout.token_slot], **TOL)
        assert torch.equal(own[layout.newline_slot], newline.expand(layout.newline_slot.numel(), -1))
        assert layout.num_tokens == BASE_TOKENS + int((layout.token_row >= 0).sum())


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_next_keep_all_equals_unmodified_model(llava_next, scorer, mode):
    engine = AutoSelectEngine(llava_next, scorer, position_mode=mode)
    images = [picture(30 + i, size) for i, size in enumerate(NEXT_IMAGES)]
    out = engine.prefill(build_requests(PROMPTS, images))
    for r, (prompt, image) in enumerate(zip(PROMPTS, images)):
        inputs = processed(engine, image)
        slots = model_image_features(llava_next, **inputs)[0].shape[0]
        assert out.sequence_lengths[r] == len(prompt) - 1 + slots
        torch.testing.assert_close(out.logits[r], full_logits(llava_next, prompt, slots, inputs), **TOL)


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_next_pruned_equals_hand_built_reference(llava_next, scorer, mode):
    engine = AutoSelectEngine(llava_next, scorer, keep=12, position_mode=mode)
    images = [picture(40, NEXT_IMAGES[0]), picture(41, NEXT_IMAGES[1])]
    out = engine.prefill(build_requests(PROMPTS[:2], images))
    newline = llava_next.model.image_newline
    dropped_rows = 0
    for r, (prompt, image) in enumerate(zip(PROMPTS, images)):
        inputs = processed(engine, image)
        own = model_image_features(llava_next, **inputs)[0]
        kept_slots = next_kept_slots(own, newline, out.kept_indices[r])
        rows = int((own == newline).all(-1).sum())
        kept_newlines = len(kept_slots) - 12
        dropped_rows += rows - kept_newlines
        assert out.kept_tokens[r] == 12 and out.sequence_lengths[r] == len(prompt) - 1 + len(kept_slots)
        embeds, positions = pruned_sequence(llava_next, prompt, own, kept_slots, mode)
        torch.testing.assert_close(out.logits[r], reference_logits(llava_next, embeds, positions), **TOL)
    assert dropped_rows > 0  # the rule is exercised: some rows lost every token (and their newline)


def test_llava_next_generation_equals_stepwise_reference(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer, keep=20)
    images, prompts = [picture(42, NEXT_IMAGES[1]), picture(43, NEXT_IMAGES[2])], [PROMPTS[0], PROMPTS[1]]
    result = engine.generate(build_requests(prompts, images), max_new_tokens=8)
    generated = result.token_ids
    for r, (prompt, image) in enumerate(zip(prompts, images)):
        own = model_image_features(llava_next, **processed(engine, image))[0]
        kept_slots = next_kept_slots(own, llava_next.model.image_newline, result.prefill.kept_indices[r])
        embeds, positions = pruned_sequence(llava_next, prompt, own, kept_slots, "original")
        assert generated[r] == stepwise_greedy(llava_next, embeds, positions, 8)


def test_newline_rule_on_a_layout():
    """Base tokens 0-3 (no newline), then rows of tokens {4,5,6} and {7,8,9}, each closed by a newline:
    slots 0..11 = t0 t1 t2 t3 | t4 t5 t6 NL | t7 t8 t9 NL."""
    slots = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 9, 10])
    layout = ImageLayout(
        source_index=torch.arange(10), token_slot=slots,
        token_row=torch.tensor([-1, -1, -1, -1, 0, 0, 0, 1, 1, 1]), newline_slot=torch.tensor([7, 11]),
    )
    assert (layout.num_tokens, layout.num_slots) == (10, 12)
    only_base = layout.kept_slots(torch.tensor([1, 3]))
    assert only_base[0].tolist() == [1, 3] and not bool(only_base[1].any())
    second_row = layout.kept_slots(torch.tensor([0, 8]))
    assert second_row[0].tolist() == [0, 9, 11] and second_row[1].tolist() == [False, False, True]
    both = layout.kept_slots(torch.tensor([5, 7]))
    assert both[0].tolist() == [5, 7, 8, 11] and both[1].tolist() == [False, True, False, True]


def test_llava_next_keep_is_one_budget_over_all_tiles(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer, keep=BASE_TOKENS + 1)  # more than one tile holds
    out = engine.prefill(Request(PROMPTS[0], image=picture(44, NEXT_IMAGES[0])))
    assert out.kept_tokens == [BASE_TOKENS + 1] and out.visual_tokens == [64]
    with pytest.raises(ValueError, match="keep=65 exceeds the image's 64 visual tokens"):
        AutoSelectEngine(llava_next, scorer, keep=65).prefill(Request(PROMPTS[0], image=picture(44, NEXT_IMAGES[0])))


# --------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------
def test_argument_errors(llava, scorer):
    with pytest.raises(TypeError, match=r"model must be one of \('LlavaForConditionalGeneration', 'LlavaNextForConditionalGeneration', 'Qwen2_5_VLForConditionalGeneration'\), got LlamaForCausalLM"):
        AutoSelectEngine(LlamaForCausalLM(TEXT), scorer)
    with pytest.raises(ValueError, match="input_dim=48.*width 32"):
        AutoSelectEngine(llava, Scorer(ScorerConfig(input_dim=48, hidden_dim=32, num_layers=1, num_heads=4)))
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        AutoSelectEngine(llava, scorer, keep=0)
    with pytest.raises(ValueError, match="keep or keep_ratio, not both"):
        AutoSelectEngine(llava, scorer, keep=3, keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"keep_ratio must be a float in \(0, 1\]"):
        AutoSelectEngine(llava, scorer, keep_ratio=1.5)
    with pytest.raises(ValueError, match="position_mode must be one of"):
        AutoSelectEngine(llava, scorer, position_mode="shifted")
    with pytest.raises(ValueError, match="selection_backend must be one of"):
        AutoSelectEngine(llava, scorer, selection_backend="cuda")

    engine = AutoSelectEngine(llava, scorer, keep=4)
    image = picture(50)
    with pytest.raises(ValueError, match="keep=17 exceeds the 16 visual tokens of every image of this model"):
        AutoSelectEngine(llava, scorer, keep=17)  # N is fixed: refused when the engine is built
    with pytest.raises(ValueError, match=r"2 image\(s\) and 3 prompt\(s\)"):
        build_requests(PROMPTS, [image, image])
    with pytest.raises(ValueError, match="request 0 has no image token"):
        engine.prefill(Request([1, 2, 3], image=image))
    with pytest.raises(ValueError, match="2 separate image-token runs"):
        engine.prefill(Request([1, IMAGE_TOKEN, 2, IMAGE_TOKEN], image=image))
    with pytest.raises(ValueError, match="run of 5 image tokens.*expanded run of 16"):
        engine.prefill(Request([1] + [IMAGE_TOKEN] * 5, image=image))
    with pytest.raises(ValueError, match=r"1 separate image-token runs but the request carries 0 image\(s\)"):
        engine.prefill(Request(PROMPTS[0]))
    with pytest.raises(ValueError, match="give image .Pillow. or pixel_values, not both"):
        engine.prefill(Request(PROMPTS[0], image=image, pixel_values=torch.zeros(3, 28, 28)))
    with pytest.raises(ValueError, match=r"token id 128 at index 1, outside the vocabulary: allowed 0 <= id < 128"):
        engine.prefill(Request([1, 128, IMAGE_TOKEN], image=image))
    with pytest.raises(ValueError, match=r"token id -1 at index 0, outside the vocabulary"):
        engine.prefill(Request([-1, IMAGE_TOKEN], image=image))
    with pytest.raises(TypeError, match=r"stop_token_ids of request 0 must be an int token id or a list of int token ids, got \[2.5\]"):
        engine.generate(Request(PROMPTS[0], image=image, stop_token_ids=[2.5]))
    with pytest.raises(TypeError, match="eos_token_id must be an int token id or a list of int token ids"):
        engine.generate(Request(PROMPTS[0], image=image), eos_token_id="</s>")
    with pytest.raises(ValueError, match="max_new_tokens of request 0 must be an int >= 1"):
        engine.generate(Request(PROMPTS[0], image=image, max_new_tokens=0))
    with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
        engine.generate(Request(PROMPTS[0], image=image), do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        engine.generate(Request(PROMPTS[0], image=image), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="video input is not supported yet"):
        engine.prefill(Request(PROMPTS[0], image=image, videos=[image]))
    with pytest.raises(TypeError, match=r"image 0 of request 0 must be a Pillow image or an \(H, W\[, C\]\) numpy array, got int"):
        engine.prefill(Request(PROMPTS[0], image=123))
    with pytest.raises(TypeError, match=r"image 1 of request 0 must be a Pillow image .*, got str"):
        engine.prefill(Request([IMAGE_TOKEN, 5, IMAGE_TOKEN], images=[image, "x.jpg"]))
    with pytest.raises(TypeError, match="needs a tokenizer"):
        engine.prefill(Request("USER: <image> hi", image=image))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(3, 28, 28\)"):
        engine.prefill(Request(PROMPTS[0], pixel_values=torch.zeros(3, 32, 32)))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        engine.generate(Request(PROMPTS[0], image=image), max_new_tokens=0)


def test_generate_arguments_fail_before_any_image_work(llava, scorer, monkeypatch):
    """Stop ids outside the vocabulary, a max_new_tokens beyond the model's positions and an infinite
    temperature are refused with one line naming them, before an image is processed or encoded."""
    engine = AutoSelectEngine(llava, scorer, keep=4)
    image = picture(3)

    def no_image_work(*args, **kwargs):
        raise AssertionError("image work started before the arguments were checked")

    monkeypatch.setattr(engine.adapter, "process_image", no_image_work)
    monkeypatch.setattr(engine, "encode_images", no_image_work)
    vocab, positions = engine.adapter.vocab_size, engine.adapter.max_positions
    request = Request(PROMPTS[0], image=image)
    with pytest.raises(ValueError, match=rf"eos_token_id holds token id {vocab}, outside the vocabulary: allowed 0 <= id < {vocab}"):
        engine.generate(request, eos_token_id=[2, vocab])
    with pytest.raises(ValueError, match="eos_token_id holds token id -1, outside the vocabulary"):
        engine.generate(request, eos_token_id=-1)
    with pytest.raises(ValueError, match=rf"stop_token_ids of request 0 holds token id {10**6}, outside the vocabulary"):
        engine.generate(Request(PROMPTS[0], image=image, stop_token_ids=[10**6]))
    with pytest.raises(ValueError, match=rf"max_new_tokens must be <= {positions} \(the model's max_position_embeddings\), got {10**12}"):
        engine.generate(request, max_new_tokens=10**12)
    with pytest.raises(ValueError, match=rf"max_new_tokens of request 0 must be <= {positions}"):
        engine.generate(Request(PROMPTS[0], image=image, max_new_tokens=positions + 1))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        engine.generate(request, do_sample=True, temperature=float("inf"))


def test_a_zero_dim_tensor_is_one_stop_id(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=4)
    request = Request(PROMPTS[0], image=picture(3))
    as_tensor = engine.generate(request, max_new_tokens=3, eos_token_id=torch.tensor(2))
    assert as_tensor.token_ids == engine.generate(request, max_new_tokens=3, eos_token_id=2).token_ids


def test_llava_next_argument_errors(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer, keep=4)
    with pytest.raises(ValueError, match="need image_sizes"):
        engine.prefill(Request(PROMPTS[0], pixel_values=torch.zeros(3, 3, 28, 28)))
    with pytest.raises(ValueError, match=r"must have shape \(>= 5, 3, 28, 28\)"):
        engine.prefill(Request(PROMPTS[0], pixel_values=torch.zeros(2, 3, 28, 28), image_sizes=(30, 40)))


def test_llava_next_processed_pixel_values_equal_pillow_path(llava_next, scorer):
    engine = AutoSelectEngine(llava_next, scorer, keep=10)
    image = picture(45, NEXT_IMAGES[1])
    inputs = processed(engine, image)  # pixel_values (1, tiles, 3, 28, 28), image_sizes (1, 2)
    from_pixels = engine.prefill(Request(PROMPTS[0], pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]))
    from_pillow = engine.prefill(Request(PROMPTS[0], image=image))
    torch.testing.assert_close(from_pixels.logits, from_pillow.logits, rtol=0, atol=0)
    assert engine.scorer_calls == 1  # same pixels, same cache key


# --------------------------------------------------------------------------------------------------
# Serving batches on LLaVA: text-only and two-image requests, per-request limits, sampling
# --------------------------------------------------------------------------------------------------
def multi_image_reference(model, prompt, image_embeds, kept, mode):
    """inputs_embeds/positions of a prompt with several images (placeholders in order), kept tokens only."""
    embed = model.get_input_embeddings()
    pieces, positions, images, full = [], [], iter(zip(image_embeds, kept)), 0
    with torch.no_grad():
        for t in prompt:
            if t == IMAGE_TOKEN:
                feats, kept_i = next(images)
                kept_i = torch.as_tensor(sorted(kept_i))
                pieces.append(feats[kept_i])
                positions.append(full + kept_i)
                full += feats.shape[0]
            else:
                pieces.append(embed(torch.tensor([t])))
                positions.append(torch.tensor([full]))
                full += 1
    embeds, positions = torch.cat(pieces), torch.cat(positions)
    return embeds, positions if mode == "original" else torch.arange(embeds.shape[0])


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_llava_text_only_and_two_image_requests(llava, scorer, mode):
    from autoselect_fast.engine import ImageInput

    engine = AutoSelectEngine(llava, scorer, keep=5, position_mode=mode)
    images = [picture(60), picture(61), picture(62)]
    prompts = [[1, 5, IMAGE_TOKEN, 6, IMAGE_TOKEN, 7, 8], [1, 9, 10, 11], [1, IMAGE_TOKEN, 3]]
    pixels = processed(engine, images[1])["pixel_values"]
    requests = [Request(prompts[0], images=[images[0], ImageInput(pixels)]), Request(prompts[1]), Request(prompts[2], image=images[2])]
    out = engine.prefill(requests)
    assert out.image_request == [0, 0, 2] and out.kept_tokens == [10, 0, 5] and out.visual_tokens == [32, 0, 16]
    features = [model_image_features(llava, **processed(engine, image))[0] for image in images]
    kept = out.kept_indices
    cases = [(prompts[0], features[:2], kept[:2]), (prompts[1], [], []), (prompts[2], features[2:], kept[2:])]
    for r, (prompt, feats, kept_r) in enumerate(cases):
        embeds, positions = multi_image_reference(llava, prompt, feats, [k.tolist() for k in kept_r], mode)
        assert out.sequence_lengths[r] == embeds.shape[0]
        torch.testing.assert_close(out.logits[r], reference_logits(llava, embeds, positions), **TOL)
    generated = engine.generate(requests, max_new_tokens=8).token_ids
    embeds, positions = multi_image_reference(llava, prompts[0], features[:2], [k.tolist() for k in kept[:2]], mode)
    assert generated[0] == stepwise_greedy(llava, embeds, positions, 8)
    with torch.no_grad():
        text_only = llava.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated[1] == text_only[0, 4:].tolist()


def test_llava_per_request_limits_stop_tokens_and_sampling(llava, scorer):
    engine = AutoSelectEngine(llava, scorer, keep=6)
    images = [picture(4), picture(5)]
    free = engine.generate(build_requests(PROMPTS[:2], images), max_new_tokens=8).token_ids
    requests = build_requests(PROMPTS[:2], images)
    requests[0].max_new_tokens = 3
    requests[1].stop_token_ids = [free[1][1]]
    got = engine.generate(requests, max_new_tokens=8).token_ids
    assert got[0] == free[0][:3] and got[1] == free[1][: free[1].index(free[1][1]) + 1]
    plain = build_requests(PROMPTS[:2], images)
    assert engine.generate(plain, max_new_tokens=8, do_sample=True, top_k=1, seed=0).token_ids == free
    plain[0].seed, plain[1].seed = 3, 4
    sampled = engine.generate(plain, max_new_tokens=8, do_sample=True, temperature=2.0).token_ids
    assert sampled == engine.generate(plain, max_new_tokens=8, do_sample=True, temperature=2.0).token_ids
    assert engine.generate(plain[1:], max_new_tokens=8, do_sample=True, temperature=2.0).token_ids[0] == sampled[1]


def test_llava_next_full_sequence_embeddings_for_a_trainer(llava_next, scorer):
    """adapter.embed_full_sequence (the trainer's entry point) inserts newlines and reproduces the model."""
    engine = AutoSelectEngine(llava_next, scorer)
    image, prompt = picture(46, NEXT_IMAGES[0]), PROMPTS[1]
    inputs = processed(engine, image)
    size = inputs["image_sizes"][0].tolist()
    layout = engine.adapter.layout(size)
    a = prompt.index(IMAGE_TOKEN)
    ids = torch.tensor(prompt[:a] + [IMAGE_TOKEN] * layout.num_slots + prompt[a + 1:])
    with torch.no_grad():
        projected = engine.adapter.project(engine.encode_images([inputs["pixel_values"][0]], [size])[0])
        embeds, positions = engine.adapter.embed_full_sequence(ids, [size], [projected])
    assert positions.shape == (1, ids.numel())
    torch.testing.assert_close(reference_logits(llava_next, embeds, positions[0]), full_logits(llava_next, prompt, layout.num_slots, inputs), **TOL)
