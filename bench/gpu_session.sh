#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run, most important first, inside a time budget:
#
#   bash bench/gpu_session.sh RESULTS_DIR [SECONDS]      (default budget 560 s)
#
# 1. builds the package with the CUDA extension (fails rather than fall back to a CPU-only build),
# 2. the CUDA tests (compiled Triton kernels, the CUDA packer, host-sync tests; the runner's CUDA-graph
#    tests first, in their own step),
# 3. kernel timings (bench/bench_kernels.py: eager and CUDA-graph GPU timeline), packer vs copy bandwidth,
#    the pruning module (Scorer + selection) at LLaVA-1.5's size and every selector side by side, the
#    runner (each stage eager vs its CUDA-graph replay, bench/bench_runner.py),
# 4. TTFT reports of the full-size presets (llava-1.5-7b, qwen2.5-vl-7b serving; on CUDA each scenario also
#    times "transformers + CUDA graph", the unmodified model's vision tower and LLM replayed from CUDA
#    graphs, and tests/test_report_graphed.py's CUDA test runs in step 2) and the training
#    step's peak memory, random weights; last, the torch.compile entry of the runner benchmark (the
#    language model compiled inside the graphs, batch 1, K = 64; minutes of compilation).
# Each step has its own time limit (cut to what is left of the budget) and its log in RESULTS_DIR;
# everything is also packed into RESULTS_DIR/gpu-session.tgz after each step, so a run stopped from
# outside still leaves one file with all that was done. Set PYTHON to choose the interpreter.
set -u
RESULTS=${1:?usage: bash bench/gpu_session.sh RESULTS_DIR [SECONDS]}
BUDGET=${2:-560}
PY=${PYTHON:-python3}
STAGE=$(mktemp -d)
mkdir -p "$RESULTS"
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the CUDA tests must run compiled kernels (tests/conftest.py refuses the interpreter)

pack() { tar czf "$RESULTS/gpu-session.tgz" -C "$STAGE" . ; }

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  if (( left < 20 )); then echo "=== $name: skipped, ${left}s of the budget left" | tee -a "$STAGE/steps.txt"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$STAGE/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$STAGE/steps.txt"
  tail -n 30 "$STAGE/$name.log"
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
} > "$STAGE/machine.txt" 2>&1
cat "$STAGE/machine.txt"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null || echo gpu)

# An in-place build, no pip: GPU machines are often offline, and setuptools' `develop` (behind
# `pip install -e`) starts a nested pip that wants to download its build requirements. The links make
# the source tree importable the way setup.py's package_dir installs it.
step install 240 env AUTOSELECT_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  "$PY" setup.py -q build_ext --inplace
for sub in kernels training; do [ -e "autoselect_fast/$sub" ] || ln -s "../$sub" "autoselect_fast/$sub"; done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "from autoselect_fast import packing, training; assert packing.extension_available() and packing._C.built_with_cuda()" >> "$STAGE/install.log" 2>&1; then
  echo "=== the CUDA extension did not build: stopping (see install.log)"; tail -n 30 "$STAGE/install.log"; pack; exit 1
fi
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
step tests-runner-cuda 150 "$PY" -m pytest tests/test_runner.py -q -k cuda -p no:cacheprovider
step tests-cuda 200 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider $XDIST --ignore=tests/test_runner.py
step runner 150 "$PY" bench/bench_runner.py --preset llava-1.5-7b --device cuda --dtype fp16 --keep 64 --out "$STAGE/runner-$GPU-fp16.json"
step kernels 150 "$PY" bench/bench_kernels.py --out "$STAGE/kernels-$GPU.json"
step packing 90 "$PY" bench/bench_packing.py --out "$STAGE/packing-$GPU.json"
step pruning 150 "$PY" -m autoselect_fast pruning --device cuda --dtype fp16 --selectors scorer random norm divprune visionzip --out "$STAGE/pruning-$GPU-fp16.json"
step report-llava-1.5-7b 200 "$PY" -m autoselect_fast bench --preset llava-1.5-7b --device cuda --warmup 5 --repeats 10 --out-dir "$STAGE"
step report-qwen2.5-vl-7b 200 "$PY" -m autoselect_fast bench --preset qwen2.5-vl-7b --device cuda --warmup 5 --repeats 10 --out-dir "$STAGE"
# --- decode (static KV cache, one CUDA graph per batch-size bucket): tokens/s at batch 1 and 8 against
# --- transformers' generate (its static cache, not compiled), LLaVA-1.5-7B K = 64, 64 new tokens (bench/bench_decode.py)
step decode-llava-1.5-7b 150 "$PY" bench/bench_decode.py --preset llava-1.5-7b --device cuda --dtype fp16 --keep 64 \
  --batches 1 8 --new-tokens 64 --warmup 1 --repeats 3 --baseline --out "$STAGE/decode-llava-1.5-7b-$GPU-fp16.json"
# --- end of the decode block
step training-memory 180 "$PY" bench/bench_training_memory.py --preset llava-1.5-7b --batch 8 --keep 64 --out "$STAGE/training-memory-$GPU.json"
# torch.compile of the language model inside the runner's graphs, against the plain graphs (labelled "graph+torch.compile")
step runner-compile 240 "$PY" bench/bench_runner.py --preset llava-1.5-7b --device cuda --dtype fp16 --keep 64 --compile --repeats 10 --out "$STAGE/runner-compile-$GPU-fp16.json"
echo "=== total $(( $(date +%s) - START ))s"; cat "$STAGE/steps.txt"
pack
