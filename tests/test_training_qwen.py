"""Training of Scorer + Denoiser on Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, tiny random weights).

The same model, image processor and processor (without its torchvision-only video processor) as
``tests/test_engine_qwen.py``: vision hidden 32 (d_v = 4 x 32 = 128 per merge group), text head dim 16
with ``mrope_section`` [2, 3, 3]; images keep their own resolution, so N differs per sample.

Checks: the trainer's sequence (every group merged, M-RoPE ``(3, S)`` positions, right-padded batch)
gives the model's own logits (fp32, rtol = atol = 1e-5); gradients reach the Scorer through Soft Top-K
and the VP gate (kernel path == reference path, as for LLaVA in ``tests/test_training.py``); per-image
budgets (fixed K clipped to N_i, or a ratio); the frozen model is bit-identical after training steps;
a JSONL record with an image is read through the Qwen processor's tokenizer and image processor.
"""
import json
import os

import pytest
import torch
from test_engine_qwen import (
    IM_END,
    IM_START,
    IMAGE,
    VISION_END,
    VISION_START,
    image_processor,
    picture,
    qwen_processor,
    tiny_qwen,
)
from test_training import assert_kernel_gradients_match_reference

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.models import get_adapter
from autoselect_fast.modules import Denoiser, DenoiserConfig, Scorer, ScorerConfig
from autoselect_fast.training import (
    AutoSelectObjective,
    ConversationDataset,
    SampleList,
    TrainConfig,
    Trainer,
    build_objective,
    collate,
)
from autoselect_fast.training.data import Sample
from autoselect_fast.training.objective import pad_sequences

TOL = dict(rtol=1e-5, atol=1e-5)
D_V = 4 * 32
# (width, height) -> grids: wide 8x16 patches (32 groups, several windows), small 4x4 (4 groups), tall.
SIZES = [(220, 100), (56, 56), (60, 150)]
ANSWERS = [[6, 7, 8], [10, 11], [16, 17, 18, 19]]


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen(seed=5)


def samples(model, count=3) -> SampleList:
    """``<|im_start|> user <vision_start> <image_pad> <vision_end> words <|im_end|> <|im_start|> assistant answer <|im_end|>``"""
    adapter = get_adapter(model)
    proc = image_processor()
    out, tokens = [], []
    for i in range(count):
        pv, grid = adapter.process_image(picture(20 + i, SIZES[i % len(SIZES)]), proc)
        prompt = [IM_START, 2, VISION_START, IMAGE, VISION_END, 9, 10, 11][: 8 - i % 2] + [IM_END, IM_START, 3]
        answer = ANSWERS[i % len(ANSWERS)] + [IM_END]
        ids = torch.tensor(prompt + answer)
        labels = torch.tensor([-100] * len(prompt) + answer)
        out.append(Sample(ids, labels, pv, grid))
        tokens.append(adapter.layout(grid).num_tokens)
    return SampleList(out, tokens)


def model_logits(model, sample):
    """The unmodified model's forward on one sample (placeholder expanded as the processor does)."""
    adapter = get_adapter(model)
    n = adapter.layout(sample.image_size).num_tokens
    ids = sample.input_ids.tolist()
    a = ids.index(IMAGE)
    expanded = torch.tensor([ids[:a] + [IMAGE] * n + ids[a + 1:]])
    with torch.no_grad():
        return model(input_ids=expanded, attention_mask=torch.ones_like(expanded), mm_token_type_ids=(expanded == IMAGE).int(),
                     pixel_values=sample.pixel_values, image_grid_thw=torch.tensor([sample.image_size])).logits[0]


def objective_for(model, **kwargs):
    torch.manual_seed(3)
    scorer = Scorer(ScorerConfig(input_dim=D_V, hidden_dim=32, num_layers=1, num_heads=4))
    denoiser = Denoiser(DenoiserConfig(input_dim=D_V, mlp_ratio=2.0))
    return AutoSelectObjective(model, scorer, denoiser, **kwargs)


def test_training_sequence_batch_reproduces_model_logits(qwen):
    """Every group merged (adapter.project on all groups), the full sequence with M-RoPE positions from the
    adapter, right-padded as the objective pads a batch: each sample's rows are the model's own logits."""
    adapter = get_adapter(qwen)
    data = samples(qwen)
    seqs = []
    with torch.no_grad():
        features = adapter.encode([s.pixel_values for s in data.samples], [s.image_size for s in data.samples])
        for s, f in zip(data.samples, features):
            seqs.append(adapter.training_sequence(s.input_ids, s.labels, adapter.project(f), s.image_size))
        embeds, mask, positions, labels = pad_sequences(*(list(x) for x in zip(*seqs)))
        assert positions.shape == (3, len(data), embeds.shape[1])
        rows = torch.nonzero(mask.reshape(-1))[:, 0]
        ours = adapter.training_logits(embeds, mask, positions, rows)
    start = 0
    for s, (e, p, lab) in zip(data.samples, seqs):
        length = e.shape[0]
        theirs = model_logits(qwen, s)
        assert theirs.shape[0] == length and p.shape == (3, length)
        torch.testing.assert_close(ours[start:start + length], theirs, **TOL)
        assert int((lab != -100).sum()) == int((s.labels != -100).sum())
        start += length
    # the positions are the model's own get_rope_index (text after the image jumps past its grid)
    assert not torch.equal(seqs[0][1][0], seqs[0][1][1])


def test_budgets_per_image_fixed_clipped_and_ratio(qwen):
    data = samples(qwen)
    lengths = [data.num_visual_tokens(i) for i in range(3)]
    assert lengths == [32, 4, lengths[2]] and lengths[2] not in (4, 32)
    batch = collate(list(data.samples), [0, 1, 2])
    out = objective_for(qwen, keep=6, kernel_backend="reference")(batch, tau=1.0, step=0, seed=0, normalizer=1.0)
    assert out.budgets == [6, 4, 6]  # K = 6 clipped to the small image's N = 4, as the engine does
    out = objective_for(qwen, keep_ratio=0.25, kernel_backend="reference")(batch, tau=1.0, step=0, seed=0, normalizer=1.0)
    assert out.budgets == [max(1, round(0.25 * n)) for n in lengths]
    torch.testing.assert_close(out.alpha[:32].sum(), torch.tensor(8.0), **TOL)


@pytest.mark.parametrize("gate", ["vp", "scale"])
def test_gradients_reach_scorer_kernel_equals_reference(qwen, gate):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors")
    data = samples(qwen)
    batch = collate(list(data.samples), [0, 1, 2])
    results = {}
    for backend in ("reference", "triton"):
        objective = objective_for(qwen, keep=5, gate=gate, kernel_backend=backend)
        out = objective(batch, tau=0.7, step=3, seed=11, normalizer=10.0)
        out.loss.backward()
        results[backend] = out.loss.detach(), {n: p.grad.clone() for n, p in objective.scorer.named_parameters()}, objective
    (loss_ref, grads_ref, obj_ref), (loss_ker, grads_ker, _) = results["reference"], results["triton"]
    assert_kernel_gradients_match_reference(loss_ker, grads_ker, loss_ref, grads_ref)
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in obj_ref.denoiser.parameters())
    assert all(p.grad is None for p in qwen.parameters())


def test_frozen_qwen_bit_identical_and_saved_scorer_prunes(qwen, tmp_path):
    data = samples(qwen, count=6)
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    config = TrainConfig(output_dir=str(tmp_path / "run"), keep=6, steps=3, batch_size=3, lr=1e-3, warmup_steps=1, scorer_hidden_dim=32,
                         scorer_layers=1, scorer_heads=4, denoiser_mlp_ratio=2.0, save_every=0, progress=False, kernel_backend="reference")
    objective = build_objective(qwen, config)
    scorer_before = {k: v.clone() for k, v in objective.scorer.state_dict().items()}
    Trainer(objective, data, config).train()
    after = qwen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen Qwen2.5-VL parameter changed"
    assert any(not torch.equal(scorer_before[k], v) for k, v in objective.scorer.state_dict().items())
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    scorer = Scorer.from_pretrained(tmp_path / "run" / "scorer", expected_input_dim=D_V)
    engine = AutoSelectEngine(qwen, scorer, keep=6, image_processor=image_processor())
    s = data[0]
    prompt = s.input_ids[: int((s.labels == -100).sum())]
    out = engine.prefill(Request(prompt=prompt, pixel_values=s.pixel_values, image_sizes=s.image_size))
    assert out.kept_tokens == [6] and torch.isfinite(out.logits).all()


def test_conversation_record_through_the_qwen_processor(qwen, tmp_path):
    """A JSONL record with an image: the chat template renders <vision_start><image_pad><vision_end>, the
    header-only N equals the processed image's, and a training step runs on the sample."""
    processor = qwen_processor()
    for i, size in enumerate([(220, 100), (60, 150)]):
        picture(30 + i, size).save(tmp_path / f"im{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    records = [
        {"image": "im0.png", "conversations": [{"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": "a helpful assistant."}]},
        {"image": "broken.png", "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "a"}]},
        {"image": "im1.png", "conversations": [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "the"}]},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    adapter = get_adapter(qwen)
    logged = []
    dataset = ConversationDataset(str(tmp_path / "data.jsonl"), adapter, processor, image_processor=processor.image_processor, log=logged.append)
    assert len(dataset) == 2 and [p.line for p in dataset.problems] == [2] and "line 2" in logged[0]
    for i in range(2):
        s = dataset[i]
        ids = s.input_ids.tolist()
        a = ids.index(IMAGE)
        assert ids[a - 1:a + 2] == [VISION_START, IMAGE, VISION_END] and ids.count(IMAGE) == 1
        assert dataset.num_visual_tokens(i) == adapter.layout(s.image_size).num_tokens
        assert int((s.labels != -100).sum()) >= 1
    assert dataset.num_visual_tokens(0) == 32
    batch = collate([dataset[0], dataset[1]], [0, 1])
    objective = objective_for(qwen, keep_ratio=0.5, kernel_backend="reference")
    out = objective(batch, tau=1.0, step=0, seed=0, normalizer=1.0)
    out.loss.backward()
    assert float(objective.scorer.head.weight.grad.abs().max()) > 0


def test_cli_train_on_a_saved_qwen_checkpoint(tmp_path):
    """`autoselect-fast train` on a saved Qwen2.5-VL folder (tokenizer with the chat template and the image
    processor saved one by one: the full processor's video part needs torchvision) and a JSONL of records
    whose images have different resolutions; K = 6 is clipped to N for the small image."""
    from tiny_checkpoints import save_qwen2_5_vl

    from autoselect_fast import cli

    model_dir = save_qwen2_5_vl(str(tmp_path / "model"))
    sizes = [(112, 112), (56, 56), (160, 80), (90, 120)]
    for i, size in enumerate(sizes):
        picture(40 + i, size).save(tmp_path / f"im{i}.png")
    records = [{"image": f"im{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat is in the picture ?"},
                                                         {"from": "gpt", "value": ["a red circle", "a blue square"][i % 2]}]}
               for i in range(len(sizes))]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    config = {"model": model_dir, "data": str(tmp_path / "data.jsonl"), "output_dir": str(tmp_path / "run"), "keep": 6, "steps": 2,
              "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "scorer_hidden_dim": 32, "scorer_layers": 1, "scorer_heads": 4,
              "denoiser_mlp_ratio": 2.0, "progress": False, "kernel_backend": "reference", "save_every": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(tmp_path / "config.json")]) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2] and all(m["answer_tokens"] > 0 for m in lines)
    assert Scorer.from_pretrained(tmp_path / "run" / "scorer", expected_input_dim=D_V).config.input_dim == D_V
