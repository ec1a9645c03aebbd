"""The lmms-eval model ``autoselect`` end to end, offline, on tiny random-weight checkpoints saved to disk.

Runs where lmms-eval is installed (``.ci/eval_env.sh``: its own virtual environment); skipped elsewhere.

* ``python -m lmms_eval --model autoselect ... --tasks autoselect_shapes --limit 32`` (a subprocess, as a
  user types it) for a tiny LLaVA-1.5, a tiny LLaVA-NeXT and a tiny Qwen2.5-VL: the accuracy it reports equals the engine's
  direct answers to the same questions (same answers, same count).
* Every token kept through the eval model answers as transformers' own ``generate`` does.
* ``--force_simple --tasks autoselect_shapes_mc``: log-likelihood scoring (and its greedy flag) equals the
  model's own loss on prompt and continuation tokenised as one text; with pruning it equals the pruned
  engine's next-token logits; prompt and continuation are split after tokenising them together.
* Requests are batched before their images are decoded; repeats of a document sample differently.
* One lmms-eval batch is one packed engine batch (mixed image sizes on Qwen2.5-VL), and the generation
  arguments (stop strings, max new tokens, temperature) are honoured.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here (it has its own environment: .ci/eval_env.sh)")

sys.path.insert(0, os.path.dirname(__file__))
from tiny_checkpoints import save_llava_next, save_qwen2_5_vl, save_scorer  # noqa: E402

from autoselect_fast.engine import AutoSelectEngine, Request  # noqa: E402
from autoselect_fast.eval import TASKS_DIR  # noqa: E402
from autoselect_fast.local_checkpoint import load_scorer, open_checkpoint  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LIMIT = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from autoselect_fast.training import synthetic

    root = tmp_path_factory.mktemp("lmms_eval_models")
    tokenizer = synthetic.build_tokenizer()  # the task's words: the six colours are 6 of its 24 tokens
    model = synthetic.build_tiny_llava(tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of a wider spread: greedy answers then vary with the image and the kept tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2, generator=generator)
    llava = synthetic.save_checkpoint(model, tokenizer, str(root / "llava"))
    return {
        "llava": llava,  # the learning experiment's tiny LLaVA (random weights): N = 64, the task's grid
        "scorer": save_scorer(str(root / "scorer"), input_dim=64),
        "qwen": save_qwen2_5_vl(str(root / "qwen2_5_vl")),  # 56 px images: 2x2 groups of 28 px
        "qwen_scorer": save_scorer(str(root / "scorer128"), input_dim=128),
        "next": save_llava_next(str(root / "llava_next")),  # 56 px tiles of 16 tokens: a 56 px image is a 2x2 grid + base
        "next_scorer": save_scorer(str(root / "scorer32"), input_dim=32),
        "root": root,
    }


def task_docs(limit=LIMIT):
    """The offline task's first ``limit`` documents, as lmms-eval reads them (shapes.jsonl next to the YAML)."""
    from PIL import Image

    docs = []
    with open(os.path.join(TASKS_DIR, "autoselect_shapes", "shapes.jsonl")) as fh:
        for line in fh:
            doc = json.loads(line)
            with Image.open(os.path.join(TASKS_DIR, "autoselect_shapes", doc["image"])) as im:
                doc["pil"] = im.convert("RGB")
            docs.append(doc)
            if len(docs) == limit:
                break
    return docs


def response(sample) -> str:
    """A logged sample's (filtered) answer: lmms-eval 0.7 logs it as a string, older versions as a list."""
    r = sample["filtered_resps"]
    return r if isinstance(r, str) else r[0]


def first_word(text):
    from autoselect_fast.eval.tasks.autoselect_shapes.utils import first_word as rule

    return rule(text)


def run_lmms_eval(out_dir, model_args: str, task: str = "autoselect_shapes", *extra: str) -> tuple[dict, list]:
    """``python -m lmms_eval`` in a subprocess; returns (results of the task, logged samples by doc id)."""
    env = {**os.environ, **OFFLINE, "HF_HOME": str(out_dir / "hf")}
    env.pop("TRITON_INTERPRET", None)  # the CPU engine then selects with the reference path (no interpreter)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "autoselect", "--model_args", model_args, "--tasks", task,
           "--include_path", TASKS_DIR, "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(out_dir), "--log_samples",
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = samples = None
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if name.endswith("_results.json"):
                with open(os.path.join(folder, name)) as fh:
                    results = json.load(fh)["results"][task]
            if name.endswith(f"_samples_{task}.jsonl"):
                with open(os.path.join(folder, name)) as fh:
                    samples = sorted((json.loads(line) for line in fh), key=lambda s: s["doc_id"])
    assert results is not None and samples is not None, os.listdir(out_dir)
    return results, samples


def engine_answers(model_dir, scorer_dir, keep, docs, *, max_new_tokens=3):
    """The engine's own answers to the task's questions: the checkpoint's chat template, one image each."""
    checkpoint = open_checkpoint(model_dir)
    model = checkpoint.load_model(torch.device("cpu"), torch.float32, progress=False)
    scorer = load_scorer(scorer_dir, checkpoint.skeleton_adapter.feature_dim, model_dir)
    engine = AutoSelectEngine(model, scorer, keep=keep, image_processor=checkpoint.image_processor, tokenizer=checkpoint.tokenizer)
    requests = [Request(checkpoint.chat_prompt(d["question"]), images=[d["pil"]]) for d in docs]
    eos = model.generation_config.eos_token_id
    out = engine.generate(requests, max_new_tokens=max_new_tokens, eos_token_id=eos)
    return [checkpoint.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.token_ids]


@pytest.mark.parametrize("model,scorer,keep", [("llava", "scorer", 8), ("next", "next_scorer", 8), ("qwen", "qwen_scorer", 2)])
def test_command_line_accuracy_equals_engine_answers(files, tmp_path, model, scorer, keep):
    args = f"pretrained={files[model]},scorer={files[scorer]},keep={keep},device=cpu,dtype=fp32"
    results, samples = run_lmms_eval(tmp_path, args)
    docs = task_docs()
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    direct = engine_answers(files[model], files[scorer], keep, docs)
    got = [response(s) for s in samples]
    assert [first_word(g) for g in got] == [first_word(d) for d in direct]  # same answers
    correct = sum(first_word(d) == doc["answer"] for d, doc in zip(direct, docs))
    assert results["accuracy,none"] == pytest.approx(correct / LIMIT)  # same count
    assert [s["accuracy"] for s in samples] == [float(first_word(d) == doc["answer"]) for d, doc in zip(direct, docs)]


# --------------------------------------------------------------------------------------------------
# The model object, as lmms-eval drives it (in process)
# --------------------------------------------------------------------------------------------------
def build_lm(cls_name: str, args: str):
    from autoselect_fast.eval import lmms_model

    return getattr(lmms_model, cls_name).create_from_arg_string(args, {"batch_size": "1", "device": None})


def chat_instances(lm, docs, gen_kwargs, task="autoselect_shapes"):
    """generate_until Instances as lmms-eval's ConfigurableMessagesTask builds them, docs in lm.task_dict."""
    from lmms_eval.api.instance import Instance

    from autoselect_fast.eval.tasks.autoselect_shapes.utils import doc_to_messages

    lm.task_dict = {task: {"test": {i: d for i, d in enumerate(docs)}}}
    return [Instance(request_type="generate_until", arguments=("", doc_to_messages, dict(gen_kwargs), i, task, "test"), idx=0,
                     metadata={"task": task, "doc_id": i, "repeats": 1}) for i in range(len(docs))]


@pytest.mark.parametrize("model", ["llava", "qwen"])
def test_every_token_answers_as_transformers_generate(files, model):
    from test_cli_local_models import qwen_reference_answer, reference_answer

    docs = task_docs(6)
    lm = build_lm("AutoSelectChat", f"pretrained={files[model]},device=cpu,batch_size=3")  # no budget: every token kept
    answers = lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 4, "until": []}))
    checkpoint = open_checkpoint(files[model])
    for doc, answer in zip(docs, answers):
        path = os.path.join(TASKS_DIR, "autoselect_shapes", doc["image"])
        if model == "llava":
            ids = reference_answer(files[model], path, doc["question"], 4)
        else:
            ids = qwen_reference_answer(files[model], path, checkpoint.chat_prompt(doc["question"]), 4)
        assert answer == checkpoint.tokenizer.decode(ids, skip_special_tokens=True)


def test_generation_arguments_are_honoured(files):
    docs = task_docs(8)
    lm = build_lm("AutoSelectChat", f"pretrained={files['llava']},scorer={files['scorer']},keep=16,device=cpu,batch_size=8,seed=7")
    calls = []
    generate = lm.engine.generate

    def recorded(requests, **kwargs):
        out = generate(requests, **kwargs)
        calls.append((kwargs, [sorted(r.stop_token_ids or []) for r in requests], out.token_ids))
        return out

    lm.engine.generate = recorded
    decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    long = lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 6, "until": []}))
    long_ids = calls[-1][2]
    assert calls[-1][0]["max_new_tokens"] == 6 and not calls[-1][0]["do_sample"] and calls[-1][0]["eos_token_id"] == lm.eos_token_ids
    assert long == [decode(ids) for ids in long_ids] and all(len(ids) <= 6 for ids in long_ids)
    assert max(len(ids) for ids in long_ids) == 6 and len(set(long)) > 4  # answers differ by image
    short = lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 2, "until": []}))
    assert calls[-1][2] == [ids[:2] for ids in long_ids] and short == [decode(ids[:2]) for ids in long_ids]
    # a stop string ends each answer where it first occurs; one that is a token also stops decoding there
    word = max((w for a in long for w in a.split()), key=lambda w: sum(w in a for a in long))
    cut = lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 6, "until": [word]}))
    assert cut == [a[:a.find(word)] if word in a else a for a in long] and cut != long
    stop_id = lm.tokenizer.convert_tokens_to_ids(word)
    assert calls[-1][1] == [[stop_id]] * len(docs)
    assert calls[-1][2] == [ids[:ids.index(stop_id) + 1] if stop_id in ids else ids for ids in long_ids]
    # temperature > 0 samples: reproducible under the seed (per document), not the greedy answers
    hot = {"max_new_tokens": 6, "until": [], "temperature": 5.0}
    first, again = lm.generate_until(chat_instances(lm, docs, hot)), lm.generate_until(chat_instances(lm, docs, hot))
    assert calls[-1][0]["do_sample"] and calls[-1][0]["temperature"] == 5.0
    assert first == again and first != long
    with pytest.raises(ValueError, match="beam search"):
        lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 2, "num_beams": 3}))


def test_repeats_sample_differently_and_batches_decode_their_own_images(files):
    """lmms-eval sends a document's repeats as the same request again: sampled, each repeat answers on its own
    (same seed argument), the whole call reproducibly; greedy repeats agree. A batch decodes its own images only."""
    from autoselect_fast.eval.lmms_model import DEFAULT_MAX_NEW_TOKENS
    from autoselect_fast.eval.tasks.autoselect_shapes.utils import doc_to_messages

    docs = task_docs(4)
    lm = build_lm("AutoSelectChat", f"pretrained={files['llava']},scorer={files['scorer']},keep=16,device=cpu,batch_size=3,seed=7")
    decoded, decoded_at_batch = [], []

    def counted(doc):
        decoded.append(doc["id"])
        return doc_to_messages(doc)

    generate = lm.engine.generate

    def recorded(requests, **kwargs):
        decoded_at_batch.append(len(decoded))
        return generate(requests, **kwargs)

    lm.engine.generate = recorded

    def repeated(gen_kwargs):
        instances = chat_instances(lm, docs, gen_kwargs)
        for inst in instances:
            inst.arguments = (inst.arguments[0], counted, *inst.arguments[2:])
        return [inst for inst in instances for _ in range(2)]  # as lmms-eval's evaluator clones them

    hot = {"max_new_tokens": 6, "until": [], "temperature": 5.0}
    first = lm.generate_until(repeated(hot))
    assert decoded_at_batch == [3, 6, 8]  # 8 requests in batches of 3, each decoding its own
    assert all(first[2 * i] != first[2 * i + 1] for i in range(len(docs)))  # repeats sample differently
    assert lm.generate_until(repeated(hot)) == first  # and reproducibly
    greedy = lm.generate_until(repeated({"max_new_tokens": 6, "until": []}))
    assert greedy[0::2] == greedy[1::2] == lm.generate_until(chat_instances(lm, docs, {"max_new_tokens": 6, "until": []}))
    # a task may write max_new_tokens: None, which means the default
    assert lm._generation_settings({"max_new_tokens": None})["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS


def test_one_lmms_batch_is_one_packed_batch_with_mixed_sizes(files):
    """Qwen2.5-VL: images of three sizes in one lmms-eval batch go through one engine call, and each
    answer equals the engine's answer to that request alone."""
    docs = task_docs(3)
    sizes = [(56, 56), (112, 56), (84, 140)]
    for doc, size in zip(docs, sizes):
        doc["pil"] = doc["pil"].resize(size)
    lm = build_lm("AutoSelectChat", f"pretrained={files['qwen']},scorer={files['qwen_scorer']},keep_ratio=0.5,device=cpu,batch_size=3")

    def messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["pil"]}, {"type": "text", "text": doc["question"]}]}]

    from lmms_eval.api.instance import Instance

    lm.task_dict = {"t": {"test": dict(enumerate(docs))}}
    instances = [Instance(request_type="generate_until", arguments=("", messages, {"max_new_tokens": 4, "until": []}, i, "t", "test"),
                          idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(3)]
    calls = []
    generate = lm.engine.generate

    def recorded(requests, **kwargs):
        out = generate(requests, **kwargs)
        calls.append((len(requests), out.prefill.visual_tokens, out.prefill.kept_tokens))
        return out

    lm.engine.generate = recorded
    answers = lm.generate_until(instances)
    assert calls == [(3, [4, 8, 15], [2, 4, 8])]  # one packed batch; K_i = round(N_i / 2) per image
    checkpoint = lm.checkpoint
    for doc, answer in zip(docs, answers):
        alone = generate([Request(checkpoint.chat_prompt(doc["question"]), images=[doc["pil"]])], max_new_tokens=4,
                         eos_token_id=lm.eos_token_ids)
        assert answer == checkpoint.tokenizer.decode(alone.token_ids[0], skip_special_tokens=True)


def test_loglikelihood_equals_the_model_loss(files, tmp_path):
    """--force_simple on the multiple-choice task: per choice the mean NLL of its tokens, as the model's own loss
    on prompt and choice tokenised as one text, and the greedy flag, as the argmax of the model's logits."""
    results, samples = run_lmms_eval(tmp_path, f"pretrained={files['llava']},device=cpu", "autoselect_shapes_mc", "--force_simple")
    from transformers import AutoProcessor

    checkpoint = open_checkpoint(files["llava"])
    model = checkpoint.load_model(torch.device("cpu"), torch.float32, progress=False)
    processor = AutoProcessor.from_pretrained(files["llava"])
    correct, flags = 0, []
    for doc, sample in zip(task_docs(), samples):
        prompt = checkpoint.chat_prompt(doc["question"])
        context = processor(images=doc["pil"], text=prompt, return_tensors="pt")["input_ids"][0]
        losses, greedy = [], []
        for choice in doc["choices"]:
            joined = processor(images=doc["pil"], text=prompt + " " + choice, return_tensors="pt")
            ids, n = joined["input_ids"], len(context)
            assert torch.equal(ids[0, :n], context)  # this word-level tokenizer never merges across the boundary
            labels = torch.full_like(ids, -100)
            labels[0, n:] = ids[0, n:]
            with torch.no_grad():
                out = model(input_ids=ids, pixel_values=joined["pixel_values"], labels=labels)
            losses.append(float(out.loss))
            greedy.append(bool((out.logits[0, n - 1:-1].argmax(-1) == ids[0, n:]).all()))
        got = [float(r[0]) for r in sample["filtered_resps"]]  # logged as [str(nll), str(greedy)] per choice
        assert got == pytest.approx(losses, rel=1e-4, abs=1e-5)
        assert [str(r[1]) == "True" for r in sample["filtered_resps"]] == greedy
        flags += greedy
        correct += int(min(range(len(losses)), key=losses.__getitem__) == doc["choices"].index(doc["answer"]))
    assert results["acc,none"] == pytest.approx(correct / LIMIT)
    assert True in flags and False in flags  # the flag is compared both ways


def test_split_continuation_tokenises_prompt_and_continuation_together():
    """A SentencePiece-style tokenizer (Llama's rule: a space before the text, spaces as "▁"): " red" alone is
    "▁", "▁red", which "... ASSISTANT: red" never holds; the split takes the joined text's tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from autoselect_fast.eval.lmms_model import split_continuation

    words = ["<unk>", "<s>", "▁", "▁USER:", "▁what", "▁colour", "▁ASSISTANT:", "▁red", "▁re"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>")

    def ids(*tokens):
        return [words.index(t) for t in tokens]

    prompt = "USER: what colour ASSISTANT:"
    assert tokenizer(" red", add_special_tokens=False)["input_ids"] == ids("▁", "▁red")  # apart: not the joined tokens
    context, continuation = split_continuation(tokenizer, prompt, " red")
    assert context == ids("<s>", "▁USER:", "▁what", "▁colour", "▁ASSISTANT:") == tokenizer(prompt)["input_ids"]
    assert continuation == ids("▁red")
    # the boundary merges (" re" + "d" is one token "▁red"): split at the longest common prefix
    context, continuation = split_continuation(tokenizer, prompt + " re", "d")
    assert context == ids("<s>", "▁USER:", "▁what", "▁colour", "▁ASSISTANT:") and continuation == ids("▁red")
    with pytest.raises(ValueError, match="continuation '' adds no tokens"):
        split_continuation(tokenizer, prompt, "")


def loglikelihood_instances(lm, docs, continuations, doc_to_visual, task="t"):
    """loglikelihood Instances as lmms-eval's multiple-choice task builds them for a simple model."""
    from lmms_eval.api.instance import Instance

    lm.task_dict = {task: {"test": dict(enumerate(docs))}}
    return [Instance(request_type="loglikelihood", arguments=(d["question"], c, doc_to_visual, i, task, "test"), idx=j,
                     metadata={"task": task, "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs) for j, c in enumerate(continuations)]


def test_pruned_loglikelihood_equals_the_pruned_engine(files):
    """With keep: each continuation token's log-probability is the pruned engine's next-token logits after the
    joined prompt's prefix (its first-token output, not the tail rows the model reads), the greedy flag their
    argmax; the scores differ from the unpruned model's; each batch decodes its own images only."""
    from lmms_eval.api.instance import unwrap_generation_output

    docs = task_docs(4)
    continuations = [" " + c for c in docs[0]["choices"]] + [" the diamond ?"]
    decoded = []

    def doc_to_visual(doc):
        decoded.append(doc["id"])
        return [doc["pil"]]

    lm = build_lm("AutoSelectSimple", f"pretrained={files['llava']},scorer={files['scorer']},keep=8,device=cpu,batch_size=4")
    prefill, decoded_at_batch = lm.engine.prefill, []

    def recorded(requests, **kwargs):
        decoded_at_batch.append(len(decoded))
        return prefill(requests, **kwargs)

    lm.engine.prefill = recorded
    got = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(loglikelihood_instances(lm, docs, continuations, doc_to_visual))]
    assert decoded_at_batch == [4, 8, 12, 16, 20, 24, 28]  # 28 requests in batches of 4, each decoding its own
    want, logits = [], {}
    for doc in docs:
        prompt = lm.checkpoint.chat_prompt(doc["question"])
        n = len(lm.tokenizer(prompt)["input_ids"])
        for c in continuations:
            joined = lm.tokenizer(prompt + c)["input_ids"]
            log_probs = []
            for j in range(n, len(joined)):
                key = (doc["id"], tuple(joined[:j]))
                if key not in logits:
                    logits[key] = torch.log_softmax(prefill([Request(joined[:j], images=[doc["pil"]])]).logits[0].float(), -1)
                log_probs.append(logits[key])
            target = joined[n:]
            want.append((-sum(float(lp[t]) for lp, t in zip(log_probs, target)) / len(target),
                         all(int(lp.argmax()) == t for lp, t in zip(log_probs, target))))
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert {w[1] for w in want} == {True, False}  # the flag is compared both ways
    full = build_lm("AutoSelectSimple", f"pretrained={files['llava']},device=cpu,batch_size=4")
    unpruned = [unwrap_generation_output(r)[0][0] for r in full.loglikelihood(loglikelihood_instances(full, docs, continuations, doc_to_visual))]
    assert max(abs(a - b[0]) for a, b in zip(unpruned, got)) > 1e-3  # pruning changed the scores


def test_bad_model_arguments_fail_before_loading(files, monkeypatch):
    from autoselect_fast.local_checkpoint import LocalCheckpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad argument was found")

    base = f"pretrained={files['llava']},device=cpu"
    bad = [
        (base + ",kep=4", r"unknown model argument\(s\) \['kep'\]"),
        (base + ",keep=4,selector=fastv", "selector must be one of"),
        (base + ",keep=4", "selector=scorer with a budget .* needs scorer=DIR"),
        ("pretrained=/nonexistent/dir,device=cpu", "pretrained='/nonexistent/dir': not a checkpoint directory"),
        (base + ",keep=0,selector=norm", "keep must be an int >= 1"),
        (base + ",keep_ratio=1.5,selector=norm", "keep_ratio must be a float in \\(0, 1\\]"),
        (base + ",dtype=fp64", "dtype must be one of"),
        (base + ",batch_size=0", "batch_size must be an int >= 1"),
        (base + ",selection_backend=triton", "selection_backend must be one of"),
        (f"pretrained={files['qwen']},keep=2,selector=visionzip,device=cpu", "selector='visionzip' .* no \\[CLS\\] token"),
        (base + ",keep=65,selector=divprune", "keep=65 exceeds the 64 visual tokens of every image"),  # LLaVA-1.5: N = 64
    ]
    with monkeypatch.context() as patch:
        patch.setattr(LocalCheckpoint, "load_model", no_loading)
        for args, message in bad:
            with pytest.raises(ValueError, match=message):
                build_lm("AutoSelectChat", args)
    lm = build_lm("AutoSelectChat", base + ",keep=64,selector=divprune,batch_size=5")
    assert lm.batch_size == 5 and lm.engine.keep == 64


# --------------------------------------------------------------------------------------------------
# The learning experiment's table, every row through the lmms-eval model on the offline task
# --------------------------------------------------------------------------------------------------
def test_experiment_table_through_lmms_eval(tmp_path):
    """Shortened experiment (tests/test_training_experiment.py's settings): every method's accuracy through
    lmms-eval equals the engine's direct answers, and the trained Scorer passes the same checks as there
    (above random, norm and VisionZip-style selection)."""
    from test_training_experiment import check_learning, run_short_experiment

    os.environ.update({**OFFLINE, "HF_HOME": str(tmp_path / "hf")})
    result = run_short_experiment(tmp_path, "ci-lmms", "lmms-eval")
    check_learning(result)
    assert result["summary"]["lmms_eval_answers_equal_engine"]
    for method in result["methods"].values():
        assert method["accuracy"] == method["engine_accuracy"]
        assert method["lmms_eval_model_args"]["selector"] == method["selector"]
