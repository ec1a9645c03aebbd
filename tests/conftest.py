"""Shared test set-up.

Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which is chosen when a kernel
is decorated, so ``TRITON_INTERPRET=1`` is set here, before any test module imports triton. A value
already in the environment wins. On a machine with a GPU the interpreter is refused outright: in one
process the kernels are either all interpreted or all compiled, and interpreted kernels would let the
CUDA tests pass without ever running compiled code (the CPU interpreter tests run on GPU-less CI).

``AUTOSELECT_FAST_VALIDATE=1`` (unless already set): every ``ops`` call in the tests runs the data
checks (the ones that read tensor values), also on CUDA, so argument-error tests hold on every device.

Fixture ``kernel_device``: every kernel test runs on "cpu" (interpreter) and on "cuda" (compiled),
the latter skipped with a reason when no GPU is present, and failing when its kernels are interpreted.
"""
import os

import pytest
import torch

_INTERPRET_VALUES = ("1", "true", "on", "yes")

if torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _INTERPRET_VALUES:
        raise pytest.UsageError(
            f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} is set on a machine with a GPU: the CUDA tests would "
            "run Triton's interpreter instead of compiled kernels. Unset it (the interpreter tests run on machines "
            "without a GPU)."
        )
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AUTOSELECT_FAST_VALIDATE", "1")

_NO_CUDA = "CUDA is not available: the compiled Triton kernels need a GPU"
_NO_INTERPRETER = "TRITON_INTERPRET is not 1: the Triton kernels cannot run on CPU tensors"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA))])
def kernel_device(request) -> torch.device:
    """The device the Triton kernels are tested on; on "cuda" they must be compiled, never interpreted."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(_NO_INTERPRETER)
    if request.param == "cuda":
        from autoselect_fast import ops

        assert ops.kernels_compiled(), "CUDA kernel test with interpreted Triton kernels (TRITON_INTERPRET was set at import)"
    return torch.device(request.param)
