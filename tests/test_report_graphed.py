"""The report's ``transformers + CUDA graph`` contender (``autoselect_fast.report.graphed``).

On CPU the two captured steps are called eagerly on their static buffers: the vision step gives the
unmodified model's image features and the LLM step its last-token logits (fp32, rtol = atol = 1e-5),
for mixed batches (two prompt lengths; Qwen2.5-VL: two image sizes; LLaVA-NeXT: different tile
counts), both right after the buffers are built and through the per-run path (host preparation, copy
into the buffers, eager merge). Off CUDA the contender is absent with its reason, and the report's
rendering of the row and of the engine's speedup against it is checked on made-up timings.

The CUDA test (name contains ``cuda``; skipped without a GPU) checks graph replay against the eager
steps on the same buffers within fp16 tolerance, and the contender's timed run.
"""
import pytest
import torch
from test_report import llava_next_setup

from autoselect_fast import presets
from autoselect_fast import report as R
from autoselect_fast.report import ReportSettings
from autoselect_fast.report.model_inputs import model_inputs

TOL = dict(rtol=1e-5, atol=1e-5)
FP16_TOL = dict(rtol=1e-2, atol=1e-2)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _mixed_requests(setup):
    """Two requests: LLaVA prompts of 3 and 17 text tokens; Qwen2.5-VL two image sizes and prompt lengths."""
    if setup.preset.serving_batch:
        return R.serving_requests(setup.engine, setup.preset, 2)
    return R.synthetic_requests(setup.engine, setup.preset, 2, [3, 17])


def _setup(name, device="cpu", dtype=torch.float32):
    if name == "llava-next":
        return llava_next_setup()
    setup = R.BenchSetup.build(presets.get_preset(name), torch.device(device), dtype)
    return setup, _mixed_requests(setup)


def _unmodified(setup, inputs):
    """The unmodified model: image features as its forward computes them, and its last-token logits."""
    model = setup.model
    with torch.inference_mode():
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        kwargs = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
        features = model.model.get_image_features(inputs["pixel_values"], **kwargs).pooler_output
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features]), logits


@pytest.mark.parametrize("name", ["tiny", "qwen-tiny", "llava-next"])
def test_graphed_steps_called_eagerly_give_the_unmodified_models_logits(name):
    setup, requests = _setup(name)
    inputs = model_inputs(setup.engine.adapter, setup.engine.prepare(requests))
    lengths = inputs["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) == len(lengths)  # a mixed, left-padded batch
    if name == "qwen-tiny":
        assert len({tuple(g) for g in inputs["image_grid_thw"].tolist()}) == 2  # two image sizes
    want_features, want_logits = _unmodified(setup, inputs)
    graphed = R.GraphedModel(setup.model, setup.engine.adapter, inputs)
    assert not graphed.captured
    s = graphed.lm_static
    assert s["inputs_embeds"].shape[:2] == s["attention_mask"].shape == inputs["input_ids"].shape
    assert s["position_ids"].shape[-2:] == inputs["input_ids"].shape and (s["position_ids"].dim() == 3) == (name == "qwen-tiny")
    with torch.inference_mode():
        features = graphed.vision_step()
        # LLaVA NeXT's pack_image_features (unpadding, newlines) runs in the eager merge, after the vision step
        if name != "llava-next":
            torch.testing.assert_close(features.reshape(-1, features.shape[-1]), want_features, **TOL)
        torch.testing.assert_close(graphed.lm_step(), want_logits, **TOL)
        for _ in range(2):  # the per-run path: host preparation, copy into the static buffers, eager steps
            torch.testing.assert_close(graphed.logits(), want_logits, **TOL)
    assert want_logits.shape == (len(requests), setup.model.config.text_config.vocab_size)


def test_qwen_vision_metadata_is_what_the_tower_computes():
    """The precomputed metadata gives the tower's own output (it computes the same from image_grid_thw)."""
    setup, requests = _setup("qwen-tiny")
    inputs = model_inputs(setup.engine.adapter, setup.engine.prepare(requests))
    tower = setup.engine.adapter.tower
    meta = R.qwen_vision_metadata(tower, inputs["image_grid_thw"])
    assert set(meta) == {"position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"}  # SDPA: no max_seqlen
    assert meta["cu_seqlens"].device.type == "cpu" and int(meta["cu_seqlens"][-1]) == inputs["pixel_values"].shape[0]
    with torch.inference_mode():
        want = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], **meta).pooler_output
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_graphed_contender_is_absent_on_cpu_with_its_reason():
    setup, requests = _setup("tiny")
    with pytest.raises(R.ContenderUnavailable, match="CUDA graphs need a CUDA device; this run is on cpu"):
        R.graphed_contender(setup, requests)
    scenario = R.Scenario.of(setup, "single", "test", requests, [("transformers", None), ("engine", None)])
    assert scenario.configs == [("transformers", None), ("engine", None)]
    assert scenario.absent == {R.GRAPHED: "CUDA graphs need a CUDA device; this run is on cpu"}


class _Bar:
    total = 0

    def update(self, n): pass
    def set_postfix_str(self, s): pass


def _fake(name, keep, total_ms, flops):
    def run():
        return {"prepare": 0.0, "vision": 0.1 * total_ms, "prune": 0.0, "pack": 0.0, "prefill": 0.5 * total_ms, "total": total_ms}, None

    return lambda setup, requests, k: R.Contender(name, keep, run, lambda: flops, [10, 20], 40)


def _unavailable(setup, requests, keep):
    raise R.ContenderUnavailable("CUDA graph capture failed: RuntimeError: made up")


def test_engine_speedup_against_the_graphed_baseline_is_reported():
    """Made-up timings: the row is rendered where present, the engine's TTFT ratio against it in every
    table and the summary; a contender that fails to build is left out with its reason."""
    fakes = {"transformers": _fake("transformers", None, 100.0, 1000), R.GRAPHED: _fake(R.GRAPHED, None, 80.0, 1000),
             "engine": _fake("engine", 4, 20.0, 250), "peers": _unavailable}
    scenario = R.Scenario("single", "fake", [], [("transformers", None), (R.GRAPHED, None), ("engine", 4), ("peers", 4)],
                          text_tokens=[1, 2], visual_tokens=[4, 4])
    bar = _Bar()
    bar.total = 4 * 3
    out = R.run_scenario(None, scenario, ReportSettings(warmup=1, repeats=2), bar, contenders=fakes)
    assert [r["contender"] for r in out["rows"]] == ["transformers", R.GRAPHED, "engine"] and bar.total == 3 * 3
    assert out["absent"] == {"peers": "CUDA graph capture failed: RuntimeError: made up"}
    graphed, engine = out["rows"][1:]
    assert graphed["speedup"]["ttft"] == pytest.approx(1.25) and "ttft_speedup_vs_graphed" not in graphed
    assert engine["ttft_speedup_vs_graphed"] == pytest.approx(4.0) and engine["speedup"]["ttft"] == pytest.approx(5.0)

    text = R.format_scenario(out)
    lines = text.splitlines()
    header, graphed_line, engine_line = lines[1], lines[3], lines[4]
    assert header.split()[-1] == "tf+graph" and engine_line.split()[-1] == "4.00" and graphed_line.split()[-1] == "-"
    assert "peers: not run (CUDA graph capture failed: RuntimeError: made up)" in text
    report = {"preset": "fake", "environment": {"device": "cuda", "torch": "t", "transformers": "t"}, "dtype": "fp16", "repeats": 2, "warmup": 1,
              "baseline": "transformers: fake", "graphed_baseline": R.GRAPHED_DESCRIPTION, "scenarios": [out], "decode": []}
    report["summary"] = R.report_summary(report)
    assert "single: transformers + CUDA graph takes 0.80x the TTFT of transformers (LLM prefill 0.80x)" in report["summary"]
    assert any(line.startswith("single: engine K=4: prefill 5.00x, TTFT 5.00x faster than transformers;")
               and "against transformers + CUDA graph: TTFT 4.00x" in line for line in report["summary"])
    report["warnings"] = []
    markdown = R.format_markdown(report)
    assert "| TTFT × transformers + CUDA graph |" in markdown and "| 1.00× | – |" in markdown and "| 4.00× |" in markdown
    assert "Stronger baseline: transformers + CUDA graph: the same unmodified model" in markdown
    assert "peers: not run (CUDA graph capture failed: RuntimeError: made up)." in markdown


@requires_cuda
@pytest.mark.parametrize("name", ["tiny", "qwen-tiny"])
def test_graphed_replay_equals_eager_steps_cuda(name):
    """Replay of both graphs equals the eager steps on the same static buffers (fp16), twice; the contender
    captures, times every stage and gives the unmodified model's logits."""
    setup, requests = _setup(name, "cuda", torch.float16)
    inputs = model_inputs(setup.engine.adapter, setup.engine.prepare(requests))
    graphed = R.GraphedModel(setup.model, setup.engine.adapter, inputs)
    graphed.capture()
    with torch.inference_mode():
        for _ in range(2):
            replayed_features = graphed.encode().clone()
            torch.testing.assert_close(replayed_features, graphed.vision_step(), **FP16_TOL)
            replayed = graphed.prefill(graphed.lm_inputs(replayed_features))
            torch.testing.assert_close(replayed, graphed.lm_step(), **FP16_TOL)
        want = setup.model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
    torch.testing.assert_close(replayed, want, **FP16_TOL)
    contender = R.graphed_contender(setup, requests)
    ms, logits = contender.run()
    assert set(R.STAGES) <= set(ms) and ms["total"] > 0 and ms["vision"] > 0 and ms["prefill"] > 0
    torch.testing.assert_close(logits, want, **FP16_TOL)
    assert contender.flops() > 0 and contender.llm_tokens == inputs["input_ids"].numel()
