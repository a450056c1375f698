#!/bin/bash
# Every CPU figure of BENCHMARKS.md in one run, on an otherwise idle machine:
#   bash benchmarks/cpu_tables.sh > cpu_tables.log 2>&1
# PYTHON (default .venv/bin/python) must have skipgpt_ext built; 2 torch threads throughout.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
date -u
lscpu | grep -E "Model name|^CPU\(s\)|L2 cache|L3 cache"
grep -o -w -E "avx2|avx512f|avx512_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
git rev-parse --short HEAD
set -x
$P benchmarks/bench_kernels.py --shapes smollm2 --T 512 2048 --skip 0 0.4 --reps 5 --threads 2
$P benchmarks/bench_kernels.py --shapes smollm2 --T 1 16 --skip 0 0.4 1.0 --reps 50 --threads 2
$P benchmarks/bench_e2e.py --batch 1 4 --prompt 128 --modes dense native --new-tokens 16 --reps 10 --threads 2
$P benchmarks/bench_e2e.py --batch 1 --prompt 1024 --modes dense native --new-tokens 16 --reps 5 --threads 2
$P benchmarks/bench_kernels.py --shapes llama7b --T 16 512 2048 --skip 0 0.4 --reps 2 --threads 2
set +x
date -u
