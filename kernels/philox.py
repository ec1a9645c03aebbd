"""The VP gate's noise stream: its contract, stated here once, and its replay on the host in NumPy.

Contract (``kernels/vp_gate.py`` draws this stream on the GPU; ``ops.vp_gate`` documents its noise by
pointing here). The stream ``seed`` (an int in [0, 2^63)) is a sequence of fp32 normals indexed by a
32-bit element number e; ``vp_gate(x, alpha, seed=seed, offset=offset)`` gives element i of x
(row-major) the stream element e = offset + i. Four consecutive elements share one Philox call:

* element e uses the Philox-4x32-10 call with counters (e >> 2, 0, 0, 0) and key (lo32(seed), hi32(seed));
* its four outputs, read as int32 x, become uniforms u = (x if x >= 0 else ~x) · 4.6566127342e-10;
* Box-Muller on (u0, u1) gives lanes 0 and 1 (r cos θ, r sin θ), on (u2, u3) lanes 2 and 3, with
  r = sqrt(-2 ln 2 · log2(max(u_a, 1e-7))) and θ = 2π u_b - π (u_a, u_b the pair's first and second);
* element e takes lane e & 3. All arithmetic in fp32.

This module owns ``philox_randn``, that stream's elements offset .. offset + numel - 1: the reference
backend of ``ops.vp_gate`` uses it so that a CPU run without Triton draws the same ε from (seed, offset)
as the VP-gate kernels do (equal to the kernels' fp32 noise up to the last bits of log2/sqrt/sin/cos,
which differ between NumPy and a GPU's math units; bit-equal to the kernels in Triton's interpreter).
``tests/test_kernels_vp_gate.py`` rebuilds the noise from the contract above, independently of both.
"""
from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
N_ROUNDS = 10


def _uniform(bits: np.ndarray) -> np.ndarray:
    x = (bits & _M32).astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def philox4x32(counter: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """The four uint32 outputs (as uint64 arrays) of Philox-4x32-10 for counters (counter, 0, 0, 0)."""
    c0 = counter.astype(np.uint64) & _M32
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed) & _M32, (np.uint64(seed) >> np.uint64(32)) & _M32
    for _ in range(N_ROUNDS):
        prod_b = _ROUND_B * c2  # both factors < 2^32, so the uint64 product is exact
        prod_a = _ROUND_A * c0
        c0 = (prod_b >> np.uint64(32)) ^ c1 ^ k0
        c2 = (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1 = prod_b & _M32
        c3 = prod_a & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def _box_muller(bits_a: np.ndarray, bits_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u_a = np.maximum(_uniform(bits_a), np.float32(1e-7))
    theta = _uniform(bits_b) * np.float32(6.283185307179586) - np.float32(3.141592653589793)
    r = np.sqrt(np.log2(u_a) * np.float32(-1.3862943611198906))
    return (r * np.cos(theta)).astype(np.float32), (r * np.sin(theta)).astype(np.float32)


def philox_randn(numel: int, seed: int, offset: int = 0) -> np.ndarray:
    """fp32 normals for the stream elements ``offset .. offset + numel - 1`` of the stream ``seed``."""
    if numel == 0:
        return np.zeros(0, dtype=np.float32)
    first_group, last_group = offset >> 2, (offset + numel - 1) >> 2
    b0, b1, b2, b3 = philox4x32(np.arange(first_group, last_group + 1, dtype=np.uint64), seed)
    n0, n1 = _box_muller(b0, b1)
    n2, n3 = _box_muller(b2, b3)
    stream = np.stack([n0, n1, n2, n3], axis=1).reshape(-1)  # element 4g + lane
    start = offset - 4 * first_group
    return stream[start:start + numel].copy()
