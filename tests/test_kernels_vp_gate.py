"""The fused VP gate (kernels/vp_gate.py through ops.vp_gate) against reference.vp_gate.

The reference is fed the noise the kernel used (``ops.vp_gate_noise`` materialises it from the same
(seed, offset)), runs in float64 and casts to the input dtype. Tolerances per dtype of x:

* x̃ and ∂L/∂x (relative to max |ref|, at least 1):  fp32 1e-5, fp16 2e-3, bf16 1.6e-2
* ∂L/∂α (relative to max |ref|, at least 1):         fp32 1e-5, fp16 4e-3, bf16 3e-2
  (α in the dtype of x; one case keeps α in fp32 with bf16 x)
* Noise statistics on 131,072 draws: |mean| < 0.02 (6σ), |var - 1| < 0.03 (~7σ), kurtosis 3 ± 0.1,
  Kolmogorov-Smirnov distance to N(0,1) < 0.01 (the 0.1 % critical value is 0.0054), lag-1
  correlation < 0.02.

block_d=8 on 20 or 33 columns makes the column loop run several times; 37 rows span three 16-row programs.

Private names used here: this file is the unit test of the kernel module's private Triton kernels and
their Philox stream arguments (``_vp_gate_fwd_kernel``, ``_vp_gate_bwd_kernel``, ``_noise_kernel``,
``_stream_args``).
"""
import math

import pytest
import torch

from autoselect_fast import ops
from autoselect_fast import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ALPHA_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = [(9,), (1, 1), (37, 20), (2, 19, 33)]


def make_inputs(shape, dtype, device, *, alpha_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    alpha = torch.rand(shape[:-1], generator=gen)
    flat = alpha.view(-1)
    flat[:2] = torch.tensor([0.0, 1.0])[: flat.numel()]  # the clamped ends of the derivative
    return x.to(device), alpha.to(alpha_dtype or dtype).to(device)


def rel_err(got, want):
    return (got.double().cpu() - want).abs().max().item() / max(1.0, want.abs().max().item())


def run_both(x, alpha, *, seed, offset, block_d=8):
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = torch.randn(x.shape, generator=gen).to(x.dtype)
    xk, ak = x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
    out = ops.vp_gate(xk, ak, seed=seed, offset=offset, backend="triton", block_d=block_d)
    out.backward(upstream.to(x.device))
    noise = ops.vp_gate_noise(x.shape, seed, offset, device=x.device, backend="triton")
    xr = x.detach().cpu().double().requires_grad_(True)
    ar = alpha.detach().cpu().double().requires_grad_(True)
    out_ref = R.vp_gate(xr, ar, noise=noise.cpu().double())
    out_ref.backward(upstream.double())
    return (out, xk.grad, ak.grad), (out_ref.detach(), xr.grad, ar.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_vp_gate_matches_reference_with_the_kernels_noise(kernel_device, dtype, shape):
    x, alpha = make_inputs(shape, dtype, kernel_device)
    (out, gx, ga), (out_ref, gx_ref, ga_ref) = run_both(x, alpha, seed=1234, offset=77)
    assert out.dtype == dtype and gx.dtype == dtype and ga.dtype == dtype
    assert out.shape == x.shape and ga.shape == alpha.shape
    assert torch.isfinite(ga).all()
    assert rel_err(out, out_ref) <= OUT_RTOL[dtype]
    assert rel_err(gx, gx_ref) <= OUT_RTOL[dtype]
    assert rel_err(ga, ga_ref) <= ALPHA_RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vp_gate_aligned_fast_path_matches_reference(kernel_device, dtype):
    """d and offset multiples of 4: one Philox call per four elements (the other tests use offset 77)."""
    x, alpha = make_inputs((13, 24), dtype, kernel_device, seed=4)
    (out, gx, ga), (out_ref, gx_ref, ga_ref) = run_both(x, alpha, seed=2**33 + 5, offset=2**32 - 13 * 24 - 4)
    assert rel_err(out, out_ref) <= OUT_RTOL[dtype]
    assert rel_err(gx, gx_ref) <= OUT_RTOL[dtype]
    assert rel_err(ga, ga_ref) <= ALPHA_RTOL[dtype]


def test_vp_gate_fp32_alpha_with_bf16_x(kernel_device):
    x, alpha = make_inputs((37, 20), torch.bfloat16, kernel_device, alpha_dtype=torch.float32, seed=3)
    (out, gx, ga), (out_ref, gx_ref, ga_ref) = run_both(x, alpha, seed=5, offset=0, block_d=32)
    assert out.dtype == torch.bfloat16 and ga.dtype == torch.float32
    assert rel_err(out, out_ref) <= OUT_RTOL[torch.bfloat16]
    assert rel_err(gx, gx_ref) <= OUT_RTOL[torch.bfloat16]
    assert rel_err(ga, ga_ref) <= 1e-5  # x is exact in fp32; only the fp32 arithmetic differs


def test_forward_and_backward_use_the_materialised_noise(kernel_device):
    """With x = 0 and α = 0 the gate's output is ε itself; with x = 0 ∂L/∂α = -Σ g ε / (2√(1-α))."""
    shape, seed, offset = (21, 40), 99, 1_000
    noise = ops.vp_gate_noise(shape, seed, offset, device=kernel_device, backend="triton")
    assert torch.equal(noise, ops.vp_gate_noise(shape, seed, offset, device=kernel_device, backend="triton"))
    x = torch.zeros(shape, device=kernel_device, requires_grad=True)
    alpha = torch.zeros(shape[0], device=kernel_device, requires_grad=True)
    out = ops.vp_gate(x, alpha, seed=seed, offset=offset, backend="triton", block_d=16)
    assert torch.equal(out, noise)
    upstream = torch.ones(shape, device=kernel_device)
    out.backward(upstream)
    expected = -(noise.double() / 2.0).sum(-1)
    assert torch.allclose(alpha.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_noise_is_indexed_by_the_flat_element_number(kernel_device):
    """(seed, offset) fix the stream: a shifted offset is a slice of the same stream; seeds differ."""
    long = ops.vp_gate_noise((400,), 7, 0, device=kernel_device)
    assert torch.equal(ops.vp_gate_noise((10, 29), 7, 11, device=kernel_device).view(-1), long[11:301])
    assert not torch.equal(ops.vp_gate_noise((400,), 8, 0, device=kernel_device), long)
    last = ops.vp_gate_noise((64,), 7, 2**32 - 64, device=kernel_device)  # the last 32-bit counters
    assert torch.isfinite(last).all() and not torch.equal(last, long[:64])


def test_host_replay_of_the_philox_stream_matches_the_kernel(kernel_device):
    shape, seed, offset = (33, 17), 2**40 + 12345, 2**32 - 33 * 17
    kernel = ops.vp_gate_noise(shape, seed, offset, device=kernel_device, backend="triton").cpu()
    host = ops.vp_gate_noise(shape, seed, offset, backend="reference")
    assert torch.allclose(kernel, host, rtol=1e-5, atol=1e-5)
    if kernel_device.type == "cpu":  # the interpreter runs the same fp32 NumPy math: bit-equal
        assert torch.equal(kernel, host)
        for shape, offset in (((8, 16), 0), ((3, 7), 5), ((1,), 2**32 - 1)):  # aligned and unaligned tiles
            assert torch.equal(ops.vp_gate_noise(shape, seed, offset, backend="triton"),
                               ops.vp_gate_noise(shape, seed, offset, backend="reference"))


def contract_noise(numel, seed, offset):
    """ε of elements offset .. offset + numel - 1 of the stream ``seed``, built in float64 from the contract
    as kernels/philox.py's docstring states it (only its Philox-4x32-10 is reused, known-answer tested)."""
    import numpy as np

    from autoselect_fast.kernels import philox

    zero = philox.philox4x32(np.zeros(1, dtype=np.uint64), 0)  # Random123's kat_vectors: counter 0, key 0
    assert [int(v[0]) for v in zero] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    e = np.arange(offset, offset + numel, dtype=np.uint64)
    outputs = philox.philox4x32(e >> np.uint64(2), seed)  # counters (e >> 2, 0, 0, 0), key (lo32, hi32)
    as_int32 = [(v & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32).astype(np.int64) for v in outputs]
    u = [np.where(x >= 0, x, ~x) * 4.6566127342e-10 for x in as_int32]
    lane = (e & np.uint64(3)).astype(np.int64)
    u_a = np.where(lane < 2, u[0], u[2])
    u_b = np.where(lane < 2, u[1], u[3])
    r = np.sqrt(-2.0 * np.log(np.maximum(u_a, 1e-7)))
    theta = 2.0 * np.pi * u_b - np.pi
    return torch.from_numpy(np.where(lane % 2 == 0, r * np.cos(theta), r * np.sin(theta)))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("shape, offset", [((3, 8), 0), ((5, 7), 6), ((2, 3, 5), 2**32 - 30)], ids=str)
def test_vp_gate_noise_follows_the_documented_contract(kernel_device, backend, shape, offset):
    """ops.vp_gate's noise is the stream kernels/philox.py documents: with α = 0, x̃ = ε exactly, and ε
    of element i of x is stream element offset + i (aligned and unaligned rows, the last counters)."""
    seed = 2**40 + 3
    x = torch.randn(shape).to(kernel_device)
    out = ops.vp_gate(x, torch.zeros(shape[:-1], device=kernel_device), seed=seed, offset=offset, backend=backend)
    want = contract_noise(x.numel(), seed, offset).reshape(shape)
    assert torch.allclose(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert "autoselect_fast.kernels.philox" in ops.vp_gate.__doc__  # the docstring points at the contract


def test_noise_statistics_are_standard_normal(kernel_device):
    z = ops.vp_gate_noise((131_072,), 2024, 0, device=kernel_device, backend="triton").cpu().double()
    n = z.numel()
    mean, var = z.mean().item(), z.var().item()
    assert abs(mean) < 0.02 and abs(var - 1.0) < 0.03
    kurtosis = (((z - mean) / math.sqrt(var)) ** 4).mean().item()
    assert abs(kurtosis - 3.0) < 0.1
    zs = torch.sort(z).values
    cdf = 0.5 * (1.0 + torch.erf(zs / math.sqrt(2.0)))
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    assert ks < 0.01, ks
    lag1 = torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()
    assert abs(lag1) < 0.02


def test_seed_none_is_reproducible_under_manual_seed(kernel_device):
    x, alpha = make_inputs((8, 16), torch.float32, kernel_device)
    torch.manual_seed(0)
    a = ops.vp_gate(x, alpha, backend="triton")
    b = ops.vp_gate(x, alpha, backend="triton")
    torch.manual_seed(0)
    assert torch.equal(ops.vp_gate(x, alpha, backend="triton"), a)
    assert not torch.equal(a, b)  # a fresh seed per call
    gen = torch.Generator().manual_seed(5)
    c = ops.vp_gate(x, alpha, generator=gen, backend="triton")
    assert torch.equal(c, ops.vp_gate(x, alpha, generator=torch.Generator().manual_seed(5), backend="triton"))


def test_reference_backend_is_deterministic_and_agrees_with_the_kernel(kernel_device):
    x, alpha = make_inputs((37, 20), torch.float32, kernel_device, seed=7)
    ref = ops.vp_gate(x, alpha, seed=42, offset=3, backend="reference")
    assert torch.equal(ref, ops.vp_gate(x, alpha, seed=42, offset=3, backend="reference"))
    kernel = ops.vp_gate(x, alpha, seed=42, offset=3, backend="triton")
    assert torch.allclose(kernel.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def test_vp_gate_argument_errors(kernel_device):
    x, alpha = make_inputs((6, 8), torch.float32, kernel_device)
    with pytest.raises(ValueError, match="alpha must have shape"):
        ops.vp_gate(x, alpha[:5], seed=0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        ops.vp_gate(x, alpha + 1.5, seed=0)
    with pytest.raises(ValueError, match="alpha must be finite"):
        ops.vp_gate(x, alpha * float("nan"), seed=0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.vp_gate(x.long(), alpha, seed=0)
    with pytest.raises(ValueError, match="seed must satisfy"):
        ops.vp_gate(x, alpha, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.vp_gate(x, alpha, seed=1.0)
    with pytest.raises(ValueError, match="offset must satisfy"):
        ops.vp_gate(x, alpha, seed=0, offset=-3)
    with pytest.raises(ValueError, match="offset must satisfy"):
        ops.vp_gate(x, alpha, seed=0, offset=2**32 - 47)  # 48 elements would pass 2**32
    with pytest.raises(ValueError, match="either seed or generator"):
        ops.vp_gate(x, alpha, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="clamp_eps"):
        ops.vp_gate(x, alpha, seed=0, clamp_eps=0.0)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.vp_gate(x.t().contiguous().t(), alpha, seed=0, backend="triton")
    with pytest.raises(ValueError, match="block_d must be a power of two"):
        ops.vp_gate(x, alpha, seed=0, block_d=3)


def test_seed_and_offset_never_specialise_the_compiled_kernels():
    """Compiled (not interpreted) kernels take (seed, offset) as three int32 arguments marked
    do_not_specialize, so every seed and offset shares one compiled kernel (no recompile mid-training)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        from autoselect_fast.kernels import vp_gate as V
        for kernel in (V._vp_gate_fwd_kernel, V._vp_gate_bwd_kernel, V._noise_kernel):
            assert type(kernel).__name__ == "JITFunction", type(kernel)
            flags = {p.name: p.do_not_specialize for p in kernel.params}
            assert flags["seed_lo"] and flags["seed_hi"] and flags["offset"], flags
        for seed, offset in ((0, 0), (1, 1), (2**62 + 5, 2**32 - 1), (2**63 - 1, 2**31)):
            args = V._stream_args(seed, offset)
            assert all(-2**31 <= a < 2**31 for a in args), args  # always int32: one signature
            lo, hi, off = (a & 0xFFFFFFFF for a in args)
            assert lo | (hi << 32) == seed and off == offset
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
