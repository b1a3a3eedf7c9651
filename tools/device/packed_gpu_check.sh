#!/bin/bash
# A device call for packed sequences (run from the repo root on the GPU machine).
#   tools/device/packed_gpu_check.sh test    import check, the packed-sequence GPU tests, memcheck on
#                                     the packed cases, then the rest of the GPU suite
#   tools/device/packed_gpu_check.sh bench   the packed benchmark (PACKED_ARGS), then the unpacked
#                                     forward/fwd+bwd points beside cuDNN (BENCH_ARGS)
# Everything goes to $OUT/log.txt; the benchmarks write their files under $OUT.
set -o pipefail
MODE=${1:-test}
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a "$LOG"
python3 -c "import jax_fa3; k = jax_fa3.kernels_available(); print(k.build_info, len(k.variants), 'variants'); print(k.segment_tiles)" 2>&1 | tee -a "$LOG" || exit 1
export XLA_FLAGS=--xla_gpu_autotune_level=0
if [ "$MODE" = test ]; then
  echo "== packed-sequence GPU tests" | tee -a "$LOG"
  timeout ${SEGMENT_TIMEOUT:-240} python3 -m pytest tests/gpu/test_segments.py -q -n ${WORKERS:-8} -p no:cacheprovider 2>&1 | tee -a "$LOG" | tail -25
  echo "== the rest of the GPU suite" | tee -a "$LOG"
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/gpu -q -n ${WORKERS:-8} -p no:cacheprovider --ignore tests/gpu/test_segments.py 2>&1 | tee -a "$LOG" | grep -v PASSED | tail -20
elif [ "$MODE" = sanitize ]; then
  # No pipe: a killed sanitizer must not leave its target holding the log open.
  echo "== compute-sanitizer memcheck on the packed cases" | tee -a "$LOG"
  timeout -s KILL ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 tools/sanitize_segments.py > "$OUT/memcheck.log" 2>&1
  echo "memcheck exit status $?" | tee -a "$LOG"
  pkill -9 -f sanitize_segments
  grep -E "ERROR SUMMARY|========= [A-Z]|NaN|done" "$OUT/memcheck.log" | tail -8 | tee -a "$LOG"
else
  unset XLA_FLAGS
  echo "== packed benchmark" | tee -a "$LOG"
  timeout ${PACKED_TIMEOUT:-360} python3 benchmarks/packed.py --out "$OUT" $PACKED_ARGS 2>&1 | tee -a "$LOG" | tail -30
  if [ -n "$BENCH_ARGS" ]; then
    echo "== unpacked sweep points" | tee -a "$LOG"
    timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench.py --out "$OUT" $BENCH_ARGS 2>&1 | tee -a "$LOG" | tail -30
  fi
fi
