#!/bin/bash
# One device call: import check, GPU tests, optional sanitizer, kernel benchmark.
# Usage (on the GPU machine, from the repo root): tools/device/gpu_check.sh [quick|full|sanitize]
set -o pipefail
MODE=${1:-full}
source "$(dirname "$0")/device_env.sh"
# A GPU test run that finds no Hopper GPU fails instead of skipping everything.
export JAX_FA3_REQUIRE_GPU=1
# Tests compile one small XLA graph per shape: skip GEMM autotuning, use several workers.
TEST_ENV="XLA_FLAGS=--xla_gpu_autotune_level=0"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "
import sys; sys.path.insert(0, 'tests/gpu'); import kernel_ffi
e = kernel_ffi.extension(); print('variants:', sorted(e.variants())); print('build:', e.build_info())
" 2>&1 | tee "$OUT/import.log" || exit 1
if [ "$MODE" = sanitize ]; then
  for tool in memcheck racecheck; do
    timeout ${SANITIZE_TIMEOUT:-280} compute-sanitizer --tool $tool --error-exitcode 3 python3 tools/sanitize_cases.py $SANITIZE_HEAD_DIMS 2>&1 \
      | tee "$OUT/$tool.log" | grep -E "ERROR SUMMARY|========= [A-Z]|NaN|done" | tail -12
  done
  exit 0
fi
# A smoke case first: a hung kernel then costs 90 s, not the whole call.
timeout 90 python3 -m pytest tests/gpu -q -p no:cacheprovider -x -k "${SMOKE:-bfloat16-d128-b2-q1000-k1000-h4_4-bottom_right}" 2>&1 | tee "$OUT/smoke.log" | tail -15 || exit 1
env $TEST_ENV timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/gpu -v -n ${WORKERS:-8} -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/tests.log" | grep -v PASSED | tail -40
if [ "$MODE" = full ]; then
  timeout 240 python3 tools/kernel_bench.py --json "$OUT/kernel_bench.json" 2>&1 | tee "$OUT/bench.log"
fi
