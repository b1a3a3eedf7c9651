#!/bin/bash
# A device call for attention sinks and the max logit (run from the repo root on the GPU machine).
#   tools/device/sinks_gpu_check.sh test    import check, the sinks GPU tests, then the rest of the
#                                    GPU suite (decode and multi-GPU tests have their own scripts)
#   tools/device/sinks_gpu_check.sh bench   benchmarks/sinks.py (SINKS_ARGS), then the unpacked
#                                    sweep points of benchmarks/bench.py (BENCH_ARGS), if given
# Everything goes to $OUT/log.txt; the benchmarks write their files under $OUT.
set -o pipefail
MODE=${1:-test}
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/log.txt"
export JAX_FA3_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a "$LOG"
python3 -c "import jax_fa3; k = jax_fa3.kernels_available(); print(k.build_info, len(k.variants), 'variants')" \
  2>&1 | tee -a "$LOG" || exit 1
if [ "$MODE" = test ]; then
  export XLA_FLAGS=--xla_gpu_autotune_level=0
  echo "== sinks GPU tests" | tee -a "$LOG"
  timeout -s KILL ${SINKS_TIMEOUT:-180} python3 -m pytest tests/gpu/test_sinks.py -q -n ${WORKERS:-8} \
    -p no:cacheprovider 2>&1 | tee -a "$LOG" | grep -v PASSED | tail -30
  echo "== the rest of the GPU suite" | tee -a "$LOG"
  timeout -s KILL ${TEST_TIMEOUT:-220} python3 -m pytest tests/gpu -q -n ${WORKERS:-8} -p no:cacheprovider \
    --ignore tests/gpu/test_sinks.py --ignore tests/gpu/test_decode_kernel.py --ignore tests/gpu/test_multi_gpu.py \
    2>&1 | tee -a "$LOG" | grep -v PASSED | tail -20
else
  echo "== sinks benchmark" | tee -a "$LOG"
  timeout -s KILL ${SINKS_BENCH_TIMEOUT:-300} python3 benchmarks/sinks.py --out "$OUT" $SINKS_ARGS 2>&1 \
    | tee -a "$LOG" | tail -40
  if [ -n "$BENCH_ARGS" ]; then
    echo "== unpacked sweep points" | tee -a "$LOG"
    timeout -s KILL ${BENCH_TIMEOUT:-200} python3 benchmarks/bench.py --out "$OUT" $BENCH_ARGS 2>&1 \
      | tee -a "$LOG" | tail -30
  fi
fi
