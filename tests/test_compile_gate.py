"""tools/compile_gate.py fails on a kernel that does not compile and on one that spills registers.

The gate compiles for sm_90 with Triton's compiler and bundled ptxas on this CPU (no GPU); it runs in a
subprocess because the test session has TRITON_INTERPRET=1 set (interpreted kernels cannot compile).
The project's own kernels pass the gate in .ci/run (a full run takes a minute or two, too long here).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "tools" / "compile_gate.py"

CASES = '''
import triton
import triton.language as tl

from autoselect_fast.kernels import CompileCase


@triton.jit
def copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def broken_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK) + undefined_name  # noqa: F821 - the deliberate compile error
    tl.store(out_ptr + offs, tl.load(x_ptr + offs))


@triton.jit
def spilling_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # BLOCK values per single-warp program, all live across a dynamic loop: far over 255 registers.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    for _ in range(n):
        x = x * x + 1.0
    tl.store(out_ptr + offs, x)


def compile_cases():
    sig = dict(x_ptr="*fp32", out_ptr="*fp32", n="i32")
    return [
        CompileCase("copy", copy_kernel, sig, dict(BLOCK=1024), num_warps=4),
        {which}
    ]
'''


def run_gate(tmp_path, which: str) -> subprocess.CompletedProcess:
    path = tmp_path / "cases.py"
    path.write_text(textwrap.dedent(CASES).replace("{which}", which))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(GATE), "--cases", str(path), "--arch", "90", "--jobs", "1"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_gate_fails_on_a_broken_kernel_and_on_spills(tmp_path):
    result = run_gate(tmp_path, """
        CompileCase("broken", broken_kernel, sig, dict(BLOCK=128), num_warps=4),
        CompileCase("spilling", spilling_kernel, sig, dict(BLOCK=8192), num_warps=1),
    """)
    out, err = result.stdout, result.stderr
    assert result.returncode == 1, out + err
    assert "COMPILE GATE FAILED" in err
    assert "broken [sm_90]: compile error" in err and "undefined_name" in err
    assert "spilling [sm_90]: spills" in err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("copy ", "spilling"))}
    assert rows["copy"][1] == "sm_90" and int(rows["copy"][3]) > 0  # the good kernel compiled: registers shown
    assert rows["spilling"][4] != "0/0"  # its spills are in the table
