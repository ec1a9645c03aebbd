"""Build and install autoselect_fast.

The repository layout (see the layout table in README.md) keeps the Triton kernels in a top-level ``kernels/``
folder; it is installed as ``autoselect_fast.kernels`` and never as a top-level ``kernels`` module
(transformers probes a package of that name). Likewise ``training/`` is installed as
``autoselect_fast.training``.

Install without build isolation so the extension builds against the torch you already have:

    pip install --no-build-isolation -e .

The C++/CUDA extension ``autoselect_fast._C`` (``csrc/``, varlen packing) is built with ninja:

* the CPU path is always built;
* the CUDA path (``csrc/pack_cuda.cpp`` + ``csrc/pack_kernel.cu``) is built when torch is a CUDA
  build (``torch.version.cuda`` is set) and nvcc is found (``CUDA_HOME``); no GPU is needed at build
  time. On a CPU-only (or ROCm) torch the extension is CPU-only: such a torch has no CUDA libraries
  to link against. ``.ci/compile_cuda.sh`` still compiles the CUDA sources there, so CUDA build
  errors are caught on every machine.

Environment flags:

* ``AUTOSELECT_FAST_FORCE_CUDA=1``: build the CUDA path or fail, naming what is missing (CPU-only
  torch, nvcc not found), instead of falling back to a CPU-only build.
* ``AUTOSELECT_FAST_SKIP_CUDA=1``: build the CPU path only, even where CUDA is available.
* ``TORCH_CUDA_ARCH_LIST`` (torch's own flag): GPU architectures to compile for, e.g. ``"9.0"``.
* ``MAX_JOBS`` (torch's own flag): parallel compile jobs of ninja.
"""
import os
import sys

from setuptools import setup

PACKAGES = [
    "autoselect_fast", "autoselect_fast.engine", "autoselect_fast.eval", "autoselect_fast.kernels", "autoselect_fast.models",
    "autoselect_fast.ops", "autoselect_fast.report", "autoselect_fast.training", "autoselect_fast.vllm_plugin",
]
# lmms-eval for `python -m lmms_eval --model autoselect` (autoselect_fast.eval); CI tests 0.7.3 (.ci/eval_env.sh).
# filelock < 4: lmms-eval 0.7.3 imports filelock._api, which filelock 4 no longer has (it does not pin it itself).
EVAL_REQUIRES = ["lmms-eval>=0.7.3,<0.8", "filelock<4"]
CSRC = "csrc"


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise RuntimeError(f"{name}={value!r}: use 1 (on) or 0 (off)")
    return value in ("1", "true", "yes")


def _want_cuda(torch, cuda_home):
    """Whether to build the CUDA path; raises when the flags ask for the impossible."""
    force, skip = _flag("AUTOSELECT_FAST_FORCE_CUDA"), _flag("AUTOSELECT_FAST_SKIP_CUDA")
    if force and skip:
        raise RuntimeError("AUTOSELECT_FAST_FORCE_CUDA=1 and AUTOSELECT_FAST_SKIP_CUDA=1 contradict each other")
    if skip:
        return False
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        missing = "nvcc / CUDA_HOME not found"
    if missing is None:
        return True
    if force:
        raise RuntimeError(f"AUTOSELECT_FAST_FORCE_CUDA=1 but {missing}")
    print(f"autoselect_fast: building the CPU-only extension ({missing})", file=sys.stderr)
    return False


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # at::parallel_for runs its OpenMP loop inline in the extension, so the extension needs OpenMP.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3"] + openmp
    sources = [os.path.join(CSRC, "pack.cpp")]
    depends = [os.path.join(CSRC, name) for name in ("pack.h", "pack_index.h", "pack_kernel.h")]

    if _want_cuda(torch, CUDA_HOME):
        ext = CUDAExtension(
            name="autoselect_fast._C",
            sources=sources + [os.path.join(CSRC, "pack_cuda.cpp"), os.path.join(CSRC, "pack_kernel.cu")],
            depends=depends,
            define_macros=[("AUTOSELECT_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            name="autoselect_fast._C",
            sources=sources,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="autoselect_fast",
    version="0.1.0",
    description="Inference engine and kernels for AutoSelect learned visual-token pruning in VLMs",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={
        "autoselect_fast": "autoselect_fast",
        "autoselect_fast.kernels": "kernels",
        "autoselect_fast.training": "training",
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torch is deliberately unpinned here: CPU machines pin it through requirements.txt, GPU users
    # keep their CUDA build (README.md, "Installing on a GPU machine").
    install_requires=["torch>=2.9", "triton>=3.4", "transformers>=5.17,<6", "safetensors", "numpy", "tqdm", "pillow"],
    extras_require={"eval": EVAL_REQUIRES},
    # the offline lmms-eval task: its YAML files, utils.py, questions and images
    package_data={"autoselect_fast.eval": ["tasks/*/*.yaml", "tasks/*/*.py", "tasks/*/*.jsonl", "tasks/*/images/*.png"]},
    entry_points={
        "console_scripts": ["autoselect-fast=autoselect_fast.cli:main"],
        # vLLM loads this in every process; it only registers the opt-in AutoSelectQwen2_5_VL architecture.
        "vllm.general_plugins": ["autoselect_fast = autoselect_fast.vllm_plugin:register"],
        # lmms-eval finds `--model autoselect` here (autoselect_fast.eval.model_manifest); nothing is imported until it asks.
        "lmms_eval.models": ["autoselect = autoselect_fast.eval:model_manifest"],
    },
)
