#!/bin/bash
# One device call: import check, GPU tests, optional sanitizer, kernel benchmark.
# Usage (on the GPU machine, from the repo root): tools/gpu_check.sh [quick|full|sanitize]
set -o pipefail
MODE=${1:-full}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "
import sys; sys.path.insert(0, 'tests/gpu'); import kernel_ffi
e = kernel_ffi.extension(); print('variants:', sorted(e.variants())); print('build:', e.build_info())
" 2>&1 | tee "$OUT/import.log" || exit 1
if [ "$MODE" = sanitize ]; then
  compute-sanitizer --tool memcheck python3 -m pytest tests/gpu -x -q -k "d128-b2-q1000 or q7-k7 or seqused" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/memcheck.log"
  compute-sanitizer --tool racecheck python3 -m pytest tests/gpu -x -q -k "d128-b1-q333" -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/racecheck.log"
  exit 0
fi
timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "$MODE" = full ]; then
  timeout 240 python3 tools/kernel_bench.py --json "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/bench.log"
fi
