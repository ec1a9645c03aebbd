"""Compile gate: every Triton kernel compiled ahead of time for sm_80 and sm_90, no GPU needed.

    python tools/compile_gate.py                  # all kernels of autoselect_fast.kernels
    python tools/compile_gate.py --arch 90        # one architecture
    python tools/compile_gate.py --cases FILE.py  # the cases of another module (the gate's own test)
    python tools/compile_gate.py --json OUT.json  # also write the table as JSON

Each kernel module (``kernels/selection.py``, ``soft_topk.py``, ``vp_gate.py``) lists, in
``compile_cases()``, the configurations its launcher really launches (block sizes, warps, dtypes, both
``f`` of Soft Top-K, ...), built from the same config helpers the launcher uses. The gate compiles each
with Triton's compiler and its bundled ``ptxas`` for ``GPUTarget("cuda", arch, 32)`` (pure CPU work),
prints registers, spill stores/loads, stack frame and shared memory per kernel and architecture, and
exits non-zero on any compile error or on spills at a production configuration. ``.ci/run`` runs it.

Two worker processes compile in parallel (``--jobs``); the whole gate takes about a minute or two on
two cores. ``TRITON_INTERPRET`` is cleared here: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (also in the worker processes)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9 (silences its warning)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

ARCHS = (80, 90)
KERNEL_MODULES = ("autoselect_fast.kernels.selection", "autoselect_fast.kernels.soft_topk", "autoselect_fast.kernels.vp_gate")

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _load(source: str):
    """A module by dotted name, or from a ``.py`` file path."""
    if source.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_gate_cases_{abs(hash(source))}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(source)


def _compile_one(source: str, index: int, arch: int) -> dict:
    """Compile case ``index`` of ``source`` for sm_<arch>; returns its row of the table."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    case = _load(source).compile_cases()[index]
    row = dict(kernel=case.name, arch=f"sm_{arch}", num_warps=case.num_warps, production=case.production)
    started = time.perf_counter()
    try:
        names = case.kernel.arg_names
        signature = dict(case.signature)
        for name in case.constexprs:
            signature[name] = "constexpr"
        missing = [n for n in names if n not in signature]
        if missing:
            raise ValueError(f"compile case {case.name!r} gives no type for argument(s) {missing}")
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
                 if signature[n].startswith("*") or n in case.aligned}
        src = triton.compiler.ASTSource(fn=case.kernel, signature=signature, constexprs=case.constexprs, attrs=attrs)
        target = GPUTarget("cuda", arch, 32)
        options = triton.compiler.make_backend(target).parse_options(
            {"num_warps": case.num_warps, "num_stages": case.num_stages})
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        text = log.getvalue()
        regs, spills = _REGS.findall(text), _SPILLS.findall(text)
        if not regs or not spills:
            raise RuntimeError(f"no ptxas resource report in the compile log:\n{text[-2000:]}")
        stack, stores, loads = (int(v) for v in spills[-1])
        row.update(ok=True, registers=int(regs[-1]), spill_stores=stores, spill_loads=loads, stack=stack,
                   shared=int(compiled.metadata.shared))
    except Exception as exc:  # noqa: BLE001 - every failure is reported and fails the gate
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:3000]}",
                   trace=traceback.format_exc(limit=4)[-3000:])
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


def _n_cases(source: str) -> int:
    return len(_load(source).compile_cases())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="compute capability (repeatable); default: 80 and 90")
    parser.add_argument("--cases", action="append", help="module name or .py file with compile_cases(); default: the project's kernels")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--json", help="write the table to this JSON file")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    archs = args.arch or list(ARCHS)
    sources = args.cases or list(KERNEL_MODULES)
    for source in sources:
        if source.endswith(".py") and not os.path.isfile(source):
            parser.error(f"--cases {source!r}: no such file")

    started = time.perf_counter()
    jobs = [(s, i, a) for s in sources for i in range(_n_cases(s)) for a in archs]
    if args.jobs == 1:
        rows = [_compile_one(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(_compile_one, *zip(*jobs)))

    print(f"{'kernel':58s} {'arch':6s} {'warps':>5s} {'regs':>5s} {'spill st/ld':>12s} {'stack':>6s} {'shared':>7s} {'s':>5s}")
    failures = []
    for row in rows:
        if not row["ok"]:
            failures.append(f"{row['kernel']} [{row['arch']}]: compile error: {row['error']}")
            print(f"{row['kernel']:58s} {row['arch']:6s} {row['num_warps']:5d}   COMPILE ERROR")
            continue
        spill = row["spill_stores"] + row["spill_loads"]
        flag = ""
        if spill and row["production"]:
            failures.append(f"{row['kernel']} [{row['arch']}]: spills {row['spill_stores']} B stores / {row['spill_loads']} B loads at a production configuration")
            flag = "  SPILLS"
        print(f"{row['kernel']:58s} {row['arch']:6s} {row['num_warps']:5d} {row['registers']:5d} "
              f"{row['spill_stores']:>5d}/{row['spill_loads']:<6d} {row['stack']:6d} {row['shared']:7d} {row['seconds']:5.1f}{flag}")
    print(f"{len(rows)} compiles in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failures:
        print("\nCOMPILE GATE FAILED:", file=sys.stderr)
        for failure in failures:
            print("  " + failure, file=sys.stderr)
        return 1
    print("compile gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
