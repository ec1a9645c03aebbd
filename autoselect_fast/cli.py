"""Command line: ``autoselect-fast`` (also ``python -m autoselect_fast``).

``autoselect-fast bench`` is the benchmark report (``autoselect_fast.report``): TTFT breakdown,
pruning overhead and FLOPs of the full model against pruned budgets, on a preset model with random
weights (``default``: LLaVA-1.5-shaped, scaled down to run in about a minute on a 2-core CPU).

``autoselect-fast pruning`` times the pruning module alone (Scorer + hard top-K selection) on a
LLaVA-1.5-sized input (N = 576 visual tokens of width 1024, default Scorer of 2 blocks), prints the
median with min-max, and writes a JSON with the environment next to the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _dtype(name: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise argparse.ArgumentTypeError(f"--dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def run_pruning_benchmark(args: argparse.Namespace) -> dict:
    from .modules import Scorer, ScorerConfig
    from .reference import select_tokens
    from .timing import environment, measure

    device = torch.device(args.device)
    torch.manual_seed(0)
    scorer = Scorer(ScorerConfig(input_dim=args.dim)).to(device=device, dtype=args.dtype).eval()
    features = torch.randn(args.batch * args.tokens, args.dim, device=device, dtype=args.dtype)
    cu_seqlens = torch.arange(0, args.batch + 1, device=device, dtype=torch.int64) * args.tokens

    @torch.inference_mode()
    def pruning_module():
        scores = scorer(features, cu_seqlens)
        return select_tokens(scores, features, args.keep, cu_seqlens)

    @torch.inference_mode()
    def scorer_only():
        return scorer(features, cu_seqlens)

    print(f"pruning module: batch {args.batch} x N={args.tokens} tokens of width {args.dim}, keep K={args.keep}, {args.dtype}, {device}")
    total = measure(pruning_module, device=device, warmup=args.warmup, repeats=args.repeats)
    scoring = measure(scorer_only, device=device, warmup=args.warmup, repeats=args.repeats)
    print(f"  Scorer + selection : {total}")
    print(f"  Scorer alone       : {scoring}")
    result = {
        "benchmark": "pruning_module",
        "environment": environment(device),
        "shape": {"batch": args.batch, "tokens": args.tokens, "dim": args.dim, "keep": args.keep},
        "dtype": str(args.dtype),
        "pruning_module": total.as_dict(),
        "scorer_only": scoring.as_dict(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"  results written to {args.out}")
    return result


def run_report_command(args: argparse.Namespace) -> dict:
    from .report import ReportSettings, run_report

    settings = ReportSettings(
        preset=args.preset, keeps=args.keep, device=args.device, dtype=args.dtype, batch=args.batch,
        mixed_batch=args.mixed_batch, mixed_text=tuple(args.mixed_text),
        warmup=args.warmup, repeats=args.repeats, out_dir=args.out_dir, plot=not args.no_plot, progress=not args.quiet,
    )
    return run_report(settings)


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="autoselect-fast", description="AutoSelect visual-token pruning: benchmarks and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="TTFT report: the engine at pruned budgets against the unmodified transformers model and the peers' padded way")
    bench.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model preset (default: CPU-sized LLaVA-1.5 shape)")
    bench.add_argument("--keep", type=int, nargs="*", default=[], help="budgets K, replacing the preset's (192 128 64 for LLaVA-1.5)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: the preset's (fp32 on the CPU preset, fp16 otherwise)")
    bench.add_argument("--batch", type=int, default=1, help="requests per prefill in the single-prompt-shape scenario")
    bench.add_argument("--mixed-batch", type=int, default=None, metavar="B",
                       help="requests in the mixed-prompt batch scenario, timed at the smallest K (default: the preset's, 8 for default; 0: skip it)")
    bench.add_argument("--mixed-text", type=int, nargs=2, default=[10, 200], metavar=("LOW", "HIGH"),
                       help="text tokens per prompt in the mixed scenario, spread evenly from LOW to HIGH (default: 10 200)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--out-dir", default="bench/out", help="where the JSON, markdown tables and PNG go")
    bench.add_argument("--no-plot", action="store_true")
    bench.add_argument("--quiet", action="store_true", help="no progress output, only the table")
    bench.set_defaults(handler=run_report_command)

    pruning = sub.add_parser("pruning", help="time the pruning module (Scorer + selection) alone")
    pruning.add_argument("--tokens", type=int, default=576, help="visual tokens per image (N)")
    pruning.add_argument("--dim", type=int, default=1024, help="vision feature width (d_v)")
    pruning.add_argument("--keep", type=int, default=64, help="tokens kept per image (K)")
    pruning.add_argument("--batch", type=int, default=1)
    pruning.add_argument("--dtype", type=_dtype, default=torch.float32, help="fp32, fp16 or bf16")
    pruning.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pruning.add_argument("--warmup", type=int, default=5)
    pruning.add_argument("--repeats", type=int, default=50)
    pruning.add_argument("--out", default="bench/out/pruning.json", help="where to write the JSON results")
    pruning.set_defaults(handler=run_pruning_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MemoryError as exc:  # a preset too large for this machine: say so, no traceback
        print(f"autoselect-fast: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
