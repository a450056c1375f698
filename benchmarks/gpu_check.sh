#!/usr/bin/env bash
# One self-contained GPU check for a lent device machine (no network there):
#   1. build skipgpt_ext with its CUDA kernels against the machine's torch;
#   2. run the GPU tests (tests/test_cuda.py, marker `cuda`; the warp-specialised GEMM's apart);
#   3. run the CUDA kernel microbenchmarks (bench_kernels.py --device cuda), then the tiled GEMM
#      ops under each mainloop side by side (--mainloops mma wgmma wgmma-ws);
#   4. write logs and a results table under $OUT (results.md last, also printed).
# Usage on the device:   OUT=/some/dir bash benchmarks/gpu_check.sh
# Dry run here (no GPU): the build and test collection run, GPU parts report "skipped".
#   PYTHON=.venv-cuda/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
# Budget: under 8 minutes in all (each stage has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # the H200; CI compiles 8.0 and 9.0a
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # also works for an in-place build
RES="$OUT/results.md"
t0=$(date +%s)

stage() {  # name, timeout seconds, log file, command...
  local name=$1 limit=$2 log=$3
  shift 3
  local s=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - s )) s | $(basename "$log") |" >>"$RES.stages"
  return $rc
}

: >"$RES.stages"
"$PY" - <<'EOF' >"$OUT/env.txt" 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
nvidia-smi >>"$OUT/env.txt" 2>&1 || true
nvcc --version >>"$OUT/env.txt" 2>&1 || true

stage build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
if [ $? -ne 0 ]; then  # e.g. no `wheel` there: build in place instead (the tests import from the tree)
  stage build-inplace 300 "$OUT/build_inplace.log" "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import skipgpt_ext as e; assert e.has_kernels('cuda'), 'no CUDA kernels in the build'" >>"$OUT/build.log" 2>&1
build_rc=$?
echo "| import (CUDA kernels registered) | rc=$build_rc | - | build.log |" >>"$RES.stages"
tail -n 3 "$OUT/build.log"

if [ $build_rc -eq 0 ]; then
  stage tests 150 "$OUT/tests.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py -rs \
    -k "not wgmma_ws" --junitxml="$OUT/tests.xml"
  tail -n 5 "$OUT/tests.log"
  # The warp-specialised wgmma GEMM in a process of its own: a pipeline hang traps after 10 s.
  stage tests-wgmma-ws 90 "$OUT/tests_ws.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py -rs \
    -k wgmma_ws --junitxml="$OUT/tests_ws.xml"
  tail -n 3 "$OUT/tests_ws.log"
  if "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    stage bench 200 "$OUT/bench_cuda.txt" "$PY" benchmarks/bench_kernels.py --device cuda --reps 20
    # The tiled GEMM ops under each mainloop side by side (the warp-specialised one last).
    stage bench-mainloops 120 "$OUT/bench_mainloops.txt" \
      "$PY" benchmarks/bench_kernels.py --device cuda --reps 10 --mainloops mma wgmma wgmma-ws
  else
    echo "| bench | skipped: no CUDA device | 0 s | - |" >>"$RES.stages"
  fi
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%d) ($(( $(date +%s) - t0 )) s)"
  echo
  head -n 2 "$OUT/env.txt" | sed "s/^/    /"
  echo
  echo "| stage | status | time | log |"
  echo "|---|---|---|---|"
  cat "$RES.stages"
  echo
  if [ -f "$OUT/tests.log" ]; then
    echo "Tests: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/tests.log" | tail -n 1)"
    echo
  fi
  if [ -f "$OUT/tests_ws.log" ]; then
    echo "Tests, warp-specialised wgmma GEMM: $(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/tests_ws.log" | tail -n 1)"
    echo
  fi
  for f in bench_cuda.txt bench_mainloops.txt; do
    if [ -f "$OUT/$f" ]; then
      echo '```'
      cat "$OUT/$f"
      echo '```'
    fi
  done
} >"$RES"
rm -f "$RES.stages"
cat "$RES"
