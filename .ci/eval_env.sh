#!/usr/bin/env bash
# The lmms-eval model's test environment, and its tests.
#
#   bash .ci/eval_env.sh        # measured on the shared 2-core machine: 33 min on a fresh venv (install ~21, tests 12)
#
# lmms-eval gets a virtual environment of its own: .venv-eval in the clone (git-ignored; reused when
# present, EVAL_VENV=path to put it elsewhere). Its dependencies would change the main environment:
# torchvision (which transformers' image processors switch to when it is importable, so the main
# suite's numbers would come from another backend), datasets, accelerate, wandb and ~100 more. Steps:
#   1. the pinned requirements plus lmms-eval and filelock<4 (setup.py's `eval` extra: lmms-eval 0.7.3
#      imports filelock._api, which filelock 4 removed);
#   2. torchvision: PyPI has only a CUDA build of torchvision 0.28 for x86_64, pulled in next to the CPU
#      torch; its two unguarded fake-kernel registrations are guarded as in .ci/vllm_env.sh;
#   3. this package, without dependencies (the editable install registers the lmms_eval.models entry point);
#   4. tests/test_lmms_eval.py offline: `python -m lmms_eval --model autoselect` on tiny checkpoints, and
#      the learning experiment with every row through lmms-eval.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing is fetched: the task's data are files here

VENV="${EVAL_VENV:-.venv-eval}"
PY="$VENV/bin/python"
EVAL_PINS=("lmms-eval==0.7.3" "filelock<4")

if [ ! -x "$PY" ]; then
  echo "== creating $VENV ($(python3 --version))"
  python3 -m venv "$VENV"
fi

echo "== installing the pinned requirements and ${EVAL_PINS[*]} into $VENV"
"$PY" -m pip install -q -r requirements.txt "${EVAL_PINS[@]}"

echo "== making the CUDA-built torchvision importable next to the CPU torch"
META=$("$PY" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_meta_registrations.py"))')
sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$META"
"$PY" -c "import torchvision, lmms_eval; from importlib.metadata import version; print('torchvision', torchvision.__version__, '| lmms-eval', version('lmms-eval'))"

echo "== installing autoselect_fast into $VENV (no dependencies)"
"$PY" -m pip install -q --no-deps --no-build-isolation -e .

echo "== lmms-eval model tests (offline)"
"$PY" -m pytest tests/test_lmms_eval.py -q -p no:cacheprovider
