"""Host replay of Triton's ``tl.randn(seed, offset)`` stream, in NumPy (no Triton import).

This module owns ``philox_randn``: the reference backend of ``ops.vp_gate`` uses it so that a CPU run
without Triton draws the same ε from (seed, offset) as the VP-gate kernels do (equal to the kernels'
fp32 noise up to the last bits of log/cos/sqrt, which differ between NumPy and a GPU's math units).

Triton's recipe (``triton/language/random.py``): counters (c0, c1, c2, c3) = (lo32(i), hi32(i), 0, 0)
for the index i (the kernels use 32-bit counters, so hi32(i) = 0), key (lo32(seed), hi32(seed)), ten Philox-4x32 rounds; the first two outputs,
read as int32, become uniforms ``(x if x >= 0 else ~x) · 4.6566127342e-10`` and then one Box-Muller
normal ``sqrt(-2 log max(u1, 1e-7)) · cos(2π u2)``, all in fp32.
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


def philox_randn(numel: int, seed: int, offset: int = 0) -> np.ndarray:
    """fp32 normals for the indices ``offset .. offset + numel - 1`` of the stream ``seed``."""
    idx = np.arange(numel, dtype=np.uint64) + np.uint64(offset)
    c0, c1 = idx & _M32, idx >> np.uint64(32)
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
    u1 = np.maximum(np.float32(1e-7), _uniform(c0))
    u2 = _uniform(c1)
    theta = np.float32(6.283185307179586) * u2
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    return (radius * np.cos(theta)).astype(np.float32)
