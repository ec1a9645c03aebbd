"""Command line: ``autoselect-fast`` (also ``python -m autoselect_fast``).

``autoselect-fast bench`` is the benchmark report (``autoselect_fast.report``): TTFT breakdown,
pruning overhead and FLOPs of the full model against pruned budgets, on a preset model with random
weights (``default``: LLaVA-1.5-shaped, scaled down to run in about a minute on a 2-core CPU).

``autoselect-fast pruning`` times the pruning module alone (Scorer + hard top-K selection) on a
LLaVA-1.5-sized input (N = 576 visual tokens of width 1024, default Scorer of 2 blocks), prints the
median with min-max, and writes a JSON with the environment next to the numbers.

``autoselect-fast generate`` (``autoselect_fast.generate``) and ``autoselect-fast show``
(``autoselect_fast.show``) run a local checkpoint with a trained Scorer on one image.

This module owns the arguments: their types reject bad values while parsing, and the cross-argument
checks (``autoselect_fast.preflight``) run before any model is built. Every error is one line,
``autoselect-fast <command>: error: ...``, with exit status 2.

``autoselect-fast train`` trains a Scorer + Denoiser on a frozen VLM (``autoselect_fast.training.cli``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import preflight
from .selectors import SELECTORS
from .validation import DTYPES


def _dtype_arg(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def run_pruning_benchmark(args: argparse.Namespace) -> dict:
    from .ops import resolve_backend
    from .report import pruning_calls, published_pruning_inputs, time_pruning_module
    from .timing import environment

    if args.keep > args.tokens:
        raise preflight.UsageError(f"--keep {args.keep}: the image has N = --tokens {args.tokens} visual tokens; allowed: 1 <= K <= {args.tokens}")
    preflight.output_directory("--out", args.out, os.path.dirname(os.path.abspath(args.out)))
    device = torch.device(args.device)
    scorer, features = published_pruning_inputs(args.batch, args.tokens, args.dim, device=device, dtype=args.dtype)
    backend = resolve_backend("auto", device)  # the engine's choice: Triton kernels on CUDA, reference on CPU
    calls = pruning_calls(scorer, features, [args.keep] * args.batch, backend=backend)
    config = scorer.config
    print(f"pruning module: batch {args.batch} x N={args.tokens} tokens of width {args.dim}, keep K={args.keep}, {args.dtype}, {device}")
    print(f"  Scorer of the published size: {config.num_layers} blocks, width {config.hidden_dim}, {config.num_heads} heads "
          f"(the `bench` presets use smaller Scorers scaled with their models, so their pruning times are smaller)")
    timed = time_pruning_module(calls, device=device, warmup=args.warmup, repeats=args.repeats)
    total, scoring = timed["pruning_module"], timed["scorer_only"]
    print(f"  Scorer + selection : {_timing_line(total)}   (selection backend: {backend})")
    print(f"  Scorer alone       : {_timing_line(scoring)}")
    timeline = timed.get("gpu_timeline", {})
    if timeline:  # the GPU's own time per call, as inside a served model's CUDA graph
        print(f"  GPU timeline       : Scorer + selection {timeline['pruning_module']['ms']:.3f} ms, "
              f"Scorer alone {timeline['scorer_only']['ms']:.3f} ms ({timeline['pruning_module']['method']})")
    selectors = {}
    if args.selectors:  # every selector's module side by side, interleaved (autoselect_fast.selector_costs)
        from .selector_costs import selector_cost_table

        selectors = selector_cost_table(args.selectors, tokens=args.tokens, dim=args.dim, keep=args.keep, batch=args.batch, dtype=args.dtype,
                                        device=device, warmup=args.warmup, repeats=args.repeats)
        print("  selectors, interleaved (ms per image; scores + selection, see autoselect_fast/selector_costs.py for what each includes):")
        for name, t in selectors.items():
            print(f"    {name:10s} {t['median_ms_per_image']:9.3f} ms (min {t['min_ms_per_image']:.3f}, max {t['max_ms_per_image']:.3f})")
    result = {
        "benchmark": "pruning_module",
        "environment": environment(device),
        "shape": {"batch": args.batch, "tokens": args.tokens, "dim": args.dim, "keep": args.keep},
        "dtype": str(args.dtype),
        "pruning_module": total,
        "scorer_only": scoring,
        "selection_backend": backend,
        **({"gpu_timeline": timeline} if timeline else {}),
        **({"selectors": selectors} if selectors else {}),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"  results written to {args.out}")
    return result


def _timing_line(t: dict) -> str:
    return f"{t['median_ms']:.3f} ms (min {t['min_ms']:.3f}, max {t['max_ms']:.3f}, n={t['repeats']})"


# The command-line flag of each report setting, for errors found by ReportSettings.validate.
_REPORT_FLAGS = {"preset": "--preset", "keeps": "--keep", "device": "--device", "dtype": "--dtype", "batch": "--batch",
                 "mixed_batch": "--mixed-batch", "mixed_text": "--mixed-text", "serving_batch": "--serving-batch",
                 "decode_batches": "--decode-batch", "decode_tokens": "--decode-tokens", "warmup": "--warmup", "repeats": "--repeats"}


def run_report_command(args: argparse.Namespace) -> dict:
    from .report import ReportSettings, SettingError, run_report

    settings = ReportSettings(
        preset=args.preset, keeps=args.keep, device=str(args.device), dtype=args.dtype, batch=args.batch,
        mixed_batch=args.mixed_batch, mixed_text=tuple(args.mixed_text), serving_batch=args.serving_batch,
        decode_batches=args.decode_batch, decode_tokens=args.decode_tokens,
        warmup=args.warmup, repeats=args.repeats, out_dir=args.out_dir, plot=not args.no_plot, progress=not args.quiet,
    )
    try:
        plan = settings.validate()
    except SettingError as exc:  # the same message, with the flag's name
        value = " ".join(map(str, exc.value)) if isinstance(exc.value, (list, tuple)) else exc.value
        raise preflight.UsageError(f"{_REPORT_FLAGS.get(exc.setting, exc.setting)} {value}: {exc.allowed}") from None
    preflight.output_directory("--out-dir", args.out_dir, args.out_dir)
    say = print if not args.quiet else (lambda *a, **k: None)
    if plan.device.type == "cpu":
        seconds, flops = preflight.estimate_report_seconds(
            plan.preset, plan.keeps, dtype=plan.dtype, batch=args.batch, warmup=args.warmup, repeats=args.repeats,
            skeleton=plan.skeleton, serving_batch=plan.serving_batch, mixed_batch=plan.mixed_batch, mixed_text=settings.mixed_text,
            decode_batches=plan.decode_batches, decode_tokens=settings.decode_tokens,
        )
        estimate = f"about {preflight.format_duration(seconds)} ({flops / 1e12:,.1f} TFLOPs (prefills and decoding) at this CPU's measured {plan.dtype_name} matmul speed)"
        if flops > preflight.CPU_FORCE_THRESHOLD_FLOPS and not args.force:
            raise preflight.UsageError(
                f"--preset {plan.preset.name} on the CPU would take {estimate}; above {preflight.CPU_FORCE_THRESHOLD_FLOPS / 1e12:.0f} TFLOPs "
                f"this is meant for a GPU. Add --force to run it anyway, or use --preset default"
            )
        say(f"estimated run time on this CPU: {estimate}")
    return run_report(settings, plan)


def run_generate_command(args: argparse.Namespace) -> dict:
    from .generate import GenerateSettings, run_generate

    return run_generate(GenerateSettings(
        model=args.model, scorer=args.scorer, image=args.image, prompt=args.prompt, keep=args.keep, keep_ratio=args.keep_ratio,
        full=args.full, max_new_tokens=args.max_new_tokens, device=args.device, dtype=_local_dtype(args), progress=not args.quiet,
    ))


def run_show_command(args: argparse.Namespace) -> dict:
    from .show import ShowSettings, run_show

    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise preflight.UsageError(f"--out {args.out}: directory {out_dir} does not exist")
    return run_show(ShowSettings(
        model=args.model, scorer=args.scorer, image=args.image, keep=args.keep, out=args.out,
        device=args.device, dtype=_local_dtype(args), progress=not args.quiet,
    ))


def _local_dtype(args: argparse.Namespace) -> str:
    return args.dtype or ("fp16" if args.device.type == "cuda" else "fp32")


# --------------------------------------------------------------------------------------------------
# Argument types: each rejects a bad value with a message naming what is allowed
# --------------------------------------------------------------------------------------------------
def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be an int >= {lowest}, got {value}")
        return value

    parse.__name__ = f"int>={lowest}"
    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {value}")
    return value


def _device(text: str) -> torch.device:
    try:
        return preflight.parse_device(text)
    except preflight.UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``autoselect-fast bench: error: argument --keep: ...`` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_DEVICE_HELP = "where to run: cpu, cuda or cuda:N (default: cuda when this torch sees a GPU, else cpu)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:  # pragma: no cover
        transformers_version = "not installed"
    return f"autoselect-fast {__version__} (torch {torch.__version__}, transformers {transformers_version})"


def _add_local_model_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", required=True, metavar="DIR", help="a transformers VLM saved with save_pretrained, with its processor (LLaVA-1.5, LLaVA-NeXT)")
    sub.add_argument("--scorer", required=True, metavar="DIR", help="a Scorer saved with Scorer.save_pretrained, for this model's vision features")
    sub.add_argument("--image", required=True, metavar="FILE", help="the image (any format Pillow reads)")
    sub.add_argument("--device", type=_device, default=default_device(), help=_DEVICE_HELP)
    sub.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="weights and activations (default: fp16 on cuda, fp32 on cpu)")
    sub.add_argument("--quiet", action="store_true", help="no progress messages")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS

    parser = _Parser(prog="autoselect-fast", description="AutoSelect visual-token pruning: benchmarks and tools")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench = sub.add_parser("bench", help="TTFT report: the engine at pruned budgets against the unmodified transformers model and the peers' padded way")
    bench.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model preset (default: CPU-sized LLaVA-1.5 shape)")
    bench.add_argument("--keep", type=_int_at_least(1), nargs="*", default=[], metavar="K",
                       help="budgets K to time, replacing the preset's (192 128 64 for LLaVA-1.5); each 1 <= K < N")
    bench.add_argument("--device", type=_device, default=default_device(), help=_DEVICE_HELP)
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: the preset's (fp32 on the CPU preset, fp16 otherwise)")
    bench.add_argument("--batch", type=_int_at_least(1), default=1, help="requests per prefill in the single-prompt-shape scenario")
    bench.add_argument("--mixed-batch", type=_int_at_least(0), default=None, metavar="B",
                       help="requests in the mixed-prompt batch scenario, timed at the smallest K (default: the preset's, 8 for default; 0: skip it)")
    bench.add_argument("--mixed-text", type=_int_at_least(1), nargs=2, default=[10, 200], metavar=("LOW", "HIGH"),
                       help="text tokens per prompt in the mixed scenario, spread evenly from LOW to HIGH (default: 10 200)")
    bench.add_argument("--serving-batch", type=_int_at_least(0), default=None, metavar="B",
                       help="requests in the serving scenario (images of mixed resolutions, prompts of mixed lengths; transformers' "
                            "padded batch, the engine with every token and at keep ratios 1/3, 2/9, 1/9); default: the preset's, "
                            "16 for the Qwen2.5-VL presets, none for LLaVA (0: skip it)")
    bench.add_argument("--decode-batch", type=_int_at_least(1), nargs="*", default=[], metavar="B",
                       help="batch sizes of the decode scenario: tokens/s of the engine's generate against transformers' generate "
                            "on B requests, greedy (default: none; 1 8 on a GPU is the usual pair)")
    bench.add_argument("--decode-tokens", type=_int_at_least(2), default=16, metavar="N",
                       help="new tokens per request in the decode scenario (default 16)")
    bench.add_argument("--warmup", type=_int_at_least(0), default=2, help="untimed prefills per configuration before timing (default 2)")
    bench.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed prefills per configuration; the report gives their median and min-max (default 5)")
    bench.add_argument("--out-dir", default="bench/out", help="where the JSON, markdown tables and PNG go")
    bench.add_argument("--no-plot", action="store_true", help="write the JSON only, no PNG")
    bench.add_argument("--force", action="store_true", help="run on a CPU even above 200 TFLOPs of estimated work (the full-size presets; the estimate says how long)")
    bench.add_argument("--quiet", action="store_true", help="no progress output, only the table")
    bench.set_defaults(handler=run_report_command)

    pruning = sub.add_parser("pruning", help="time the pruning module (Scorer + selection) alone, at the published Scorer size")
    pruning.add_argument("--tokens", type=_int_at_least(1), default=576, help="visual tokens per image (N)")
    pruning.add_argument("--dim", type=_int_at_least(1), default=1024, help="vision feature width (d_v)")
    pruning.add_argument("--keep", type=_int_at_least(1), default=64, help="tokens kept per image (K), 1 <= K <= N")
    pruning.add_argument("--batch", type=_int_at_least(1), default=1, help="images per call")
    pruning.add_argument("--dtype", type=_dtype_arg, default=torch.float32, help="fp32, fp16 or bf16")
    pruning.add_argument("--device", type=_device, default=default_device(), help=_DEVICE_HELP)
    pruning.add_argument("--warmup", type=_int_at_least(0), default=5, help="untimed calls before timing (default 5)")
    pruning.add_argument("--repeats", type=_int_at_least(1), default=50, help="timed calls; median and min-max are printed (default 50)")
    pruning.add_argument("--out", default="bench/out/pruning.json", help="where to write the JSON results")
    pruning.add_argument("--selectors", nargs="*", default=[], choices=SELECTORS, metavar="NAME",
                         help=f"also time these selectors side by side, interleaved ({', '.join(SELECTORS)}; none by default)")
    pruning.set_defaults(handler=run_pruning_benchmark)

    generate = sub.add_parser("generate", help="answer a question about an image with a local checkpoint, pruned by a Scorer")
    _add_local_model_args(generate)
    budget = generate.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=_int_at_least(1), metavar="K", help="visual tokens to keep, 1 <= K <= N of the image")
    budget.add_argument("--keep-ratio", type=_ratio, metavar="R", help="keep K = max(1, round(R * N)) tokens, 0 < R <= 1")
    generate.add_argument("--prompt", required=True, help="the question; the chat template adds the image placeholder unless the text holds it")
    generate.add_argument("--full", action="store_true", help="also answer with every visual token (same engine path), for comparison")
    generate.add_argument("--max-new-tokens", type=_int_at_least(1), default=32, help="greedy decoding stops after this many tokens or at EOS (default 32)")
    generate.set_defaults(handler=run_generate_command)

    show = sub.add_parser("show", help="PNG of the kept tokens on the image and the similarity of top-K vs bottom-K tokens")
    _add_local_model_args(show)
    show.add_argument("--keep", type=_int_at_least(1), required=True, metavar="K", help="visual tokens to keep, 1 <= K <= N of the image")
    show.add_argument("--out", default="autoselect-show.png", metavar="PNG", help="where to write the picture (default autoselect-show.png)")
    show.set_defaults(handler=run_show_command)

    _add_train_subcommand(sub)
    return parser


def _add_train_subcommand(sub) -> None:
    """``autoselect-fast train``: everything lives in ``autoselect_fast.training.cli``."""
    from .training.cli import add_train_arguments, run_train_command

    train = sub.add_parser("train", help="train a Scorer + Denoiser on a frozen VLM (config file or flags; torchrun for DDP)")
    add_train_arguments(train)
    train.set_defaults(handler=run_train_command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except preflight.UsageError as exc:  # a bad argument found before the expensive work: one line, exit 2
        print(f"autoselect-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # a preset too large for this machine: say so, no traceback
        print(f"autoselect-fast: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
