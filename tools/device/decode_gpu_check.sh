#!/bin/bash
# The device call for KV-cache decode (issue 16), run from the repo root on the GPU machine
# with the extension carried in .carry/orig (tools/device/prepare_device_run.sh):
#   1. import check: the decode variants are in the extension;
#   2. the decode GPU tests (tests/gpu/test_decode_kernel.py, test_decode_transforms.py);
#   3. compute-sanitizer memcheck of out-of-range lengths and pages (tools/sanitize_decode.py);
#   4. the decode benchmark (benchmarks/decode.py, DECODE_ARGS), files under $OUT and copied to
#      benchmarks/results/2026-11-30_nvidia-h200/.
# Each step prints "STEP <name>: OK" or "STEP <name>: FAILED (...)"; a failed step does not
# stop the later ones (except the import check). Everything goes to $OUT/log.txt.
# Steps can be chosen: tools/device/decode_gpu_check.sh [import] [test] [sanitize] [bench]
set -o pipefail
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/log.txt"
STEPS=${*:-import test sanitize bench}
RESULTS=benchmarks/results/2026-11-30_nvidia-h200
status=0
report() {  # report <step> <exit status> [what it means]
  if [ "$2" = 0 ]; then
    echo "STEP $1: OK" | tee -a "$LOG"
  else
    echo "STEP $1: FAILED (exit status $2${3:+; $3})" | tee -a "$LOG"
    status=1
  fi
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"

python3 -c "
import jax_fa3
k = jax_fa3.kernels_available()
print(k.build_info, len(k.variants), 'variants;', 'decode:', sorted(k.decode_shapes.items()))
assert k.decode_shapes, 'the extension has no decode variants'
" 2>&1 | tee -a "$LOG"
report import $? "the extension does not load or lacks decode: rebuild .carry/orig"
[ $status = 0 ] || exit 1

export XLA_FLAGS=--xla_gpu_autotune_level=0
for step in $STEPS; do
  case $step in
    import) ;;
    test)
      echo "== decode GPU tests" | tee -a "$LOG"
      timeout -s KILL ${TEST_TIMEOUT:-240} python3 -m pytest tests/gpu/test_decode_kernel.py tests/gpu/test_decode_transforms.py -q -x -n ${WORKERS:-4} \
        -p no:cacheprovider 2>&1 | tee -a "$LOG" | grep -v PASSED | tail -30
      report test $? "124/137 = timed out" ;;
    sanitize)
      # No pipe: a killed sanitizer must not leave a reader of its output behind. timeout
      # signals the whole process group, the python target included.
      echo "== compute-sanitizer memcheck, out-of-range lengths and pages" | tee -a "$LOG"
      timeout -s KILL ${SANITIZE_TIMEOUT:-150} compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 tools/sanitize_decode.py > "$OUT/memcheck.log" 2>&1
      code=$?
      grep -E "ERROR SUMMARY|========= [A-Z]|NaN per|done" "$OUT/memcheck.log" | tail -12 | tee -a "$LOG"
      report sanitize $code "3 = memcheck errors, 1 = wrong NaN pattern, 137 = timed out" ;;
    bench)
      unset XLA_FLAGS
      echo "== decode benchmark" | tee -a "$LOG"
      timeout -s KILL ${BENCH_TIMEOUT:-270} python3 benchmarks/decode.py --out "$OUT" $DECODE_ARGS 2>&1 \
        | tee -a "$LOG" | tail -40
      code=$?
      mkdir -p "$RESULTS" && cp "$OUT"/decode.json "$OUT"/decode.md "$RESULTS"/ 2>/dev/null
      report bench $code "137 = timed out; the records so far are in $OUT/decode.json" ;;
    *) echo "unknown step $step (import, test, sanitize, bench)" | tee -a "$LOG"; status=1 ;;
  esac
done
echo "decode_gpu_check: $([ $status = 0 ] && echo all steps OK || echo SOME STEPS FAILED)" | tee -a "$LOG"
exit $status
