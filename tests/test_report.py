"""The benchmark report: runs end to end on the tiny preset and writes a complete JSON and a plot.

Timings are never asserted (benchmarks are not tests); what is checked is the report's content and
arithmetic: FLOPs shrink with K, speedups are ratios against the full model of the same run.
"""
import json

import pytest
import torch

from autoselect_fast import presets
from autoselect_fast.cli import main
from autoselect_fast.report import ReportSettings, format_table, run_report


def test_report_on_tiny_preset(tmp_path, capsys):
    report = run_report(ReportSettings(preset="tiny", keeps=[8, 4, 2], device="cpu", warmup=1, repeats=2, out_dir=str(tmp_path), progress=False))
    results = report["results"]
    assert [r["keep"] for r in results] == [None, 8, 4, 2]
    full = results[0]
    assert full["kept_tokens"] == full["visual_tokens"] == [16]
    assert full["speedup"] == {"prefill": 1.0, "ttft": 1.0, "flops_ratio": 1.0}
    flops = [r["prefill_flops"] for r in results]
    assert flops == sorted(flops, reverse=True) and flops[-1] > 0
    for r in results[1:]:
        assert r["kept_tokens"] == [r["keep"]]
        assert r["sequence_lengths"] == [12 + r["keep"]]  # 12 text tokens + K kept tokens
        assert r["speedup"]["flops_ratio"] == pytest.approx(full["prefill_flops"] / r["prefill_flops"])
        stages = r["stages"]
        assert stages["total"]["median_ms"] > 0 and r["pruning_module_alone"]["repeats"] >= 10
        assert 0 < r["pruning_share_of_ttft"] < 1
    saved = json.loads((tmp_path / "report-tiny-cpu.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert saved["shapes"]["visual_tokens_per_image"] == 16 and saved["dtype"] == "fp32"
    assert (tmp_path / "report-tiny-cpu.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(saved)
    assert "K=2" in table and "full" in table and "% of TTFT" in table


def test_preset_that_does_not_fit_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(presets, "available_memory_bytes", lambda device: 1024)
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--no-plot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "preset 'tiny' needs about" in err and "GiB is free" in err


def test_unknown_preset_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_preset("llava-70b")
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_report(ReportSettings(preset="tiny", dtype="fp8", device="cpu", progress=False))
