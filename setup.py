"""Build and install autoselect_fast.

The repository layout (see DESIGN.md section 6) keeps the Triton kernels in a top-level ``kernels/``
folder; it is installed as ``autoselect_fast.kernels`` and never as a top-level ``kernels`` module
(transformers probes a package of that name).

Install without build isolation so the extension builds against the torch you already have:

    pip install --no-build-isolation -e .
"""
from setuptools import setup

PACKAGES = ["autoselect_fast", "autoselect_fast.kernels"]

setup(
    name="autoselect_fast",
    version="0.1.0",
    description="Inference engine and kernels for AutoSelect learned visual-token pruning in VLMs",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={
        "autoselect_fast": "autoselect_fast",
        "autoselect_fast.kernels": "kernels",
    },
    # torch is deliberately unpinned here: CPU machines pin it through requirements.txt, GPU users
    # keep their CUDA build (DESIGN.md section 8).
    install_requires=["torch>=2.9", "triton>=3.4", "transformers>=5.17,<6", "safetensors", "numpy", "tqdm", "pillow"],
    entry_points={"console_scripts": ["autoselect-fast=autoselect_fast.cli:main"]},
)
