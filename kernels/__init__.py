"""Triton kernels of autoselect_fast, installed as ``autoselect_fast.kernels``.

Each module holds one fused kernel and its launcher; ``autoselect_fast.ops`` dispatches to them and
``autoselect_fast.reference`` is the spec every kernel is tested against.
"""
