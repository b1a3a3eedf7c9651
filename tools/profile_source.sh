#!/bin/bash
# On the GPU machine: where the backward kernel's warps stall, per SASS instruction
# (Nsight Compute's PC sampling, clocks untouched). One launch per head dim given.
# Writes $OUT/stalls_d<D>.csv (source page) for tools/stall_report.py to read here.
# Usage: [SEQLEN=8192] [KERNEL=bwd_kernel] tools/profile_source.sh [head dims...]   (default: 128)
set -o pipefail
source "$(dirname "$0")/device/device_env.sh"  # the carried extension, where there is one
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu on this machine"; exit 1; fi
for d in ${@:-128}; do
  timeout ${PROFILE_TIMEOUT:-150} "$NCU" --clock-control none --target-processes all --kernel-name regex:${KERNEL:-bwd_kernel} \
    --launch-count 1 --section SourceCounters --section WarpStateStats --section SpeedOfLight -f -o /tmp/stalls_d$d \
    python3 tools/profile_kernels.py --head-dims $d --seqlen ${SEQLEN:-8192} > "$OUT/ncu_source_d$d.log" 2>&1
  "$NCU" -i /tmp/stalls_d$d.ncu-rep --page source --csv --print-source sass > "$OUT/stalls_d$d.csv" 2>> "$OUT/ncu_source_d$d.log" \
    || "$NCU" -i /tmp/stalls_d$d.ncu-rep --page source --csv > "$OUT/stalls_d$d.csv" 2>> "$OUT/ncu_source_d$d.log"
  "$NCU" -i /tmp/stalls_d$d.ncu-rep --page details >> "$OUT/ncu_source_d$d.log" 2>&1
  echo "d$d: $(wc -c < "$OUT/stalls_d$d.csv") bytes of source page"; head -c 600 "$OUT/stalls_d$d.csv"; echo
done
