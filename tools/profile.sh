#!/bin/bash
# On the GPU machine: Nsight Compute on the backward kernels (one launch of each per head
# dim, cuDNN's too), without touching the card's clocks (--clock-control none).
# Writes $OUT/ncu_bwd.txt. Usage: tools/profile.sh [extra profile_kernels.py arguments]
set -o pipefail
source "$(dirname "$0")/device/device_env.sh"  # the carried extension, where there is one
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then echo "no ncu on this machine"; exit 1; fi
timeout ${PROFILE_TIMEOUT:-300} "$NCU" --clock-control none --target-processes all \
  --kernel-name regex:"bwd_kernel|fwd_kernel|bprop|fprop|flash" --launch-skip 0 --launch-count ${LAUNCHES:-12} \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section Occupancy \
  python3 tools/profile_kernels.py --cudnn "$@" > "$OUT/ncu_bwd.txt" 2>&1
echo "ncu exit $?"; grep -E "^\s+[a-zA-Z_].*\(|Duration|Tensor|Compute \(SM\) Throughput|Stall|Issued Warp|No Eligible" "$OUT/ncu_bwd.txt" | head -80
