"""FLOPs as executed, counted with ``torch.utils.flop_counter``, attention included.

torch counts neither its CPU flash-attention kernel nor the varlen custom op the engine uses on CUDA,
and its own CUDA SDPA formulas reject grouped-query shapes (torch 2.11: "query/key/value shapes are
incompatible" for Qwen's 28 query / 4 key heads). :func:`flop_counter` maps all of them to one
formula, :func:`sdpa_flops`: Q K^T and P V as full L x L products (torch's convention for its CUDA
SDPA kernels), per query head; :func:`varlen_flops` applies it per packed segment.
"""
from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one scaled-dot-product attention call from its ``(B, H, L, d)`` shapes, per query head."""
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[-2] * (d + value_shape[-1])


def varlen_flops(query, key, value, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """``torch.nn.attention.varlen`` (the engine's CUDA attention): :func:`sdpa_flops` per segment."""
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()  # a host read: counting runs untimed
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    _, heads, d = query.shape  # (T, H, d) packed; per segment the (1, H, L, d) shapes of sdpa_flops
    return sum(sdpa_flops((1, heads, lq, d), (1, heads, lk, d), (1, heads, lk, value.shape[-1])) for lq, lk in zip(lengths_q, lengths_k))


varlen_flops._get_raw = True  # FlopCounterMode passes the tensors themselves (their offsets are needed)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts every attention kernel the report's contenders run."""
    aten = torch.ops.aten
    ops = [aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
           aten._scaled_dot_product_efficient_attention, getattr(aten, "_scaled_dot_product_cudnn_attention", None)]
    mapping = {op: sdpa_flops for op in ops if op is not None}
    try:
        importlib.import_module("torch.nn.attention.varlen")  # registers torch.ops.torch_attn._varlen_attn
    except ImportError:  # torch < 2.9
        pass
    varlen = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
    if varlen is not None:
        mapping[varlen] = varlen_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of one call of ``fn``."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def module_flops(counter: FlopCounterMode, root: nn.Module, modules: Sequence[nn.Module]) -> int:
    """FLOPs ``counter`` attributed to ``modules`` (submodules of ``root``), by their qualified names."""
    names = {id(m): name for name, m in root.named_modules()}
    counts = counter.get_flop_counts()
    total = 0
    for m in modules:
        key = f"{type(root).__name__}.{names[id(m)]}"
        if key not in counts:
            raise RuntimeError(f"the FLOP counter saw no module {key!r}; the model's structure is not what the report expects")
        total += sum(counts[key].values())
    return total
