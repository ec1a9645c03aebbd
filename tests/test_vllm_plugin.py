"""The vLLM plugin inside vLLM itself (CPU build). It is compared with vLLM's in-tree Qwen2.5-VL and with
``AutoSelectEngine``, on one tiny random-weight checkpoint with images of different sizes.

Most tests run vLLM's engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: errors surface here).
Three run in vLLM's default mode, the engine in a process of its own, as a user meets it: the README's
offline script run as a file, a bad setting in a fresh process, and the OpenAI server.

This file needs vLLM (the pinned CPU build). ``bash .ci/vllm_env.sh`` builds that environment and runs
this file there; everywhere else it is skipped. Each ``vllm.LLM`` takes 5-15 s to start on CPU, so every
configuration is started once: its outputs are collected by a module-scoped fixture, and the instance
is deleted before the next one starts.

Tolerances: token ids must be equal. Log-probabilities must agree within 1e-4 (float32 on both
sides; the engines batch and order their float32 sums differently).
"""
from __future__ import annotations

import ast
import base64
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in this process: errors surface here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per instance
vllm = pytest.importorskip("vllm", reason="vLLM is not installed: `bash .ci/vllm_env.sh` builds its environment and runs these tests")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from test_readme import SUITE_ONLY_VARIABLES  # noqa: E402
from test_readme import VLLM as README_VLLM_SNIPPETS  # noqa: E402
from tiny_checkpoints import save_qwen2_5_vl  # noqa: E402

from autoselect_fast.modules import Scorer, ScorerConfig  # noqa: E402
from autoselect_fast.vllm_plugin import ARCHITECTURE  # noqa: E402
from autoselect_fast.vllm_plugin.settings import SettingError  # noqa: E402

GREEDY_TOKENS = 8
LOGPROB_TOL = 1e-4
TOP = 3  # log-probabilities compared: the first token's TOP most likely tokens
NO_COUNTS = {"selected_at_add": 0, "selected_at_encoder": 0, "without_pixels": 0, "reencoded": 0}


def default_mode_env() -> dict:
    """The environment of a process that runs vLLM as a user would: the engine in its own process, and
    none of the test suite's variables (without TRITON_INTERPRET, ``ops`` takes its reference path on CPU)."""
    dropped = ("VLLM_ENABLE_V1_MULTIPROCESSING", *SUITE_ONLY_VARIABLES)
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, "VLLM_CPU_KVCACHE_SPACE": "1"}


def picture(seed: int, width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# A batch of requests with images of different sizes (grids 8x16, 22x10 -> resized, 8x8, 20x20 -> resized),
# one request with two images, a text-only request, and a request with the same picture twice.
REQUESTS = [
    (f"<|im_start|> w1 {IMAGE} w10 w11 <|im_end|> <|im_start|> w2", [(0, 224, 112)]),
    (f"<|im_start|> w1 {IMAGE} w3 {IMAGE} w30 <|im_end|> <|im_start|> w2", [(1, 150, 300), (2, 112, 112)]),
    ("<|im_start|> w4 w5 w6 <|im_end|> <|im_start|> w2", []),
    # Long enough to fill whole KV-cache blocks: when the batch runs again, vLLM's prefix cache holds
    # this image's tokens, so it passes the image without its pixels (the plugin must cope).
    (f"<|im_start|> {IMAGE} " + " ".join(f"w{i % 80}" for i in range(300)) + " <|im_end|> <|im_start|> w2", [(3, 280, 280)]),
    # One picture twice. (Its words are chosen so that the greedy tokens of every configuration vary: with
    # "w13 ... w14" the pruned model repeated one token, which would make the token comparison weak.)
    (f"<|im_start|> w7 {IMAGE} w8 {IMAGE} <|im_end|> <|im_start|> w2", [(0, 224, 112), (0, 224, 112)]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny-qwen-vllm"))
    save_qwen2_5_vl(directory, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, for_vllm=True)
    torch.manual_seed(1)
    Scorer(ScorerConfig(input_dim=4 * 64, hidden_dim=32, num_layers=1, num_heads=2)).save_pretrained(os.path.join(directory, "scorer"))
    Scorer(ScorerConfig(input_dim=64, hidden_dim=32, num_layers=1, num_heads=2)).save_pretrained(os.path.join(directory, "scorer-too-narrow"))
    return directory


def overrides(checkpoint, **settings) -> dict:
    return {"architectures": [ARCHITECTURE], "autoselect_scorer": os.path.join(checkpoint, "scorer"),
            **{f"autoselect_{k}": v for k, v in settings.items()}}


def make_llm(checkpoint, hf_overrides=None, **kwargs):
    # The plugin's model declares images only; vLLM's own needs its video limit set to skip video profiling.
    limits = {"image": 2} if hf_overrides is not None else {"image": 2, "video": 0}
    kwargs = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_seqs=4, seed=0, limit_mm_per_prompt=limits, **kwargs)
    if hf_overrides is not None:
        kwargs["hf_overrides"] = hf_overrides
    return vllm.LLM(model=checkpoint, **kwargs)


def vllm_prompts():
    return [{"prompt": text, "multi_modal_data": {"image": [picture(*im) for im in images]}} if images else {"prompt": text}
            for text, images in REQUESTS]


def run_vllm(checkpoint, hf_overrides=None) -> tuple[list[dict], dict | None]:
    """Greedy generation of every request, twice; per request its prompt length, tokens and the first
    token's top log-probs, and the plugin's image counts (``autoselect_counts``; None in-tree)."""
    llm = make_llm(checkpoint, hf_overrides)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, logprobs=TOP)
        outputs = llm.generate(vllm_prompts(), params)
        # The same batch again: vLLM now holds the images' encoder outputs and passes them without
        # pixels; the plugin must find its selections again and answer the same.
        again = llm.generate(vllm_prompts(), params)
        for first, second in zip(outputs, again):
            assert second.prompt_token_ids == first.prompt_token_ids
            assert second.outputs[0].token_ids == first.outputs[0].token_ids
        counts = llm.collective_rpc("autoselect_counts")[0] if hf_overrides is not None else None
        assert llm.llm_engine.model_config.architectures == ([ARCHITECTURE] if hf_overrides else ["Qwen2_5_VLForConditionalGeneration"])
    finally:
        del llm
        gc.collect()
    results = []
    for out in outputs:
        first = out.outputs[0].logprobs[0]
        results.append({"prompt_tokens": len(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
                        "first_logprobs": {token: lp.logprob for token, lp in first.items()}})
    return results, counts


def run_engine(checkpoint, position_mode="original", **budget) -> list[dict]:
    """The same requests through AutoSelectEngine (same processor, token ids and Scorer)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from autoselect_fast.engine import AutoSelectEngine, ImageInput, Request

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    engine = AutoSelectEngine(model, Scorer.from_pretrained(os.path.join(checkpoint, "scorer")), position_mode=position_mode, **budget)
    requests = []
    for text, images in REQUESTS:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = []
        for im in images:
            processed = processor.image_processor(images=[picture(*im)], return_tensors="pt")
            inputs.append(ImageInput(processed["pixel_values"], processed["image_grid_thw"][0].tolist()))
        requests.append(Request(ids, images=inputs))
    prefill = engine.prefill(requests)
    logprobs = torch.log_softmax(prefill.logits.double(), dim=-1)
    generated = engine.generate(requests, max_new_tokens=GREEDY_TOKENS).token_ids
    return [{"prompt_tokens": length, "tokens": tokens, "logprobs": row}
            for length, tokens, row in zip(prefill.sequence_lengths, generated, logprobs)]


@pytest.fixture(scope="module")
def in_tree(checkpoint):
    return run_vllm(checkpoint)[0]


def test_every_token_kept_equals_vllm_in_tree_qwen(checkpoint, in_tree):
    plugin, counts = run_vllm(checkpoint, overrides(checkpoint, keep_ratio=1.0))
    assert counts == NO_COUNTS  # vLLM's own path
    for ours, theirs in zip(plugin, in_tree):
        assert ours["prompt_tokens"] == theirs["prompt_tokens"]
        assert ours["tokens"] == theirs["tokens"]
        assert ours["first_logprobs"].keys() == theirs["first_logprobs"].keys()
        for token, lp in theirs["first_logprobs"].items():
            assert ours["first_logprobs"][token] == pytest.approx(lp, abs=LOGPROB_TOL)
    # the tiny model's greedy tokens vary (a degenerate model repeating one token would prove little)
    assert all(len(set(r["tokens"])) > 2 for r in in_tree)


@pytest.mark.parametrize(
    "budget,position_mode",
    [({"keep_ratio": 0.5}, "original"), ({"keep_ratio": 0.5}, "compact"), ({"keep": 20}, "original")],
    ids=["ratio-0.5-original", "ratio-0.5-compact", "keep-20-original"],
)
def test_pruned_plugin_agrees_with_autoselect_engine(checkpoint, in_tree, budget, position_mode):
    plugin, counts = run_vllm(checkpoint, overrides(checkpoint, position_mode=position_mode, **budget))
    # Each pruned picture is selected once, when its first request is added (the repeated picture and the
    # repeated batch reuse it); the repeated batch comes partly without pixels (vLLM's prefix cache covers
    # the long request's image) and is served from the remembered selections.
    pictures = {im for _, images in REQUESTS for im in images}
    assert 0 < counts["selected_at_add"] <= len(pictures)
    assert counts["selected_at_encoder"] == 0
    assert counts["without_pixels"] > 0
    engine = run_engine(checkpoint, position_mode=position_mode, **budget)
    for r, (ours, theirs, full) in enumerate(zip(plugin, engine, in_tree)):
        assert ours["prompt_tokens"] == theirs["prompt_tokens"], f"request {r}"
        if REQUESTS[r][1]:
            assert ours["prompt_tokens"] < full["prompt_tokens"], f"request {r} was not pruned"
        assert ours["tokens"] == theirs["tokens"], f"request {r}"
        for token, lp in ours["first_logprobs"].items():
            assert lp == pytest.approx(float(theirs["logprobs"][token]), abs=LOGPROB_TOL), f"request {r}, token {token}"
    # the pruned side's greedy tokens vary too (equal token lists of a model repeating one token would prove little)
    assert all(len(set(r["tokens"])) > 2 for r in plugin)


NOT_A_DIRECTORY = "not a directory (expected a Scorer.save_pretrained checkpoint)"
BOTH_OR_NEITHER = "give exactly one of keep (K per image) and keep_ratio"
KNOWN = "known: autoselect_keep, autoselect_keep_ratio, autoselect_position_mode, autoselect_scorer"


@pytest.mark.parametrize(
    "settings,first_line",
    [
        ({"autoselect_scorer": None, "autoselect_keep_ratio": 0.5},
         "autoselect_scorer is missing: hf_overrides must give the directory of a Scorer checkpoint (Scorer.save_pretrained)"),
        ({"autoselect_scorer": "/nonexistent/scorer", "autoselect_keep_ratio": 0.5}, f'autoselect_scorer="/nonexistent/scorer": {NOT_A_DIRECTORY}'),
        ({"autoselect_scorer": "NARROW", "autoselect_keep_ratio": 0.5},
         'autoselect_scorer="NARROW": the Scorer does not fit this model: Scorer reads vision features of width input_dim=64, '
         "but the model's vision features have width 256 (merge² x vision hidden = 4 x 64)"),
        ({"autoselect_keep_ratio": 0}, "autoselect_keep_ratio=0: keep_ratio must be a float in (0, 1], got 0"),
        ({"autoselect_keep_ratio": 1.5}, "autoselect_keep_ratio=1.5: keep_ratio must be a float in (0, 1], got 1.5"),
        ({"autoselect_keep_ratio": 0.5, "autoselect_keep": 8},
         f"autoselect_keep=8 and autoselect_keep_ratio=0.5: {BOTH_OR_NEITHER}, got keep=8, keep_ratio=0.5"),
        ({}, f"autoselect_keep and autoselect_keep_ratio are both missing: {BOTH_OR_NEITHER}, got keep=None, keep_ratio=None"),
        ({"autoselect_keep_ration": 0.5}, f"autoselect_keep_ration=0.5: unknown setting; {KNOWN}"),
        ({"autoselect_keep_ratio": 0.5, "autoselect_position_mode": "shifted"},
         'autoselect_position_mode="shifted": must be one of "original", "compact"'),
        ({"autoselect_scorer": "MODEL", "autoselect_keep_ratio": 0.5},
         "autoselect_scorer=\"MODEL\": cannot load a Scorer from it: checkpoint at MODEL holds a None, expected a 'scorer'"),
        ({"autoselect_keep_ratio": 0.5, "llm": {"video_pruning_rate": 0.5}},
         "video_pruning_rate=0.5: vLLM's video pruning cannot be combined with this plugin; leave it at 0"),
        ({"autoselect_keep_ratio": 0.5, "llm": {"mm_encoder_tp_mode": "data"}},
         'mm_encoder_tp_mode="data": data-parallel vision encoding is not supported; use the default "weights"'),
    ],
    ids=["no-scorer", "missing-dir", "width-mismatch", "ratio-zero", "ratio-above-one", "both-budgets", "no-budget", "typo",
         "position-mode", "not-a-scorer", "video-pruning", "data-parallel-encoder"],
)
def test_bad_configuration_fails_in_llm_before_the_engine_starts(checkpoint, settings, first_line):
    """vLLM runs the plugin's check while it builds its configuration: ``LLM(...)`` raises the plugin's
    SettingError itself (not vLLM's "Engine core initialization failed"), whose first line names the
    setting and its value as given (0 stays 0)."""
    settings = dict(settings)
    llm_kwargs = settings.pop("llm", {})
    named = {"NARROW": os.path.join(checkpoint, "scorer-too-narrow"), "MODEL": checkpoint}  # MODEL: a directory, not a Scorer
    hf = {"architectures": [ARCHITECTURE], "autoselect_scorer": os.path.join(checkpoint, "scorer"), **settings}
    hf["autoselect_scorer"] = named.get(hf["autoselect_scorer"], hf["autoselect_scorer"])
    if hf["autoselect_scorer"] is None:
        del hf["autoselect_scorer"]
    for name, path in named.items():
        first_line = first_line.replace(name, path)
    with pytest.raises(SettingError) as info:
        make_llm(checkpoint, hf, **llm_kwargs)
    assert str(info.value).splitlines()[0] == "autoselect_fast: " + first_line


def test_bad_setting_is_the_last_line_a_user_sees_in_vllms_default_mode(checkpoint, tmp_path):
    """A script in a fresh process, the engine in its own process (vLLM's default): the traceback ends
    with the plugin's message, and vLLM's engine never starts."""
    hf = overrides(checkpoint, keep_ratio=0)
    script = tmp_path / "bad_setting.py"
    script.write_text(f"import vllm\nif __name__ == '__main__':\n    vllm.LLM(model={checkpoint!r}, hf_overrides={hf!r})\n")
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=default_mode_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "autoselect_fast.vllm_plugin.settings.SettingError: autoselect_fast: autoselect_keep_ratio=0: "
        "keep_ratio must be a float in (0, 1], got 0")
    assert "Engine core initialization failed" not in done.stderr and "EngineCore" not in done.stderr


# --------------------------------------------------------------------------------------------------
# The README's offline script, run as a file in vLLM's default mode
# --------------------------------------------------------------------------------------------------
README_QUESTION = "What is in this picture?"


def test_readme_offline_script_runs_as_a_file(checkpoint, tmp_path):
    """``python offline.py MODEL SCORER picture.png`` with the README's vLLM block as offline.py. Its
    counters come through ``llm.collective_rpc("autoselect_counts")`` from the engine's own process."""
    (snippet,) = README_VLLM_SNIPPETS
    assert README_QUESTION in snippet
    (tmp_path / "offline.py").write_text(snippet)
    picture(0, 224, 112).save(tmp_path / "picture.png")  # 8 x 16 patches: 32 merge groups
    done = subprocess.run([sys.executable, "offline.py", checkpoint, os.path.join(checkpoint, "scorer"), "picture.png"],
                          cwd=tmp_path, env=default_mode_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()  # vLLM logs to stdout too
    (prompt_line,) = [line for line in lines if line.startswith("prompt tokens: ")]
    (counts_line,) = [line for line in lines if line.startswith("[{")]
    # One worker. The picture was selected when its request was added; vLLM's warm-up (the snippet does not
    # set enforce_eager) ran the encoder on its dummy pictures, all one picture, which met the encoder first.
    assert ast.literal_eval(counts_line) == [{**NO_COUNTS, "selected_at_add": 1, "selected_at_encoder": 1}]
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": README_QUESTION}]}]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # one <|image_pad|>
    with_one_pad = tokenizer(text, add_special_tokens=False)["input_ids"]
    kept = round(0.222 * 32)  # the README's keep_ratio, on the picture's 32 groups
    assert prompt_line == f"prompt tokens: {len(with_one_pad) - 1 + kept}"


# --------------------------------------------------------------------------------------------------
# vllm serve: the OpenAI-compatible server with the plugin, one chat request with an image
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_openai_server_serves_a_pruned_chat_request_with_an_image(checkpoint, tmp_path):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url(picture(0, 224, 112))}},
                                             {"type": "text", "text": "w5 w6"}]}]
    hf = overrides(checkpoint, keep_ratio=0.25)
    llm = make_llm(checkpoint, hf)  # the offline answer to the same chat, for comparison
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    try:
        offline = llm.chat(messages, greedy)[0]
        image_pad = llm.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
        # A video is refused by vLLM's frontend (the model declares images only), and the engine lives on.
        with pytest.raises(Exception, match="video"):
            llm.generate({"prompt": "<|vision_start|><|video_pad|><|vision_end|> w1",
                          "multi_modal_data": {"video": np.zeros((4, 56, 56, 3), dtype=np.uint8)}}, greedy)
        assert llm.chat(messages, greedy)[0].outputs[0].text == offline.outputs[0].text
    finally:
        del llm
        gc.collect()
    assert offline.prompt_token_ids.count(image_pad) == 8  # the 224x112 picture: 8x16 patches = 32 groups, K = round(0.25 * 32)

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4",
         "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}), "--hf-overrides", json.dumps(hf)],
        # vLLM's default mode (the engine in its own process); development mode opens /collective_rpc
        stdout=log, stderr=subprocess.STDOUT, env={**default_mode_env(), "VLLM_SERVER_DEV_MODE": "1"},
    )
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}): {(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"the server did not start in 240 s: {(tmp_path / 'server.log').read_text()[-3000:]}"
                time.sleep(1)
        body = json.dumps({"model": checkpoint, "messages": messages, "max_tokens": GREEDY_TOKENS, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        rpc = urllib.request.Request(f"http://127.0.0.1:{port}/collective_rpc", data=json.dumps({"method": "autoselect_counts"}).encode(),
                                     headers={"Content-Type": "application/json"})
        counts = json.loads(urllib.request.urlopen(rpc, timeout=60).read())["results"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert reply["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    assert reply["choices"][0]["message"]["content"] == offline.outputs[0].text
    assert counts == [{**NO_COUNTS, "selected_at_add": 1}]  # one worker, the one picture selected when its request was added
