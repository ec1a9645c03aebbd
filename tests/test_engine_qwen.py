"""AutoSelectEngine on Qwen2.5-VL: the real ``Qwen2_5_VLForConditionalGeneration``, small random weights.

Model: vision tower depth 2 (block 0 windowed, block 1 full attention), hidden 32, 14x14 patches,
spatial merge 2, window 56 px (2x2 merge groups per window), out_hidden 64; text model hidden 64, 4
heads (head dim 16, ``mrope_section`` [2, 3, 3]), 2 kv heads, 2 layers, vocab 256; float32.
Images come through the real ``Qwen2VLImageProcessor`` with small ``min_pixels``/``max_pixels``, so
every image keeps its own resolution and token count; the wide one has a non-square 8x16 patch grid
(4x8 merge groups) spread over 8 attention windows.

References are built from the unmodified model: ``model(...)`` / ``model.generate(...)`` on each
request alone (every token kept), and its language model fed ``inputs_embeds`` of the kept tokens (the
model's own merged features) with the positions of ``get_rope_index`` on the full sequence gathered at
the kept columns (``original``) or 0..L'-1 on every row (``compact``), plus an all-ones attention mask.
Tolerance: fp32, rtol = atol = 1e-5 on logits (observed ~1e-7).
"""
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
)

from autoselect_fast.engine import AutoSelectEngine, ImageInput, Request, filter_logits, sample_next_tokens
from autoselect_fast.modules import Scorer, ScorerConfig
from autoselect_fast.reference import hard_topk_indices

TOL = dict(rtol=1e-5, atol=1e-5)
IM_START, IM_END, VISION_START, VISION_END, IMAGE, VIDEO = 240, 241, 248, 249, 250, 251
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, spatial_merge_size=2,
              patch_size=14, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 1, 28 * 28 * 32
# (width, height): wide and multi-window (grid 8x16 -> 4x8 groups), small square, tall, medium.
SIZES = {"wide": (220, 100), "small": (56, 56), "tall": (60, 150), "medium": (120, 90)}
WORDS = ["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "Describe", "this",
         "image.", "Compare", "the", "two", "images.", "Hello,", "how", "is", "weather?", "What", "color?"]
SPECIAL = {"<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|vision_start|>": VISION_START,
           "<|vision_end|>": VISION_END, "<|image_pad|>": IMAGE, "<|video_pad|>": VIDEO}
# A Qwen-style chat template (roles between <|im_start|>/<|im_end|>, images as vision_start/pad/end).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %} {{ item['text'] }} {% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def tiny_qwen(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image_processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def picture(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_prompt(*words: int, images: int = 1) -> list[int]:
    """<|im_start|> user [<|vision_start|> <|image_pad|> <|vision_end|>]*images words <|im_end|> <|im_start|> assistant"""
    ids = [IM_START, 2]
    for _ in range(images):
        ids += [VISION_START, IMAGE, VISION_END]
    return ids + list(words) + [IM_END, IM_START, 3]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen()


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(3)
    return Scorer(ScorerConfig(input_dim=4 * 32, hidden_dim=32, num_layers=1, num_heads=4)).eval()


@pytest.fixture(scope="module")
def processed():
    """Processed pixels and grid of every test image: ``name -> (pixel_values, image_grid_thw (3,))``."""
    proc = image_processor()
    out = {}
    for i, (name, size) in enumerate(SIZES.items()):
        p = proc(images=[picture(i, size)], return_tensors="pt")
        out[name] = (p["pixel_values"], p["image_grid_thw"][0])
    return out


def engine_for(qwen, scorer, **kwargs) -> AutoSelectEngine:
    return AutoSelectEngine(qwen, scorer, image_processor=image_processor(), **kwargs)


def image_input(processed, name: str) -> ImageInput:
    pixel_values, grid = processed[name]
    return ImageInput(pixel_values, grid)


# A serving batch: different image sizes and prompt lengths, one text-only and one two-image request.
BATCH = [
    ("wide", image_prompt(9, 10, 11)),
    (None, [IM_START, 2, 16, 17, 18, 13, 19, IM_END, IM_START, 3]),
    (("small", "tall"), image_prompt(12, 13, 14, 15, images=2)),
    ("medium", image_prompt(20, 21)),
]


def batch_requests(processed, **extra) -> list[Request]:
    requests = []
    for names, prompt in BATCH:
        names = () if names is None else (names,) if isinstance(names, str) else names
        requests.append(Request(prompt, images=[image_input(processed, n) for n in names], **extra))
    return requests


# --------------------------------------------------------------------------------------------------
# Hand-built references from the unmodified model
# --------------------------------------------------------------------------------------------------
def expand(prompt: list[int], grids) -> list[int]:
    """Each <|image_pad|> placeholder expanded to the image's t*h*w/4 tokens, as the processor does."""
    out, grids = [], list(grids)
    for t in prompt:
        out += [IMAGE] * int(grids.pop(0).prod() // 4) if t == IMAGE else [t]
    return out


def model_inputs(processed, names, prompt):
    grids = [processed[n][1] for n in names]
    ids = torch.tensor([expand(prompt, grids)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE).int()}
    if names:
        inputs["pixel_values"] = torch.cat([processed[n][0] for n in names])
        inputs["image_grid_thw"] = torch.stack(grids)
    return inputs


def merged_features(model, processed, names) -> list[torch.Tensor]:
    """The model's own merged (post-merger) features per image, raster order."""
    if not names:
        return []
    with torch.no_grad():
        out = model.model.get_image_features(torch.cat([processed[n][0] for n in names]), torch.stack([processed[n][1] for n in names]))
    return list(out.pooler_output)


def pruned_reference_inputs(model, processed, names, prompt, kept, mode):
    """inputs_embeds (L', H) of the kept tokens and their positions (3, L') from the full sequence."""
    inputs = model_inputs(processed, names, prompt)
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        full_positions, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"))
        embeds = model.get_input_embeddings()(ids)
    full_positions = full_positions[:, 0]
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    image_columns = torch.nonzero(ids == IMAGE)[:, 0].split([f.shape[0] for f in merged_features(model, processed, names)] or [0])
    features = merged_features(model, processed, names)
    for columns, feats, kept_i in zip(image_columns, features, kept):
        embeds[columns] = feats
        dropped = torch.ones(columns.numel(), dtype=torch.bool)
        dropped[kept_i] = False
        keep[columns[dropped]] = False
    embeds = embeds[keep]
    positions = full_positions[:, keep] if mode == "original" else torch.arange(embeds.shape[0]).expand(3, -1)
    return embeds, positions


def language_model_logits(model, embeds, positions):
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=embeds[None], position_ids=positions[:, None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long)
        ).last_hidden_state
        return model.lm_head(hidden[0, -1])


def stepwise_greedy(model, embeds, positions, steps):
    """No cache: a full forward over the pruned sequence plus the generated tokens at every step."""
    tokens = []
    for _ in range(steps):
        token = int(language_model_logits(model, embeds, positions).argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([token]))])
        positions = torch.cat([positions, (positions.max() + 1).expand(3, 1)], dim=1)
    return tokens


def names_of(entry) -> tuple:
    names = entry[0]
    return () if names is None else (names,) if isinstance(names, str) else tuple(names)


# --------------------------------------------------------------------------------------------------
# Features: window order undone, pruning before the merger equals pruning after it
# --------------------------------------------------------------------------------------------------
def test_pre_merger_features_are_raster_order_groups(qwen, scorer, processed):
    engine = engine_for(qwen, scorer)
    names = ["wide", "small", "tall"]
    grids = torch.stack([processed[n][1] for n in names])
    assert processed["wide"][1].tolist() == [1, 8, 16]  # non-square, 4x8 groups over 2x4 windows
    pixel_values = torch.cat([processed[n][0] for n in names])
    with torch.no_grad():
        tower_out = qwen.model.visual(pixel_values, grid_thw=grids)
        ours, window_index = engine.adapter.pre_merger_states(pixel_values, grids)
        features = engine.encode_images([processed[n][0] for n in names], [processed[n][1] for n in names])
    # The adapter runs the tower's own blocks (without the merger): same hidden states, window order.
    torch.testing.assert_close(ours, tower_out.last_hidden_state, rtol=0, atol=0)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))  # window order is not raster order
    assert [f.shape for f in features] == [(32, 128), (4, 128), (int(processed["tall"][1].prod()) // 4, 128)]
    # Merging the raster-order groups reproduces the model's own raster-order merged features...
    model_merged = merged_features(qwen, processed, names)
    for feats, merged in zip(features, model_merged):
        with torch.no_grad():
            torch.testing.assert_close(engine.adapter.project(feats), merged, **TOL)
    # ... so pruning before the merger equals pruning after it.
    kept = torch.tensor([0, 3, 5, 9, 17, 30, 31])
    with torch.no_grad():
        torch.testing.assert_close(engine.adapter.project(features[0][kept]), model_merged[0][kept], **TOL)


def test_full_sequence_embeddings_and_positions_for_a_trainer(qwen, scorer, processed):
    """adapter.embed_full_sequence (the trainer's entry point) reproduces the model's own forward."""
    engine = engine_for(qwen, scorer)
    names, prompt = ("small", "tall"), image_prompt(12, 13, images=2)
    inputs = model_inputs(processed, names, prompt)
    with torch.no_grad():
        projected = [engine.adapter.project(f) for f in engine.encode_images([processed[n][0] for n in names], [processed[n][1] for n in names])]
        embeds, positions = engine.adapter.embed_full_sequence(inputs["input_ids"][0], [processed[n][1] for n in names], projected)
        expected = qwen(**inputs).logits[0, -1]
    assert positions.shape == (3, inputs["input_ids"].shape[1])
    torch.testing.assert_close(language_model_logits(qwen, embeds, positions), expected, **TOL)


# --------------------------------------------------------------------------------------------------
# Every token kept: the engine equals transformers on each request alone
# --------------------------------------------------------------------------------------------------
def test_keep_all_mixed_batch_equals_model_on_each_request(qwen, scorer, processed):
    engine = engine_for(qwen, scorer)
    out = engine.prefill(batch_requests(processed))
    assert engine.scorer_calls == 0
    assert out.image_request == [0, 2, 2, 3] and out.kept_tokens == out.visual_tokens
    assert len(set(out.sequence_lengths)) == 4
    for r, entry in enumerate(BATCH):
        inputs = model_inputs(processed, names_of(entry), entry[1])
        with torch.no_grad():
            expected = qwen(**inputs).logits[0, -1]
        assert out.sequence_lengths[r] == inputs["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[r], expected, **TOL)


def test_keep_all_greedy_equals_transformers_generate(qwen, scorer, processed):
    engine = engine_for(qwen, scorer)
    generated = engine.generate(batch_requests(processed), max_new_tokens=8).token_ids
    for r, entry in enumerate(BATCH):
        inputs = model_inputs(processed, names_of(entry), entry[1])
        with torch.no_grad():
            own = qwen.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert generated[r] == own[0, inputs["input_ids"].shape[1]:].tolist()


# --------------------------------------------------------------------------------------------------
# K < N: the engine equals the hand-built reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["original", "compact"])
def test_pruned_equals_hand_built_reference(qwen, scorer, processed, mode):
    engine = engine_for(qwen, scorer, keep_ratio=0.3, position_mode=mode)
    out = engine.prefill(batch_requests(processed))
    kept_per_image = iter(out.kept_indices)
    features = engine.encode_images([processed[n][0] for e in BATCH for n in names_of(e)], [processed[n][1] for e in BATCH for n in names_of(e)])
    with torch.no_grad():
        for f, kept in zip(features, out.kept_indices):  # the Scorer's own top-K of the pre-merger groups
            assert kept.numel() == max(1, round(0.3 * f.shape[0])) and torch.equal(kept, hard_topk_indices(scorer(f), kept.numel())[0])
    for r, entry in enumerate(BATCH):
        names = names_of(entry)
        kept = [next(kept_per_image) for _ in names]
        embeds, positions = pruned_reference_inputs(qwen, processed, names, entry[1], kept, mode)
        assert out.sequence_lengths[r] == embeds.shape[0]
        torch.testing.assert_close(out.logits[r], language_model_logits(qwen, embeds, positions), **TOL)
        assert int(out.next_positions[r]) == int(positions.max()) + 1
        if names:  # pruning changed the inputs: the reference is not trivially the full model
            with torch.no_grad():
                full = qwen(**model_inputs(processed, names, entry[1])).logits[0, -1]
            assert not torch.allclose(out.logits[r], full, atol=1e-3)


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_pruned_generation_equals_stepwise_reference(qwen, scorer, processed, mode):
    engine = engine_for(qwen, scorer, keep=5, position_mode=mode)  # the small image (N=4) keeps all 4
    result = engine.generate(batch_requests(processed), max_new_tokens=8)
    generated = result.token_ids
    kept_per_image = iter(result.prefill.kept_indices)
    assert [k.numel() for k in result.prefill.kept_indices] == [5, 4, 5, 5]
    for r, entry in enumerate(BATCH):
        names = names_of(entry)
        kept = [next(kept_per_image) for _ in names]
        embeds, positions = pruned_reference_inputs(qwen, processed, names, entry[1], kept, mode)
        assert generated[r] == stepwise_greedy(qwen, embeds, positions, 8)


def test_original_positions_have_gaps_and_text_keeps_full_positions(qwen, scorer, processed):
    engine = engine_for(qwen, scorer, keep=3)
    prompt = image_prompt(9, 10, 11)
    batch = engine.prepare(Request(prompt, images=[image_input(processed, "wide")]))
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    pruned = engine.prune(features, batch.budgets, keys=batch.image_keys, positions=batch.token_positions)
    packed = engine.pack(batch, pruned)
    full = batch.full_positions[0]
    kept = pruned.kept_indices()[0]
    assert packed.position_ids.shape == (3, len(prompt) - 1 + 3)
    assert torch.equal(packed.position_ids[:, 3:6], full[:, 3 + kept])  # image after 3 text tokens
    assert torch.equal(packed.position_ids[:, 6:], full[:, 3 + 32:])  # text after the image: full-sequence positions
    assert torch.equal(pruned.selection.position_ids, full[:, 3 + kept])  # the selection saw the M-RoPE positions


# --------------------------------------------------------------------------------------------------
# Prompts, budgets
# --------------------------------------------------------------------------------------------------
class _ProcessorWithoutVideo(Qwen2_5_VLProcessor):
    """The real processor; its video processor needs torchvision, which is not installed, so it is left out."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def qwen_processor() -> Qwen2_5_VLProcessor:
    vocab = {w: i for i, w in enumerate(WORDS)} | SPECIAL
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", additional_special_tokens=list(SPECIAL))
    return _ProcessorWithoutVideo(image_processor=image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def test_chat_template_prompts_through_the_processor(qwen, scorer):
    processor = qwen_processor()
    engine = AutoSelectEngine(qwen, scorer, image_processor=processor.image_processor, tokenizer=processor)
    images = [picture(10, (200, 90)), picture(11, (70, 70))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare the two images."}, {"type": "image"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    from_text = engine.prefill(Request(text, images=images))
    grids = inputs["image_grid_thw"]
    split = inputs["pixel_values"].split((grids.prod(-1)).tolist())
    from_ids = engine.prefill(Request(inputs["input_ids"][0], images=[ImageInput(p, g) for p, g in zip(split, grids)]))
    torch.testing.assert_close(from_text.logits, from_ids.logits, rtol=0, atol=0)
    with torch.no_grad():
        expected = qwen(**inputs).logits[0, -1]
    torch.testing.assert_close(from_text.logits[0], expected, **TOL)


def test_budgets_per_image(qwen, scorer, processed):
    requests = batch_requests(processed)
    n = [32, 4, int(processed["tall"][1].prod()) // 4, int(processed["medium"][1].prod()) // 4]
    clipped = engine_for(qwen, scorer, keep=6).prefill(requests)
    assert [k.numel() for k in clipped.kept_indices] == [min(6, x) for x in n]
    ratio = engine_for(qwen, scorer, keep_ratio=2 / 9).prefill(requests)
    assert [k.numel() for k in ratio.kept_indices] == [max(1, round(2 / 9 * x)) for x in n]
    assert ratio.kept_tokens == [7, 0, 1 + max(1, round(2 / 9 * n[2])), max(1, round(2 / 9 * n[3]))]


# --------------------------------------------------------------------------------------------------
# Sampling, stop tokens, per-request limits
# --------------------------------------------------------------------------------------------------
def test_filter_logits_equals_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 7, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 1, 1.0)]:
        want = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(None, want)
        assert torch.equal(filter_logits(logits, temperature, top_k, top_p), want)


def test_sampling_is_seeded_per_request_and_stays_in_the_filtered_set(qwen, scorer, processed):
    engine = engine_for(qwen, scorer, keep_ratio=0.5)
    requests = batch_requests(processed)
    a = engine.generate(requests, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=7).token_ids
    b = engine.generate(requests, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=7).token_ids
    assert a == b
    assert engine.generate(requests, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=8).token_ids != a
    for r, req in enumerate(requests):
        req.seed = 100 + r
    own = engine.generate(requests, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20, seed=7).token_ids
    alone = engine.generate([requests[2]], max_new_tokens=6, do_sample=True, temperature=1.5, top_k=20).token_ids
    assert alone[0] == own[2]  # a request with its own seed samples the same tokens whatever the batch
    requests = batch_requests(processed)
    greedy = engine.generate(requests, max_new_tokens=6).token_ids
    assert engine.generate(requests, max_new_tokens=6, do_sample=True, top_k=1, seed=1).token_ids == greedy
    assert engine.generate(requests, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=1).token_ids == greedy
    logits = engine.prefill(requests).logits
    first = sample_next_tokens(logits, do_sample=True, top_k=3, generators=[torch.Generator().manual_seed(s) for s in range(4)])
    assert all(int(t) in torch.topk(logits[r], 3).indices.tolist() for r, t in enumerate(first))


def test_stop_tokens_and_limits_per_request(qwen, scorer, processed):
    engine = engine_for(qwen, scorer, keep_ratio=0.5)
    free = engine.generate(batch_requests(processed), max_new_tokens=8).token_ids
    stop = free[0][3]
    requests = batch_requests(processed)
    requests[0].stop_token_ids = [stop]
    requests[1].max_new_tokens = 2
    got = engine.generate(requests, max_new_tokens=8).token_ids
    assert got[0] == free[0][: free[0].index(stop) + 1]
    assert got[1] == free[1][:2] and got[2] == free[2] and got[3] == free[3]
    both = engine.generate(batch_requests(processed), max_new_tokens=5, eos_token_id=stop).token_ids
    for r in range(4):
        want = free[r][:5]
        assert both[r] == (want[: want.index(stop) + 1] if stop in want else want)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_errors(qwen, scorer, processed):
    engine = engine_for(qwen, scorer, keep=4)
    wide, small = image_input(processed, "wide"), image_input(processed, "small")
    with pytest.raises(ValueError, match=r"1 separate image-token runs but the request carries 2 image\(s\)"):
        engine.prefill(Request(image_prompt(9), images=[wide, small]))
    with pytest.raises(ValueError, match=r"2 separate image-token runs but the request carries 1 image\(s\)"):
        engine.prefill(Request(image_prompt(9, images=2), images=[wide]))
    with pytest.raises(ValueError, match="request 0 has no image token"):
        engine.prefill(Request([IM_START, 9, 10], images=[wide]))
    with pytest.raises(ValueError, match=r"token id 251 at index 3: video input is not supported yet"):
        engine.prefill(Request([IM_START, 2, VISION_START, VIDEO, VISION_END, 9], images=[]))
    with pytest.raises(ValueError, match="request 0 has videos: video input is not supported yet"):
        engine.prefill(Request(image_prompt(9), videos=[torch.zeros(4, 1176)]))
    with pytest.raises(ValueError, match=r"t=2 temporal patches: video input is not supported yet"):
        engine.prefill(Request(image_prompt(9), images=[ImageInput(torch.zeros(32, 1176), (2, 4, 4))]))
    with pytest.raises(ValueError, match=r"token id 256 at index 1, outside the vocabulary: allowed 0 <= id < 256"):
        engine.prefill(Request([IM_START, 256, 9]))
    with pytest.raises(TypeError, match=r"stop_token_ids of request 1 must be an int token id or a list of int token ids, got \['<\|im_end\|>'\]"):
        engine.generate([Request([IM_START, 9]), Request([IM_START, 10], stop_token_ids=["<|im_end|>"])])
    with pytest.raises(TypeError, match="eos_token_id must be an int token id or a list of int token ids, got 2.0"):
        engine.generate(Request([IM_START, 9]), eos_token_id=2.0)
    with pytest.raises(ValueError, match=r"need image_sizes: the image's image_grid_thw"):
        engine.prefill(Request(image_prompt(9), pixel_values=processed["wide"][0]))
    with pytest.raises(ValueError, match=r"must have shape \(128, 1176\), got \(127, 1176\)"):
        engine.prefill(Request(image_prompt(9), pixel_values=processed["wide"][0][:127], image_sizes=processed["wide"][1]))
    with pytest.raises(ValueError, match="run of 5 image tokens; give one placeholder token or the expanded run of 32"):
        engine.prefill(Request([IM_START] + [IMAGE] * 5, images=[wide]))
    with pytest.raises(TypeError, match="seed of request 0 must be an int or None, got 1.5"):
        engine.generate([Request([IM_START, 9], seed=1.5)], do_sample=True)
    with pytest.raises(TypeError, match=r"seed must be None or an int, got \[1, 2\]"):
        engine.generate([Request([IM_START, 9])], do_sample=True, seed=[1, 2])
    # one image_id for two images of different sizes: named, not a shape error deep in selection
    engine.prefill(Request(image_prompt(9), images=[ImageInput(*processed["wide"], image_id="photo")]))
    with pytest.raises(ValueError, match="score-cache key 'photo' holds the scores of an image with 32 visual tokens, but this image has 12"):
        engine.prefill(Request(image_prompt(9), images=[ImageInput(*processed["medium"], image_id="photo")]))
