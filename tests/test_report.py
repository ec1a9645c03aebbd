"""The benchmark report: contenders compute the same logits, the report's arithmetic and flags, files.

Timings are never asserted (benchmarks are not tests); what is checked is that every contender
(unmodified transformers model, the peers' padded ``inputs_embeds`` batch, the engine) produces the
same first-token logits for the same kept tokens, the report's content and arithmetic (FLOPs shrink
with K, ratios against the baseline of the same scenario, padding counts), and the noisy/suspect flags.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import autoselect_fast
from autoselect_fast import presets
from autoselect_fast import report as R
from autoselect_fast.cli import main
from autoselect_fast.engine import ImageInput, Request
from autoselect_fast.modules import Scorer, ScorerConfig
from autoselect_fast.report import ReportSettings, format_report, run_report
from autoselect_fast.report.profile import NOT_MEASURED, busy_time
from autoselect_fast.timing import is_noisy, summarize

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_setup():
    return R.BenchSetup.build(presets.get_preset("tiny"), torch.device("cpu"), torch.float32)


def _logits(contender):
    with torch.inference_mode():
        ms, logits = contender.run()
    assert set(R.STAGES) <= set(ms) and ms["total"] > 0
    return logits


@pytest.mark.parametrize("lengths", [None, [3, 17, 9]])
def test_contenders_agree_on_llava(tiny_setup, lengths):
    """Every token kept: transformers (its own padded batch), peers and engine give the same logits;
    at K < N peers and engine (same Scorer, same kept tokens) agree."""
    requests = R.synthetic_requests(tiny_setup.engine, tiny_setup.preset, 1 if lengths is None else len(lengths), lengths)
    base = _logits(R.transformers_contender(tiny_setup, requests))
    assert base.shape == (len(requests), tiny_setup.model.config.text_config.vocab_size)
    for name in ("engine", "peers"):
        torch.testing.assert_close(_logits(R.CONTENDERS[name](tiny_setup, requests, None)), base, **TOL)
    torch.testing.assert_close(_logits(R.peers_contender(tiny_setup, requests, 5)), _logits(R.engine_contender(tiny_setup, requests, 5)), **TOL)


def llava_next_setup():
    """A tiny LLaVA-NeXT setup (fp32, CPU) and three requests whose images have different tile counts."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=127,
                             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    model = LlavaNextForConditionalGeneration(config).eval()
    scorer = Scorer(ScorerConfig(input_dim=32, hidden_dim=32, num_layers=1, num_heads=4)).eval()
    preset = presets.Preset("next-test", "test", lambda: config, lambda d: scorer.config, (40, 30), 3, 5, "fp32")
    setup = R.BenchSetup(preset, model, scorer, torch.device("cpu"), torch.float32)
    processor = setup.engine.adapter.default_image_processor()
    requests = []
    for i, size in enumerate([(40, 30), (30, 60), (50, 50)]):
        image = Image.fromarray(np.random.RandomState(i).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        pv, image_size = setup.engine.adapter.process_image(image, processor)
        requests.append(Request([1, 5, 127] + list(range(10, 10 + 4 * i + 2)), pixel_values=pv, image_sizes=image_size))
    assert len({r.pixel_values.shape[0] for r in requests}) > 1  # the baseline pads tiles
    return setup, requests


def test_contenders_agree_on_llava_next_with_different_tile_counts():
    setup, requests = llava_next_setup()
    base = _logits(R.transformers_contender(setup, requests))
    for name in ("engine", "peers"):
        torch.testing.assert_close(_logits(R.CONTENDERS[name](setup, requests, None)), base, **TOL)
    torch.testing.assert_close(_logits(R.peers_contender(setup, requests, 6)), _logits(R.engine_contender(setup, requests, 6)), **TOL)


def test_flops_count_attention_and_padding(tiny_setup):
    """Prefill FLOPs include attention (the CPU flash kernel is counted) and the padded rows a padded batch runs."""
    requests = R.synthetic_requests(tiny_setup.engine, tiny_setup.preset, 2, [3, 30])
    engine, peers = R.engine_contender(tiny_setup, requests, 4), R.peers_contender(tiny_setup, requests, 4)
    assert engine.llm_tokens == sum(engine.sequence_lengths) and peers.llm_tokens == 2 * max(peers.sequence_lengths)
    assert peers.flops() > engine.flops() > 0
    text = tiny_setup.model.config.text_config
    d = text.hidden_size
    q = torch.randn(1, text.num_attention_heads, 7, d // text.num_attention_heads)
    kv = torch.randn(1, text.num_key_value_heads, 7, d // text.num_attention_heads)
    flops = R.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True))
    assert flops == 2 * 2 * text.num_attention_heads * 7 * 7 * (d // text.num_attention_heads)


def _fake_contender(name, keep, totals, prefill_share, flops):
    samples = iter(totals)

    def run():
        total = next(samples)
        return {"prepare": 0.0, "vision": 0.1 * total, "prune": 0.0, "pack": 0.0, "prefill": prefill_share * total, "total": total}, None

    return R.Contender(name, keep, run, lambda: flops, [10], 10)


def test_speedups_suspect_and_noisy_flags():
    """Ratios against the first configuration; a speedup above the FLOP ratio is suspect; max/min > threshold is noisy."""
    fakes = {
        "base": lambda s, r, k: _fake_contender("base", None, [100.0, 100.0, 100.0], 0.8, 1000),
        "honest": lambda s, r, k: _fake_contender("honest", k, [50.0, 50.0, 50.0], 0.5, 400),  # ttft 2x, flops 2.5x
        "suspect": lambda s, r, k: _fake_contender("suspect", k, [10.0, 20.0, 10.0], 0.5, 500),  # ttft 10x vs flops 2x
    }
    scenario = R.Scenario("single", "fake", [Request([1])], [("base", None), ("honest", 4), ("suspect", 4)], text_tokens=[1], visual_tokens=[0])

    class Bar:
        def update(self, n): pass
        def set_postfix_str(self, s): pass

    out = R.run_scenario(None, scenario, ReportSettings(warmup=1, repeats=2), Bar(), contenders=fakes)
    base, honest, suspect = out["rows"]
    assert base["speedup"] == {"ttft": 1.0, "prefill": 1.0, "flops_ratio": 1.0} and base["suspect"] == [] and base["noisy"] == []
    assert honest["speedup"]["ttft"] == pytest.approx(2.0) and honest["speedup"]["prefill"] == pytest.approx(3.2)
    assert honest["speedup"]["flops_ratio"] == pytest.approx(2.5) and honest["suspect"] == ["prefill"]
    assert suspect["stages"]["total"] == {"median_ms": 15.0, "min_ms": 10.0, "max_ms": 20.0}  # warm-up sample (10) dropped
    assert suspect["suspect"] == ["ttft", "prefill"] and suspect["noisy"] == ["prefill", "total"]
    lines = R.report_warnings({"scenarios": [out], "noise_threshold_max_over_min": 1.3})
    assert lines[0].startswith("NOISY single: max/min above 1.3 for suspect K=4 (prefill 2.00, TTFT 2.00)") and "re-run" in lines[0]
    assert lines[1].startswith("SUSPECT single: honest K=4: speedup (prefill 3.20x) above the FLOP ratio 2.50x")
    assert lines[2].startswith("SUSPECT single: suspect K=4: speedup (ttft 6.67x, prefill 10.67x)") and len(lines) == 3


def test_rounds_turn_the_order_and_eager_stages_are_reported():
    """Each round starts with the next contender; a graphed runner's eager stages over the timed rounds
    (counts reset after the warm-up) go into the row and an EAGER warning."""
    order = []

    class FakeRunner:
        mode = "graphs"

        def __init__(self):
            self.eager = 0

        def reset_stats(self):
            self.eager = 0

        def stats_dict(self):
            return {"prefill": {"graph_replays": 0, "captures": 0, "padded": 0, "eager": {"above_largest_bucket": self.eager}},
                    "vision": {"graph_replays": 2, "captures": 0, "padded": 0, "eager": {}}}

    def contender(name, runner=None):
        def run():
            order.append(name)
            if runner is not None:
                runner.eager += 1
            return {stage: 1.0 for stage in R.STAGES}, None
        return R.Contender(name, None, run, lambda: 10, [10], 10, runner=runner)

    runner = FakeRunner()
    fakes = {"a": lambda s, r, k: contender("a"), "b": lambda s, r, k: contender("b"), "engine": lambda s, r, k: contender("engine", runner)}
    scenario = R.Scenario("single", "fake", [Request([1])], [("a", None), ("b", None), ("engine", None)], text_tokens=[1], visual_tokens=[0])

    class Bar:
        def update(self, n): pass
        def set_postfix_str(self, s): pass

    out = R.run_scenario(None, scenario, ReportSettings(warmup=1, repeats=2, device="cpu"), Bar(), contenders=fakes)
    assert order[:9] == ["a", "b", "engine", "b", "engine", "a", "engine", "a", "b"]
    row = out["rows"][2]
    assert row["runner"]["mode"] == "graphs" and row["eager_stages"] == {"prefill": {"above_largest_bucket": 2}}  # timed rounds only
    assert "runner" not in out["rows"][0]
    lines = R.report_warnings({"scenarios": [out], "noise_threshold_max_over_min": 1.3})
    assert lines == ["EAGER single: engine all ran stages without its CUDA graphs (prefill: above_largest_bucket x2): "
                     "its time is the eager path's for those stages."]


def test_noise_helpers():
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0} and is_noisy(s) and not is_noisy(summarize([1.0, 1.2]))


def test_mixed_lengths_and_file_names():
    assert R.mixed_text_lengths(8, 10, 200) == [10, 37, 64, 91, 119, 146, 173, 200]
    assert R.report_stem("default", torch.device("cpu"), "bf16", 1, 8) == "report-default-cpu-bf16-b1-mixed8"
    assert R.report_stem("default", torch.device("cpu"), "fp32", 2, 0) == "report-default-cpu-fp32-b2"
    assert R.report_stem("default", torch.device("cpu"), "fp32", 2, 0, keeps=[64, 32]) == "report-default-cpu-fp32-b2-k64-32"


def test_report_on_tiny_preset(tmp_path):
    report = run_report(ReportSettings(preset="tiny", keeps=[8, 2], device="cpu", warmup=0, repeats=1, mixed_batch=2,
                                       mixed_text=(4, 20), decode_batches=[1], decode_tokens=3, out_dir=str(tmp_path), progress=False))
    single, mixed = report["scenarios"]
    assert [(r["contender"], r["keep"]) for r in single["rows"]] == [
        ("transformers", None), ("engine", None), ("peers", None), ("engine", 8), ("peers", 8), ("engine", 2), ("peers", 2)]
    assert [(r["contender"], r["keep"]) for r in mixed["rows"]] == [("transformers", None), ("engine", None), ("engine", 2), ("peers", 2)]
    base = single["rows"][0]
    assert base["speedup"] == {"ttft": 1.0, "prefill": 1.0, "flops_ratio": 1.0} and base["sequence_lengths"] == [28]
    engine_rows = [r for r in single["rows"] if r["contender"] == "engine"]
    flops = [r["prefill_flops"] for r in engine_rows]
    assert flops == sorted(flops, reverse=True) and flops[-1] > 0
    for r in single["rows"]:
        assert r["speedup"]["flops_ratio"] == pytest.approx(base["prefill_flops"] / r["prefill_flops"])
        assert r["sequence_lengths"] == [12 + (16 if r["keep"] is None else r["keep"])]  # 12 text tokens + kept tokens
        assert "ttft_speedup_vs_peers" in r or r["contender"] != "engine"
    assert mixed["text_tokens"] == [4, 20]
    padded = {r["contender"]: r["llm_tokens"] for r in mixed["rows"] if r["keep"] is None}
    assert padded == {"transformers": 2 * (20 + 16), "engine": (4 + 16) + (20 + 16)}
    assert [p["keep"] for p in report["pruning_module_alone"]] == [8, 2]
    saved = json.loads((tmp_path / "report-tiny-cpu-fp32-b1-mixed2-decode1-k8-2.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and saved["dtype"] == "fp32"
    assert saved["environment"]["autoselect_fast"].startswith(autoselect_fast.__version__)
    assert saved["settings"]["keeps"] == [8, 2] and saved["settings"]["mixed_text"] == [4, 20] and saved["settings"]["decode_tokens"] == 3
    for r in single["rows"]:  # the engine's runner path over the timed rounds; peers and transformers have none
        assert ("runner" in r) == (r["contender"] == "engine")
        if r["contender"] == "engine":
            assert r["runner"]["mode"] in ("eager", "padded") and r["eager_stages"] == {}  # no graphs on a CPU: nothing to warn of
    assert saved["baseline"].startswith("transformers: unmodified LlavaForConditionalGeneration.forward (attn_implementation=sdpa")
    assert (tmp_path / "report-tiny-cpu-fp32-b1-mixed2-decode1-k8-2.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report-tiny-cpu-fp32-b1-mixed2-decode1-k8-2.md").read_text()
    assert markdown.count("| config | contender | LLM seq |") == 2 and "| K=2 | engine |" in markdown
    assert any(line.startswith("single: engine K=2: prefill") for line in saved["summary"])
    assert [(r["contender"], r["keep"]) for r in saved["decode"][0]["rows"]] == [("transformers", None), ("engine", None), ("engine", 2)]
    assert any(line.startswith("decode batch 1: engine K=2: decode ") for line in saved["summary"]) and "**decode, batch 1**" in markdown
    text = format_report(saved)
    assert "legend:" in text and "pack" in text and "glue" not in text and "FLOP x" in text and "% padding" in text and "K=2" in text
    assert "GPU busy % and kernels per prefill: not measured" in text and "| prepare ms |" in markdown and "| pack ms |" in markdown
    # the stronger baseline exists on CUDA only: absent here, one line per scenario saying why, nowhere a row
    absent = "transformers + CUDA graph: not run (CUDA graphs need a CUDA device; this run is on cpu)"
    assert [s["absent"] for s in saved["scenarios"]] == [{R.GRAPHED: "CUDA graphs need a CUDA device; this run is on cpu"}] * 2
    assert text.count(absent) == 2 and markdown.count(absent + ".") == 2 and "| transformers + CUDA graph |" not in markdown
    headers = [line for line in text.splitlines() if line.lstrip().startswith("config ")]  # 2 scenarios, decode
    assert len(headers) == 3 and not any("tf+graph" in line for line in headers) and "stronger baseline" not in text
    for r in single["rows"]:  # TTFT counts every stage: the engine's host preparation included
        stages = r["stages"]
        assert set(stages) == set(R.STAGES) and r["gpu"] == {"measured": False, "reason": NOT_MEASURED}
        if r["contender"] == "transformers":
            assert stages["prepare"]["median_ms"] == 0.0
        else:
            assert stages["prepare"]["median_ms"] > 0
        parts = sum(stages[stage]["median_ms"] for stage in R.STAGES[:-1])
        assert parts == pytest.approx(stages["total"]["median_ms"], rel=1e-6)  # one repeat: medians are the samples


def test_keep_not_below_n_is_an_error(tmp_path):
    with pytest.raises(R.SettingError, match=r"keeps 16: preset 'tiny' has N = 16 visual tokens; allowed: 1 <= K <= 15 \(K = 16 is the full model"):
        run_report(ReportSettings(preset="tiny", keeps=[16], device="cpu", out_dir=str(tmp_path), progress=False))


def test_preset_that_does_not_fit_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(presets, "available_memory_bytes", lambda device: 1024)
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--no-plot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "preset 'tiny' needs about" in err and "GiB is free" in err


def test_unknown_preset_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_preset("llava-70b")
    with pytest.raises(R.SettingError, match="dtype 'fp8': allowed: bf16, fp16, fp32"):
        run_report(ReportSettings(preset="tiny", dtype="fp8", device="cpu", progress=False))


def test_llava_next_cpu_preset_shape():
    """N = 2,880 visual tokens for the 672x672 benchmark image (checked on the meta device, no weights)."""
    from transformers import LlavaNextForConditionalGeneration

    preset = presets.get_preset("llava-next-cpu")
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(preset.build_config())
    from autoselect_fast.models import get_adapter

    assert get_adapter(model).layout(preset.image_size).num_tokens == 2880


def test_flop_counter_counts_grouped_query_and_varlen_attention_per_query_head():
    """torch 2.11's own CUDA SDPA formulas reject grouped-query shapes (the Qwen2.5-VL-7B report crashed
    on an H200), and torch counts neither its CPU flash kernel nor the varlen custom op: the report maps
    all of them to one per-query-head formula."""
    from autoselect_fast.report.flops import flop_counter, sdpa_flops, varlen_flops

    registry = flop_counter().flop_registry
    aten = torch.ops.aten
    for op in (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
               aten._scaled_dot_product_flash_attention):
        assert op in registry, op
    # Q: 28 heads, K/V: 4 heads (GQA); per query head 2 * Lq * Lk * (d + dv).
    assert sdpa_flops((1, 28, 10, 64), (1, 4, 12, 64), (1, 4, 12, 64)) == 2 * 28 * 10 * 12 * 128
    q, k = torch.zeros(7 + 3, 28, 64), torch.zeros(7 + 3, 4, 64)
    cu = torch.tensor([0, 7, 10])
    assert varlen_flops(q, k, k, cu, cu, 7, 7) == 2 * 28 * (7 * 7 + 3 * 3) * 128


def test_two_image_llava_request_through_the_baseline(tiny_setup):
    """A request with two images (and one with one, after it): the unmodified model's inputs expand
    every placeholder, so its logits equal the engine's with every token kept."""
    one = R.synthetic_requests(tiny_setup.engine, tiny_setup.preset, 2, [6, 9])
    image = tiny_setup.engine.adapter.image_token_id
    two_images = Request(one[0].prompt + [7, 8, image, 9], images=[ImageInput(one[0].pixel_values), ImageInput(one[1].pixel_values)])
    requests = [two_images, one[1]]
    base = R.transformers_contender(tiny_setup, requests)
    engine = R.engine_contender(tiny_setup, requests, None)
    n = tiny_setup.engine.adapter.layout(None).num_tokens
    assert base.sequence_lengths == engine.sequence_lengths == [6 + 3 + 2 * n, 9 + n]
    torch.testing.assert_close(_logits(base), _logits(engine), **TOL)


def test_pruning_module_alone_is_the_engines_prune_stage(tiny_setup):
    """The one home of the pruning benchmark selects what the engine's prune stage selects."""
    requests = R.synthetic_requests(tiny_setup.engine, tiny_setup.preset, 2, [5, 9])
    engine = tiny_setup.engine_for(4)
    batch = engine.prepare(requests)
    features = engine.encode_images(batch.pixel_values, batch.image_sizes)
    calls = R.pruning_calls(tiny_setup.scorer, features, [4, 4], positions=batch.token_positions)
    got = calls["pruning_module"]()
    want = engine.prune(features, [4, 4], positions=batch.token_positions)
    assert torch.equal(got.indices, want.selection.indices) and torch.equal(got.position_ids, want.selection.position_ids)
    torch.testing.assert_close(calls["scorer_only"](), want.scores)
    timed = R.time_pruning_module(calls, device="cpu", warmup=0, repeats=2)
    assert set(timed) == {"pruning_module", "scorer_only"} and timed["pruning_module"]["repeats"] == 2


def test_decode_scenario_counts_tokens_per_second(tiny_setup):
    """Greedy, the same number of new tokens: the engine with every token kept generates the tokens
    transformers' generate does, and every rate is a positive number."""
    class Bar:
        def update(self, n): pass
        def set_postfix_str(self, s): pass

    out = R.run_decode(tiny_setup, 2, [4], ReportSettings(warmup=0, repeats=1, decode_tokens=3), Bar())
    assert [(r["contender"], r["keep"]) for r in out["rows"]] == [("transformers", None), ("engine", None), ("engine", 4)]
    assert out["rows"][1]["same_tokens_as_baseline"] is True and out["new_tokens"] == 3
    for r in out["rows"]:
        one, every = r["one_token_ms"]["median_ms"], r["all_tokens_ms"]["median_ms"]
        assert r["generate_tokens_per_s"] == pytest.approx(2 * 3 * 1e3 / every)
        if every > one:  # decoding 2 more tokens per request took measurable time
            assert r["decode_tokens_per_s"] == pytest.approx(2 * 2 * 1e3 / (every - one))
        else:  # a busy machine can hide it: then no number is made up
            assert r["decode_tokens_per_s"] is None
    text = R.format_decode(out)
    assert "decode batch 2" in text and "greedy tokens = the baseline's" in text and "generate 3 tokens" in text


def test_gpu_profile_is_not_faked_on_cpu():
    assert R.kernel_profile(lambda: None, torch.device("cpu"), 1.0) == {"measured": False, "reason": NOT_MEASURED}
    assert busy_time([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0  # overlapping kernels count once


@pytest.mark.parametrize("change, message", [
    (dict(preset="llava-70b"), "preset 'llava-70b': allowed: "),
    (dict(batch=0), "batch 0: allowed: an int >= 1"),
    (dict(warmup=True), "warmup True: allowed: an int >= 0"),
    (dict(mixed_text=(1, 20)), r"mixed_text \(1, 20\): allowed: \(low, high\)"),
    (dict(serving_ratios=(0.5, 1.0)), "serving_ratios 1.0: allowed: keep ratios r with 0 < r < 1"),
    (dict(decode_batches=[0]), "decode_batches 0: allowed: batch sizes >= 1"),
    (dict(decode_tokens=1), "decode_tokens 1: allowed: an int >= 2"),
    (dict(keeps=[4, 0]), "keeps 0: allowed: ints K >= 1"),
])
def test_settings_are_checked_before_any_model(change, message, monkeypatch):
    monkeypatch.setattr(presets, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(R.SettingError, match=message):
        ReportSettings(**{"preset": "tiny", "device": "cpu", **change}).validate()


def test_settings_plan():
    plan = ReportSettings(preset="tiny", keeps=[2, 8, 2], device="cpu", mixed_batch=0).validate()
    assert plan.keeps == [8, 2] and plan.visual_tokens == 16 and plan.mixed_batch == 0 and plan.dtype == torch.float32
