"""Training of Scorer + Denoiser (``autoselect_fast.training``) on the real transformers LLaVA classes.

Tolerances: kernel path (Triton interpreter, fp32) against reference path (float64): loss rtol 1e-5;
Scorer gradients rtol 1e-3, atol 1e-5 x the largest gradient of the head (observed: ~1e-6 relative;
the Soft Top-K kernel solves λ in fp32, the VP noise is the same Philox stream on both paths). DDP against one process: Scorer weights
after two AdamW steps agree to atol 1e-6 (float summation order of the all-reduce).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from autoselect_fast.engine import AutoSelectEngine, Request
from autoselect_fast.models import get_adapter
from autoselect_fast.modules import Scorer, ScorerConfig
from autoselect_fast.training import (
    AutoSelectObjective,
    ConversationDataset,
    GlobalDenoiser,
    SampleList,
    TrainConfig,
    Trainer,
    build_objective,
    collate,
)
from autoselect_fast.training import synthetic as S
from autoselect_fast.training.cli import load_model
from autoselect_fast.training.objective import noise_seed
from autoselect_fast.training.schedule import tau_schedule

VISION = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


@pytest.fixture(scope="module")
def tokenizer():
    return S.build_tokenizer()


def _text(tokenizer):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).to_dict()


@pytest.fixture(scope="module")
def llava(tokenizer):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=VISION.to_dict(), text_config=_text(tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids(S.IMAGE_TOKEN), image_seq_length=16)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava_next(tokenizer):
    torch.manual_seed(1)
    config = LlavaNextConfig(vision_config=VISION.to_dict(), text_config=_text(tokenizer),
                             image_token_id=tokenizer.convert_tokens_to_ids(S.IMAGE_TOKEN), image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(config).eval()


def picture(seed, size=(40, 30)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def samples_for(model, tokenizer, count, sizes=((40, 30),)):
    """Conversation samples of random pictures (answers: colour words)."""
    from autoselect_fast.training.data import Sample, tokenize_conversation

    adapter = get_adapter(model)
    processor = adapter.default_image_processor()
    colours = list(S.COLOURS)
    out, tokens = [], []
    for i in range(count):
        pv, size = adapter.process_image(picture(i, sizes[i % len(sizes)]), processor)
        msgs = [{"role": "user", "content": f"{S.IMAGE_TOKEN} what colour is the shape ?"}, {"role": "assistant", "content": colours[i % 6]}]
        ids, labels = tokenize_conversation(tokenizer, msgs, S.IMAGE_TOKEN)
        out.append(Sample(torch.tensor(ids), torch.tensor(labels), pv, size))
        tokens.append(adapter.layout(size).num_tokens)
    return SampleList(out, tokens)


def small_config(tmp_path, **over):
    # adam_eps 1e-2: the update is smooth in the gradient, so layouts that differ only in float
    # summation order give updates that differ by rounding (with 1e-8 tiny gradients flip signs).
    values = dict(output_dir=str(tmp_path / "run"), keep=4, steps=4, batch_size=4, lr=1e-3, adam_eps=1e-2, warmup_steps=1, scorer_hidden_dim=32,
                  scorer_layers=1, scorer_heads=4, denoiser_mlp_ratio=2.0, save_every=0, progress=False, kernel_backend="reference")
    values.update(over)
    return TrainConfig(**values)


def vlm_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Model glue: the training sequence is the model's own input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_training_sequence_reproduces_model_logits(which, request, tokenizer):
    """With the model's own projected features in place, the adapter's sequence gives the model's logits."""
    model = request.getfixturevalue(which)
    adapter = get_adapter(model)
    data = samples_for(model, tokenizer, 1, sizes=((40, 30),))
    s = data[0]
    with torch.no_grad():
        feats = adapter.encode([s.pixel_values], [s.image_size])[0]
        embeds, positions, labels = adapter.training_sequence(s.input_ids, s.labels, adapter.project(feats), s.image_size)
        rows = torch.arange(embeds.shape[0])
        ours = adapter.training_logits(embeds[None], torch.ones(1, embeds.shape[0], dtype=torch.int64), positions[None], rows)
        layout = adapter.layout(s.image_size)
        ids = s.input_ids.tolist()
        a = ids.index(adapter.image_token_id)
        expanded = torch.tensor([ids[:a] + [adapter.image_token_id] * layout.num_slots + ids[a + 1:]])
        kwargs = {"pixel_values": s.pixel_values[None]}
        if s.image_size is not None:
            kwargs["image_sizes"] = torch.tensor([s.image_size])
        theirs = model(input_ids=expanded, **kwargs).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert labels.shape[0] == embeds.shape[0] and int((labels != -100).sum()) == int((s.labels != -100).sum())


# --------------------------------------------------------------------------------------------------
# Gradients: through Soft Top-K and the VP gate, kernel path == reference path
# --------------------------------------------------------------------------------------------------
def _scorer_grads(model, data, backend, gate="vp"):
    torch.manual_seed(3)
    scorer = Scorer(ScorerConfig(input_dim=32, hidden_dim=32, num_layers=1, num_heads=4))
    from autoselect_fast.modules import Denoiser, DenoiserConfig

    denoiser = Denoiser(DenoiserConfig(input_dim=32, mlp_ratio=2.0))
    objective = AutoSelectObjective(model, scorer, denoiser, keep=5, gate=gate, kernel_backend=backend)
    batch = collate([data[i] for i in range(len(data))], list(range(len(data))))
    out = objective(batch, tau=0.7, step=3, seed=11, normalizer=float(out_tokens(batch)))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in scorer.named_parameters()}, objective


def assert_kernel_gradients_match_reference(loss_ker, grads_ker, loss_ref, grads_ref) -> float:
    """Loss and every Scorer gradient of the kernel path against the reference path; returns the
    gradient scale (largest |∂L/∂head.weight|) the tolerances were relative to."""
    torch.testing.assert_close(loss_ker, loss_ref, rtol=1e-5, atol=1e-6)
    scale = float(grads_ref["head.weight"].abs().max())
    assert scale > 0, "no gradient reached the Scorer"
    for name, g in grads_ref.items():
        assert torch.isfinite(g).all()
        torch.testing.assert_close(grads_ker[name], g, rtol=1e-3, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}")
    return scale


def out_tokens(batch):
    return sum(int((lab[1:] != -100).sum()) for lab in batch.labels)


@pytest.mark.parametrize("which", ["llava", "llava_next"])
def test_gradients_reach_scorer_kernel_equals_reference(which, request, tokenizer):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors")
    model = request.getfixturevalue(which)
    data = samples_for(model, tokenizer, 2, sizes=((40, 30), (30, 40)))
    loss_ref, grads_ref, _ = _scorer_grads(model, data, "reference")
    loss_ker, grads_ker, _ = _scorer_grads(model, data, "triton")
    scale = assert_kernel_gradients_match_reference(loss_ker, grads_ker, loss_ref, grads_ref)
    # head.bias and norm.bias get no gradient in exact arithmetic (the z-score removes any shift of s).
    assert all(float(g.abs().max()) > 1e-4 * scale for n, g in grads_ref.items() if n.startswith("blocks") or n == "head.weight")


def test_keep_ratio_budget_per_image(llava_next, tokenizer):
    """K = max(1, round(ratio * N_i)) per image, for images of different N (LLaVA-NeXT)."""
    from autoselect_fast.modules import Denoiser, DenoiserConfig

    data = samples_for(llava_next, tokenizer, 2, sizes=((40, 30), (30, 80)))
    objective = AutoSelectObjective(llava_next, Scorer(ScorerConfig(input_dim=32, hidden_dim=32, num_layers=1, num_heads=4)),
                                    Denoiser(DenoiserConfig(input_dim=32)), keep_ratio=0.3, kernel_backend="reference")
    batch = collate([data[0], data[1]], [0, 1])
    out = objective(batch, tau=1.0, step=0, seed=0, normalizer=1.0)
    lengths = [data.num_visual_tokens(0), data.num_visual_tokens(1)]
    assert lengths[0] != lengths[1]
    assert out.budgets == [max(1, round(0.3 * n)) for n in lengths]
    torch.testing.assert_close(out.alpha[: lengths[0]].sum(), torch.tensor(float(out.budgets[0])), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert float(objective.scorer.head.weight.grad.abs().max()) > 0


def test_scale_gate_and_global_denoiser_train(llava, tokenizer, tmp_path):
    """The ablations run, give the Scorer gradients, and the global Denoiser mixes tokens (identity does not)."""
    data = samples_for(llava, tokenizer, 2)
    _, grads, _ = _scorer_grads(llava, data, "reference", gate="scale")
    assert float(grads["head.weight"].abs().max()) > 0
    objective = build_objective(llava, small_config(tmp_path, denoiser_attention="global"))
    assert isinstance(objective.denoiser, GlobalDenoiser)
    x = torch.randn(6, 32)
    cu = torch.tensor([0, 6])
    y = objective.denoiser(x, cu)
    x2 = x.clone()
    x2[0] = torch.randn(32)  # not a constant shift: LayerNorm would remove that
    assert not torch.allclose(objective.denoiser(x2, cu)[1:], y[1:])  # token 0 changed the others
    from autoselect_fast.modules import Denoiser, DenoiserConfig

    ident = Denoiser(DenoiserConfig(input_dim=32))
    torch.testing.assert_close(ident(x2)[1:], ident(x)[1:], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Trainer: frozen model, resume, saved Scorer in the engine
# --------------------------------------------------------------------------------------------------
def test_frozen_vlm_bit_identical_and_trainables_move(llava, tokenizer, tmp_path):
    data = samples_for(llava, tokenizer, 8)
    before = vlm_state(llava)
    objective = build_objective(llava, small_config(tmp_path))
    scorer_before = {k: v.clone() for k, v in objective.scorer.state_dict().items()}
    trainer = Trainer(objective, data, small_config(tmp_path))
    trainer.train()
    after = llava.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen VLM parameter changed"
    assert all(not p.requires_grad for p in llava.parameters())
    assert any(not torch.equal(scorer_before[k], v) for k, v in objective.scorer.state_dict().items())
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert {"loss", "tau", "lr", "grad_norm", "alpha_bimodality"} <= set(lines[0])
    assert lines[0]["tau"] > lines[-1]["tau"]
    # the saved Scorer loads straight into the engine and prunes
    scorer = Scorer.from_pretrained(tmp_path / "run" / "scorer", expected_input_dim=32)
    engine = AutoSelectEngine(llava, scorer, keep=4)
    prompt = data[0].input_ids[: int((data[0].labels == -100).sum())]
    out = engine.prefill(Request(prompt=prompt, pixel_values=data[0].pixel_values))
    assert out.kept_tokens == [4] and torch.isfinite(out.logits).all()


class _Crash(RuntimeError):
    pass


def test_resume_after_kill_gives_identical_scorer(llava, tokenizer, tmp_path):
    data = samples_for(llava, tokenizer, 6)
    straight = small_config(tmp_path / "a", steps=6, batch_size=4, save_every=3)
    t = Trainer(build_objective(llava, straight), data, straight)
    t.train()
    want = {k: v.clone() for k, v in t.objective.scorer.state_dict().items()}

    killed = small_config(tmp_path / "b", steps=6, batch_size=4, save_every=3)
    t = Trainer(build_objective(llava, killed), data, killed)

    def crash(step, metrics):
        if step == 4:  # one step past the checkpoint at step 3: its work is lost, as after a kill
            raise _Crash

    with pytest.raises(_Crash):
        t.train(on_step=crash)
    torch.manual_seed(12345)  # a fresh process has other RNG states; resume must restore them
    resumed = small_config(tmp_path / "b", steps=6, batch_size=4, save_every=3, resume=True)
    t = Trainer(build_objective(llava, resumed), data, resumed)
    assert t.step == 3
    t.train()
    got = t.objective.scorer.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed run differs from the straight run"
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_grad_accumulation_equals_one_big_batch(llava, tokenizer, tmp_path):
    data = samples_for(llava, tokenizer, 4)
    results = []
    for accum in (1, 2):
        cfg = small_config(tmp_path / f"acc{accum}", steps=2, batch_size=4, grad_accum=accum)
        t = Trainer(build_objective(llava, cfg), data, cfg)
        t.train()
        results.append(t.objective.scorer.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-6)


def test_noise_seed_is_fixed_by_step_and_slot():
    assert noise_seed(0, 5, 3) == noise_seed(0, 5, 3)
    assert len({noise_seed(0, s, i) for s in range(20) for i in range(20)}) == 400
    assert all(0 <= noise_seed(7, s, 1) < 2**62 for s in range(100))


def test_tau_schedule_is_a_cosine_from_start_to_end():
    assert tau_schedule(0, 2000) == pytest.approx(2.0)
    assert tau_schedule(1000, 2000) == pytest.approx(1.05)
    assert tau_schedule(2000, 2000) == pytest.approx(0.1)
    assert tau_schedule(5000, 2000) == pytest.approx(0.1)
    taus = [tau_schedule(s, 100, 3.0, 0.5) for s in range(101)]
    assert taus == sorted(taus, reverse=True)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        tau_schedule(-1, 10)
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        tau_schedule(0, 0)


# --------------------------------------------------------------------------------------------------
# Bad configuration fails before the first step
# --------------------------------------------------------------------------------------------------
def test_bad_config_fails_before_training(llava, tokenizer, tmp_path):
    data = samples_for(llava, tokenizer, 2)
    with pytest.raises(ValueError, match="keep=17 exceeds the 16 visual tokens"):
        cfg = small_config(tmp_path, keep=17)
        Trainer(build_objective(llava, cfg), data, cfg)
    with pytest.raises(ValueError, match=r"tau_end \(3.0\) must not exceed tau_start \(2.0\)"):
        small_config(tmp_path, tau_end=3.0).validate()
    with pytest.raises(TypeError, match="model must be one of"):
        build_objective(torch.nn.Linear(2, 2), small_config(tmp_path))
    wrong = Scorer(ScorerConfig(input_dim=48, hidden_dim=32, num_layers=1, num_heads=4))
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="input_dim=48"):
        build_objective(llava, small_config(tmp_path, scorer_init=str(tmp_path / "wrong")))
    with pytest.raises(ValueError, match="give exactly one of keep"):
        small_config(tmp_path, keep=None).validate()
    with pytest.raises(ValueError, match="batch_size"):
        small_config(tmp_path, batch_size=5, grad_accum=2).validate()
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as fh:
        json.dump({"architectures": ["BertModel"]}, fh)
    with pytest.raises(ValueError, match="supported model classes"):
        load_model(str(tmp_path / "m"), torch.device("cpu"))


def test_cli_bad_settings_one_line_error(tmp_path, capsys):
    from autoselect_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", str(tmp_path), "--data", "x.jsonl", "--keep", "3", "--tau-end", "5"])
    assert exc.value.code == 2
    assert "tau_end (5.0) must not exceed tau_start (2.0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", str(tmp_path), "--data", "x.jsonl", "--keep", "3", "--keep-ratio", "0.5"])
    assert "give exactly one of keep" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Data: JSONL conversations with the chat template; bad lines reported with their number
# --------------------------------------------------------------------------------------------------
def write_dataset(folder, count=4, bad=True):
    os.makedirs(folder / "img", exist_ok=True)
    lines = []
    for i in range(count):
        picture(i).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape ?"}, {"from": "gpt", "value": list(S.COLOURS)[i % 6]}]}))
    if bad:
        (folder / "img" / "broken.png").write_bytes(b"not a png")
        lines.insert(1, "{not json")
        lines.insert(3, json.dumps({"image": "img/broken.png", "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "red"}]}))
        lines.insert(4, json.dumps({"image": "img/missing.png", "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "red"}]}))
        lines.insert(5, json.dumps({"image": "img/0.png", "conversations": [{"from": "human", "value": "<image> x"}]}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_conversation_dataset_reports_bad_lines(llava, tokenizer, tmp_path):
    path = write_dataset(tmp_path)
    messages = []
    ds = ConversationDataset(str(path), get_adapter(llava), tokenizer, log=messages.append)
    assert len(ds) == 4
    assert [p.line for p in ds.problems] == [2, 4, 5, 6]
    assert "not valid JSON" in ds.problems[0].reason and "cannot be read" in ds.problems[1].reason
    assert "no assistant" in ds.problems[3].reason and "line 2" in messages[0]
    s = ds[0]
    words = tokenizer.convert_ids_to_tokens(s.input_ids)
    targets = [w for w, lab in zip(words, s.labels.tolist()) if lab != -100]
    assert targets == ["red", "</s>"] and words.count(S.IMAGE_TOKEN) == 1
    with pytest.raises(ValueError, match="line 2"):
        ConversationDataset(str(path), get_adapter(llava), tokenizer, strict=True)


def test_cli_train_and_ddp_two_gloo_processes(llava, tokenizer, tmp_path):
    """`autoselect-fast train` once with one process and once under torchrun with two gloo processes
    (same global batch): the same Scorer up to float summation order."""
    model_dir = tmp_path / "model"
    llava.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_dataset(tmp_path / "data", count=8, bad=False)
    base = {"model": str(model_dir), "data": str(data), "keep": 4, "steps": 2, "batch_size": 4, "lr": 1e-3, "adam_eps": 1e-2, "warmup_steps": 1,
            "scorer_hidden_dim": 32, "scorer_layers": 1, "scorer_heads": 4, "denoiser_mlp_ratio": 2.0, "progress": False,
            "kernel_backend": "reference", "save_every": 0}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    outs = {}
    for name, launcher in (("one", [sys.executable, "-m", "autoselect_fast"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                                    "-m", "autoselect_fast"])):
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(json.dumps({**base, "output_dir": str(tmp_path / name)}))
        proc = subprocess.run(launcher + ["train", "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = Scorer.from_pretrained(tmp_path / name / "scorer").state_dict()
    for k in outs["one"]:
        torch.testing.assert_close(outs["two"][k], outs["one"][k], rtol=0, atol=1e-6)
    m1 = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    m2 = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["answer_tokens"] == b["answer_tokens"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
