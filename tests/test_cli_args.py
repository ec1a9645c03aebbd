"""Command-line arguments of ``bench`` and ``pruning``: every bad value is a one-line error with exit
status 2, found before any model is built (the builders are replaced by functions that fail the test).
Also: ``--keep`` replaces the preset's budgets, full-size presets on a CPU need ``--force``, help texts,
``--version``, and the progress heartbeat.
"""
import io
import json
import time

import pytest
import torch

from autoselect_fast import cli, local_checkpoint, modules, preflight, presets, report
from autoselect_fast.progress import heartbeat


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model (report preset, pruning Scorer, local checkpoint) gets built."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(presets, "build_model", refuse)
    monkeypatch.setattr(modules.Scorer, "__init__", refuse)
    monkeypatch.setattr(local_checkpoint.LocalCheckpoint, "load_model", refuse)


def run_cli(argv, capsys) -> tuple[int, str]:
    """Exit status and the last stderr line (transformers may log a warning before it)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


BAD_ARGUMENTS = [
    (["bench", "--keep", "0"], "autoselect-fast bench: error: argument --keep: must be an int >= 1, got 0"),
    (["bench", "--keep", "-3"], "argument --keep: must be an int >= 1, got -3"),
    (["bench", "--keep", "ten"], "argument --keep: must be an int >= 1, got 'ten'"),
    (["bench", "--preset", "tiny", "--keep", "8", "100000"],
     "autoselect-fast bench: error: --keep 100000: preset 'tiny' has N = 16 visual tokens; allowed: 1 <= K <= 15"),
    (["bench", "--preset", "tiny", "--keep", "16"], "--keep 16: preset 'tiny' has N = 16 visual tokens; allowed: 1 <= K <= 15 (K = 16 is the full model"),
    (["bench", "--device", "tpu"], "argument --device: 'tpu' is not a device; allowed: cpu, cuda, cuda:N"),
    (["bench", "--device", "gpu0"], "argument --device: 'gpu0' is not a device; allowed: cpu, cuda, cuda:N"),
    (["bench", "--repeats", "0"], "argument --repeats: must be an int >= 1, got 0"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an int >= 0, got -1"),
    (["bench", "--batch", "0"], "argument --batch: must be an int >= 1, got 0"),
    (["bench", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["bench", "--preset", "llava-70b"], "argument --preset: invalid choice: 'llava-70b'"),
    (["pruning", "--keep", "0"], "autoselect-fast pruning: error: argument --keep: must be an int >= 1, got 0"),
    (["pruning", "--keep", "100000"], "autoselect-fast pruning: error: --keep 100000: the image has N = --tokens 576 visual tokens; allowed: 1 <= K <= 576"),
    (["pruning", "--tokens", "32", "--keep", "33"], "--keep 33: the image has N = --tokens 32 visual tokens; allowed: 1 <= K <= 32"),
    (["pruning", "--tokens", "0"], "argument --tokens: must be an int >= 1, got 0"),
    (["pruning", "--dtype", "int8"], "argument --dtype: must be one of ['bf16', 'fp16', 'fp32'], got 'int8'"),
    (["pruning", "--repeats", "0"], "argument --repeats: must be an int >= 1, got 0"),
    # an output path that cannot be written: refused before the run, not after it (/proc takes no new directories)
    (["pruning", "--out", "/proc/nope/x.json"], "--out /proc/nope/x.json: cannot create directory /proc/nope"),
    (["bench", "--out-dir", "/proc/nope"], "--out-dir /proc/nope: cannot create directory /proc/nope"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_before_any_model(argv, message, capsys, no_model):
    code, line = run_cli(argv, capsys)
    assert code == 2
    assert message in line and line.startswith(f"autoselect-fast {argv[0]}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
@pytest.mark.parametrize("command", ["bench", "pruning"])
def test_cuda_device_on_cpu_torch(command, capsys, no_model):
    code, line = run_cli([command, "--device", "cuda"], capsys)
    assert code == 2
    if torch.version.cuda is None:
        assert f"argument --device: cuda: this torch ({torch.__version__}) is a CPU-only build; use --device cpu" in line
    else:
        assert "argument --device: cuda: torch" in line and "sees no GPU on this machine; use --device cpu" in line


def test_full_size_preset_on_cpu_needs_force(monkeypatch, capsys, no_model):
    monkeypatch.setattr(preflight, "matmul_flops_per_second", lambda dtype, **kw: 1e11)  # 100 GFLOP/s: deterministic
    code, line = run_cli(["bench", "--preset", "llava-1.5-7b", "--device", "cpu"], capsys)
    assert code == 2
    assert line.startswith("autoselect-fast bench: error: --preset llava-1.5-7b on the CPU would take about ")
    assert "1,897.0 TFLOPs (prefills and decoding)" in line and "Add --force to run it anyway" in line

    seen = {}
    monkeypatch.setattr(report, "run_report", lambda settings, plan: seen.setdefault("settings", settings))
    assert cli.main(["bench", "--preset", "llava-1.5-7b", "--device", "cpu", "--force", "--keep", "100", "50"]) == 0
    assert seen["settings"].keeps == [100, 50] and seen["settings"].preset == "llava-1.5-7b"
    assert "estimated run time on this CPU: about" in capsys.readouterr().out


def test_cpu_sized_presets_need_no_force_even_on_a_slow_cpu(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "matmul_flops_per_second", lambda dtype, **kw: 1e9)  # a very busy machine
    seen = {}
    monkeypatch.setattr(report, "run_report", lambda settings, plan: seen.setdefault("settings", settings))
    assert cli.main(["bench", "--preset", "default", "--device", "cpu"]) == 0
    assert seen["settings"].keeps == [] and "estimated run time on this CPU: about" in capsys.readouterr().out


def test_estimate_scales_with_the_work():
    preset = presets.get_preset("llava-1.5-7b")
    kwargs = dict(dtype=torch.float32, batch=1, warmup=2, repeats=5, flops_per_second=1e11)
    seconds, flops = preflight.estimate_report_seconds(preset, [192, 128, 64], **kwargs)
    # LLM of ~6.7 B parameters over 48 text tokens + visual tokens, 8 prefills each: transformers, engine
    # and peers with all 576; engine and peers at each K
    llm_only = 2 * 6.7e9 * (9 * 48 + 3 * 576 + 2 * (192 + 128 + 64)) * 8
    assert 0.9 * llm_only < flops < 1.3 * llm_only and seconds == pytest.approx(flops / 1e11)
    assert preflight.estimate_report_seconds(preset, [64], **kwargs)[1] < flops
    # the mixed and decode scenarios count too: 4 prefills of 16 requests; 3 decoders (all, all, K = 64) of
    # 16 requests, each round generate(1) and generate(32): two prefills and 31 decode steps
    more = preflight.estimate_report_seconds(preset, [64], **kwargs, mixed_batch=16, mixed_text=(10, 30),
                                             decode_batches=[16], decode_tokens=32)[1]
    base = preflight.estimate_report_seconds(preset, [64], **kwargs)[1]
    mixed = 2 * 6.7e9 * 16 * (4 * 20 + 2 * 576 + 2 * 64) * 8
    decode = 2 * 6.7e9 * 16 * (2 * (3 * 48 + 2 * 576 + 64) + 3 * 31) * 7
    assert 0.9 * (mixed + decode) < more - base < 1.4 * (mixed + decode)


def test_keep_replaces_the_preset_budgets(tmp_path, capsys):
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--keep", "2", "--warmup", "0", "--repeats", "1",
            "--no-plot", "--quiet", "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("report-tiny-cpu-*.json")
    saved = json.loads(path.read_text())
    single = next(s for s in saved["scenarios"] if s["name"] == "single")
    assert sorted({r["keep"] for r in single["rows"]}, key=lambda k: -1 if k is None else k) == [None, 2]


def test_every_option_has_help_text():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"autoselect-fast {name} {action.option_strings} has no help text"
    bench_help = subparsers["bench"].format_help()
    for flag in ("--device", "--warmup", "--repeats", "--force"):
        assert flag in bench_help


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("autoselect-fast 0.1.0 (torch ")


def test_heartbeat_reports_a_long_step():
    out = io.StringIO()
    with heartbeat("building the model", every_s=0.05, stream=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  building the model ..."
    assert any(line.startswith("  ... still building the model (") for line in lines[1:-1])
    assert lines[-1].startswith("  building the model: done in ")
