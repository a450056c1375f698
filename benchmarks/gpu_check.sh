#!/usr/bin/env bash
# One self-contained GPU check for a lent device machine (no network there):
#   1. build skipgpt_ext with its CUDA kernels against the machine's torch;
#   2. run the GPU tests (tests/test_cuda.py, marker `cuda`), the opt-in wgmma kernels' after
#      the others, in processes of their own;
#   3. run the CUDA microbenchmarks: the tiled GEMM ops and the prefill attention core under
#      each kernel whose tests passed, side by side (bench_kernels.py --mainloops ...
#      --attn-kinds ...), then the full layer table (bench_kernels.py --device cuda);
#   4. compute-sanitizer memcheck over a few cases of each kernel, if time is left;
#   5. write logs and a results table under $OUT (results.md: the summary, then the probe logs and
#      bench tables; printed, then the summary again, last).
# Between 2 and 3, for each test process that failed: the layout probe of its kernels
# (benchmarks/layout_probe.py: where each wrong output element was read from).
# Usage on the device:   OUT=/some/dir bash benchmarks/gpu_check.sh
# Dry run here (no GPU): the build and test collection run, GPU parts report "skipped".
#   PYTHON=.venv-cuda/bin/python OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
# Budget: under 8 minutes in all (BUDGET=470 s; each stage also has its own timeout).
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

# The whole script stays under BUDGET seconds (one device call allows 600): each stage's limit is
# cut to what is left, and a stage with under 20 s left is skipped. Stages run in order of value.
BUDGET=${BUDGET:-470}
stage() {  # name, timeout seconds, log file, command...
  local name=$1 limit=$2 log=$3
  shift 3
  local s=$(date +%s)
  local left=$(( BUDGET - (s - t0) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | skipped: time budget spent | 0 s | - |" >>"$RES.stages"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
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
  # The GPU tests in five processes, the default kernels first; the opt-in wgmma ones (never run
  # before the first device) after, each family in a process of its own, so that a fault there
  # cannot poison the others' CUDA context. A warp-specialised GEMM's mbarrier hang traps
  # after 10 s. Each sets rc_<name>.
  tests() {  # name, limit, log stem, -k expression
    stage "tests-$1" "$2" "$OUT/tests_$3.log" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py -rs \
      -k "$4" --junitxml="$OUT/tests_$3.xml"
    eval "rc_$3=$?"
    tail -n 3 "$OUT/tests_$3.log" 2>/dev/null
  }
  tests default 150 mma "not wgmma"
  tests wgmma 75 wgmma "wgmma and not wgmma_ws and not wgmma_tma and not wgmma_overlap"
  tests wgmma-ws 60 ws wgmma_ws
  tests wgmma-tma 60 tma wgmma_tma
  tests attn-overlap 45 overlap wgmma_overlap
  # Where a test process failed or crashed (not: passed, nothing collected, out of time), the
  # layout probe of its kernels: which operand element each wrong output element came from, so
  # the fix can be found here without another device run (benchmarks/layout_probe.py). The GEMM
  # and the attention kernels of one family are probed in processes of their own.
  failed() { [ "$1" -ne 0 ] && [ "$1" -ne 5 ] && [ "$1" -ne 124 ]; }
  passed() { [ "$1" -eq 0 ]; }
  probe() {  # log stem, --gemm values, --attn values
    stage "probe-$1" 45 "$OUT/probe_$1.log" "$PY" benchmarks/layout_probe.py --device cuda --gemm $2 --attn $3
  }
  if failed $rc_mma; then probe mma-gemm mma ""; probe mma-attn "" mma; fi
  if failed $rc_wgmma; then probe wgmma-gemm wgmma ""; probe wgmma-attn "" wgmma; fi
  if failed $rc_ws; then probe ws wgmma-ws ""; fi
  if failed $rc_tma; then probe tma wgmma-tma ""; fi
  if failed $rc_overlap; then probe overlap "" wgmma-overlap; fi
  # The benchmarks time the default kernels and those opt-in ones whose tests passed.
  loops="mma"
  attn_kinds="mma"
  if passed $rc_wgmma; then loops="$loops wgmma"; attn_kinds="$attn_kinds wgmma"; fi
  if passed $rc_ws; then loops="$loops wgmma-ws"; fi
  if passed $rc_tma; then loops="$loops wgmma-tma"; fi
  if passed $rc_overlap; then attn_kinds="$attn_kinds wgmma-overlap"; fi
  if "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # The tiled GEMM ops and the prefill attention core under each mainloop, side by side (the
    # warp-specialised GEMMs and the overlapped attention in last passes of their own).
    stage bench-mainloops 100 "$OUT/bench_mainloops.txt" \
      "$PY" benchmarks/bench_kernels.py --device cuda --reps 10 --mainloops $loops --attn-kinds $attn_kinds
    stage bench 150 "$OUT/bench_cuda.txt" "$PY" benchmarks/bench_kernels.py --device cuda --reps 20
  else
    echo "| bench | skipped: no CUDA device | 0 s | - |" >>"$RES.stages"
  fi
  # compute-sanitizer memcheck over one GEMM case (mma.sync, wgmma) and one attention case
  # (mma.sync, wgmma), if the budget still allows; without the caching allocator, so that an
  # access past a tensor is past its allocation. (The warp-specialised and overlapped kernels
  # are left out: the budget is spent by then.)
  SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [ -x "$SAN" ]; then
    stage memcheck 90 "$OUT/memcheck.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 7 \
      "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py -x \
      -k "(test_gemm_mainloops_skip_mlp and 300-200-392 and some and dtype0 and not wgmma_ws and not wgmma_tma) or (test_attention_prefill_kernels and case4 and some and dtype0 and not wgmma_overlap)"
    tail -n 5 "$OUT/memcheck.log" 2>/dev/null
  else
    echo "| memcheck | skipped: no compute-sanitizer | 0 s | - |" >>"$RES.stages"
  fi
fi

SUM="$OUT/summary.md"
{
  echo "# GPU check, $(date -u +%Y-%m-%d) ($(( $(date +%s) - t0 )) s)"
  echo
  head -n 2 "$OUT/env.txt" | sed "s/^/    /"
  echo
  echo "| stage | status | time | log |"
  echo "|---|---|---|---|"
  cat "$RES.stages"
  echo
  summary() {  # log, label, pattern of the line to quote
    [ -f "$OUT/$1" ] && printf '%s: %s\n\n' "$2" "$(grep -E "$3" "$OUT/$1" | tail -n 1)"
  }
  counts='[0-9]+ (passed|failed|skipped|error)'
  summary tests_mma.log "Tests" "$counts"
  summary tests_wgmma.log "Tests, wgmma GEMM and attention" "$counts"
  summary tests_ws.log "Tests, warp-specialised wgmma GEMM" "$counts"
  summary tests_tma.log "Tests, warp-specialised wgmma GEMM, TMA weight tiles" "$counts"
  summary tests_overlap.log "Tests, wgmma prefill attention, overlapped" "$counts"
  summary memcheck.log "compute-sanitizer memcheck" "ERROR SUMMARY"
} >"$SUM"
{
  cat "$SUM"
  for f in probe_mma-gemm.log probe_mma-attn.log probe_wgmma-gemm.log probe_wgmma-attn.log probe_ws.log probe_tma.log \
    probe_overlap.log bench_cuda.txt bench_mainloops.txt; do
    if [ -f "$OUT/$f" ]; then
      echo "## $f"
      echo '```'
      cat "$OUT/$f"
      echo '```'
    fi
  done
} >"$RES"
rm -f "$RES.stages"
cat "$RES"
# The summary once more, last, so that the tail of this output (what a device call returns) holds it.
echo
echo "---- summary (also $SUM) ----"
cat "$SUM"
