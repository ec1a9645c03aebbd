"""The report's serving scenario on Qwen2.5-VL: requests, contenders' logits, FLOP accounting, presets.

No timed assertions: what is checked is that transformers' own left-padded batch (the unmodified
``Qwen2_5_VLForConditionalGeneration.forward`` on processor-style inputs, M-RoPE positions computed by
the model) and the engine's packed prefill give the same first-token logits per request, that the
scenario really mixes image sizes (distinct N_i) and prompt lengths, that K_i = max(1, round(r * N_i)),
and that the FLOP counts follow the tokens each contender runs over.
"""
import json

import pytest
import torch

from autoselect_fast import preflight, presets
from autoselect_fast import report as R
from autoselect_fast.cli import main
from autoselect_fast.report import ReportSettings, run_report

# fp32, random weights: the padded batch (SDPA with a mask) and the packed varlen path add in different
# orders; observed differences are ~1e-6.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen_setup():
    return R.BenchSetup.build(presets.get_preset("qwen-tiny"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def serving(qwen_setup):
    return R.serving_scenario(qwen_setup, 16)


def _logits(contender):
    with torch.inference_mode():
        ms, logits = contender.run()
    assert set(R.STAGES) <= set(ms) and ms["total"] > 0
    return logits


def test_serving_scenario_mixes_image_sizes_and_prompt_lengths(qwen_setup, serving):
    assert len(serving.requests) == 16
    n = R.request_visual_tokens(qwen_setup.engine, serving.requests)
    assert len(set(n)) == 16, n  # every image its own resolution, so its own N_i
    assert min(n) >= 4 and max(n) <= 64  # inside the preset's min_pixels / max_pixels bounds (4..64 groups)
    assert n == R.serving_visual_tokens(qwen_setup.engine.adapter, qwen_setup.preset, 16)
    text = [R.request_text_tokens(qwen_setup.engine, r) for r in serving.requests]
    assert sorted(text) == R.mixed_text_lengths(16, *R.SERVING_TEXT) and text != sorted(text)
    assert serving.configs == [("transformers", None), ("engine", None), ("engine", 1 / 3), ("engine", 2 / 9), ("engine", 1 / 9)]


def test_transformers_padded_batch_equals_engine_every_token(qwen_setup, serving):
    """(a) and (b): the unmodified model's left-padded batch and the packed engine, per request."""
    base = R.transformers_contender(qwen_setup, serving.requests)
    engine = R.engine_contender(qwen_setup, serving.requests, None)
    base_logits, engine_logits = _logits(base), _logits(engine)
    assert base_logits.shape == (16, qwen_setup.model.config.text_config.vocab_size)
    torch.testing.assert_close(engine_logits, base_logits, **TOL)
    # The padded batch itself is right: request 0 run alone through the unmodified model gives its row.
    alone = _logits(R.transformers_contender(qwen_setup, serving.requests[:1]))
    torch.testing.assert_close(alone[0], base_logits[0], **TOL)
    assert base.sequence_lengths == engine.sequence_lengths
    assert base.llm_tokens == 16 * max(base.sequence_lengths) > engine.llm_tokens == sum(engine.sequence_lengths)


def test_keep_ratio_budgets_and_flops(qwen_setup, serving):
    n = R.request_visual_tokens(qwen_setup.engine, serving.requests)
    text = [R.request_text_tokens(qwen_setup.engine, r) for r in serving.requests]
    base = R.transformers_contender(qwen_setup, serving.requests)
    full = R.engine_contender(qwen_setup, serving.requests, None)
    flops = [base.flops(), full.flops()]
    for ratio in R.SERVING_RATIOS:
        c = R.engine_contender(qwen_setup, serving.requests, ratio)
        assert c.sequence_lengths == [t + max(1, round(ratio * n_i)) for t, n_i in zip(text, n)]
        assert _logits(c).isfinite().all()
        flops.append(c.flops())
    assert flops == sorted(flops, reverse=True) and flops[-1] > 0  # padding, then fewer kept tokens
    # Linear layers dominate the tiny model: FLOPs within 2x of tokens-run-over ratios.
    tokens = [base.llm_tokens, full.llm_tokens]
    assert 0.5 < (flops[0] / flops[1]) / (tokens[0] / tokens[1]) < 2


def test_report_with_serving_scenario(tmp_path):
    report = run_report(ReportSettings(preset="qwen-tiny", keeps=[8], device="cpu", warmup=0, repeats=1, serving_batch=16,
                                       out_dir=str(tmp_path), progress=False))
    single, serving = report["scenarios"]
    assert single["name"] == "single" and serving["name"] == "serving"
    assert [(r["contender"], r["keep"]) for r in serving["rows"]] == [
        ("transformers", None), ("engine", None), ("engine", 1 / 3), ("engine", 2 / 9), ("engine", 1 / 9)]
    assert len(set(serving["visual_tokens"])) == 16
    assert report["baseline"].startswith("transformers: unmodified Qwen2_5_VLForConditionalGeneration.forward")
    stem = tmp_path / "report-qwen-tiny-cpu-fp32-b1-serving16-k8"
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert any(line.startswith("serving: engine r=0.222: prefill") for line in saved["summary"])
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    markdown = stem.with_suffix(".md").read_text()
    assert "| r=0.111 | engine |" in markdown and "| all | transformers |" in markdown
    text = R.format_report(saved)
    assert "r=0.333" in text and "transformers" in text and "% padding" in text


def test_serving_scenario_needs_a_native_resolution_preset(tmp_path):
    with pytest.raises(R.SettingError, match="serving_batch 4: preset 'tiny' has fixed-size images; the serving scenario needs a native-resolution model"):
        run_report(ReportSettings(preset="tiny", device="cpu", serving_batch=4, out_dir=str(tmp_path), progress=False))


def test_qwen_presets_shapes_and_cpu_refusal(capsys):
    cpu = presets.get_preset("qwen2.5-vl-cpu")
    skeleton = preflight.preset_skeleton(cpu)
    text = skeleton.config.text_config
    head = text.hidden_size // text.num_attention_heads
    assert head in (64, 128) and 2 * sum(text.rope_parameters["mrope_section"]) == head  # SDPA-friendly, M-RoPE covers it
    assert preflight.preset_visual_tokens(cpu, skeleton) == 144
    assert len(set(R.serving_visual_tokens(skeleton, cpu, 16))) == 16
    _, flops = preflight.estimate_report_seconds(cpu, cpu.default_keeps, dtype=torch.float32, batch=1, warmup=2, repeats=5,
                                                 flops_per_second=1e11, skeleton=skeleton)
    assert flops < preflight.CPU_FORCE_THRESHOLD_FLOPS
    big = presets.get_preset("qwen2.5-vl-7b")
    _, flops = preflight.estimate_report_seconds(big, big.default_keeps, dtype=torch.float16, batch=1, warmup=2, repeats=5,
                                                 flops_per_second=1e11)
    assert flops > preflight.CPU_FORCE_THRESHOLD_FLOPS
    assert main(["bench", "--preset", "qwen2.5-vl-7b", "--device", "cpu", "--no-plot", "--quiet"]) == 2
    assert "--preset qwen2.5-vl-7b on the CPU would take" in capsys.readouterr().err
    assert main(["bench", "--preset", "default", "--serving-batch", "4", "--device", "cpu", "--no-plot", "--quiet"]) == 2
    assert "--serving-batch 4: preset 'default' has fixed-size images" in capsys.readouterr().err
