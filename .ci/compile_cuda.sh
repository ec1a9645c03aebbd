#!/usr/bin/env bash
# Compile the extension's CUDA build with nvcc and the host compiler, without needing a GPU or a
# CUDA build of torch, so a CUDA build error cannot land unseen (CPU machines build only the CPU
# extension, see setup.py).
#
#   1. nvcc compiles csrc/pack_kernel.cu (plain CUDA, no torch headers; C++20 as in torch's own
#      extension build) to an object for sm_90 (override: CUDA_ARCHS="80 90 100"), warnings as errors;
#   2. the host compiler compiles the CUDA build's C++ (pack.cpp and pack_cuda.cpp with
#      AUTOSELECT_FAST_WITH_CUDA) against torch's and CUDA's headers;
#   3. the launcher symbol pack_cuda.o calls must be the one pack_kernel.o defines (a signature
#      drift between pack_kernel.h and pack_kernel.cu would otherwise only show at import time).
#
# Needs nvcc and an installed torch (its headers). .ci/run calls it after installing.
# Usage: bash .ci/compile_cuda.sh     (env: NVCC or CUDA_HOME, CXX, CUDA_ARCHS)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ -z "${NVCC:-}" ]; then
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; else NVCC=nvcc; fi
fi
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "error: nvcc not found ('$NVCC'): install the CUDA toolkit, or set NVCC or CUDA_HOME" >&2
  exit 1
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "error: 'python -c \"import torch\"' fails: install the project first (pip install -r requirements.txt)" >&2
  exit 1
fi
CXX="${CXX:-c++}"
CUDA_ARCHS="${CUDA_ARCHS:-90}"
# The CUDA headers nvcc itself uses (nvcc may be a wrapper script outside the toolkit).
CUDA_INC="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 \
  | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
if [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
  echo "error: cannot find the CUDA headers of $NVCC (got '$CUDA_INC')" >&2
  exit 1
fi

mkdir -p build  # scratch space inside the clone (git-ignored)
out="$(mktemp -d build/compile_cuda.XXXXXX)"
trap 'rm -rf "$out"' EXIT

echo "== nvcc $("$NVCC" --version | tail -n 2 | head -n 1)"
gencode=()
for arch in $CUDA_ARCHS; do
  gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
"$NVCC" -std=c++20 -O3 "${gencode[@]}" -Werror all-warnings -Xcompiler -Wall,-Wextra \
  -I csrc -c csrc/pack_kernel.cu -o "$out/pack_kernel.o"
echo "compiled csrc/pack_kernel.cu for sm_{${CUDA_ARCHS// /,}}"

# Torch and Python include dirs; CPU wheels ship c10/cuda headers but not the CMake-generated
# cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only sets export macros).
mapfile -t torch_inc < <(python -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()['include']]:
    print(p)")
inc=()
for p in "${torch_inc[@]}"; do inc+=(-isystem "$p"); done
cxxflags=(-std=c++20 -O0 -fPIC -Wall -Wextra -Werror -DAUTOSELECT_FAST_WITH_CUDA
          -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C -isystem "$CUDA_INC" "${inc[@]}" -I csrc)
for src in pack.cpp pack_cuda.cpp; do
  "$CXX" "${cxxflags[@]}" -c "csrc/$src" -o "$out/${src%.cpp}.o"
  echo "compiled csrc/$src (CUDA build)"
done

# (Symbol lists are captured first: `nm | grep -q` can fail under pipefail when grep exits early.)
needed="$(nm --undefined-only "$out/pack_cuda.o" | awk '{print $2}' | grep launch_pack_varlen || true)"
defined="$(nm --defined-only "$out/pack_kernel.o" | awk '{print $3}')"
if [ -z "$needed" ] || ! grep -xF "$needed" <<<"$defined" >/dev/null; then
  echo "error: pack_cuda.o calls '${needed:-<no launcher>}', which pack_kernel.o does not define" >&2
  exit 1
fi
echo "launcher symbol matches: $needed"
echo "OK"
