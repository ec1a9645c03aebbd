"""Shared test set-up.

Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which is chosen when a kernel
is decorated, so ``TRITON_INTERPRET=1`` is set here, before any test module imports triton. A value
already in the environment wins.

Fixture ``kernel_device``: every kernel test runs on "cpu" (interpreter) and on "cuda" (compiled),
the latter skipped with a reason when no GPU is present.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_NO_CUDA = "CUDA is not available: the compiled Triton kernels need a GPU"
_NO_INTERPRETER = "TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA))])
def kernel_device(request) -> torch.device:
    """The device the Triton kernels are tested on."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(_NO_INTERPRETER)
    return torch.device(request.param)
