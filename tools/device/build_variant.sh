#!/bin/bash
# A/B builds without a full rebuild: compiles the named translation units from source tree
# SRC (a worktree of a branch) with exactly the compile commands of an existing build
# (BUILD, default build/device: prepare_device_run.sh's), links them with that build's other
# objects, strips the extension and xz-compresses it to OUT, for `use_build` (device_env.sh)
# to unpack on the GPU machine. A decode or quantizer change takes under a minute; a
# forward or backward instantiation a few minutes each.
#
#   tools/device/build_variant.sh SRC OUT.so.xz TU [TU ...]
#
# TU: an instantiation name (fwd_e4m3_hdim128, decode_bf16_hdim128) or a path under cuda/
# (ffi/decode_ffi.cc, quantize/quantize.cu). A header change needs every TU that includes
# it: a change to a struct shared with the FFI handlers needs their TU too. The objects and
# ptxas's reports (-Xptxas -v is in the build's flags) stay in /tmp/variant_<name of OUT>/.
# JOBS (default 2) compiles run at once.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,15p' "$0"; exit 2; fi
SRC=$(cd "$1" && pwd); OUT=$(realpath -m "$2"); shift 2
REPO=$(cd "$(dirname "$0")/../.." && pwd)
B=$(cd "${BUILD:-$REPO/build/device}" && pwd)
tag=$(basename "$OUT" .so.xz)
D=/tmp/variant_$tag
mkdir -p "$D"
cd "$B"
target=$(ninja -t targets all | grep -o '^_fa3_cuda[^:]*\.so' | head -1)
link=$(ninja -t commands "$target" | tail -1)
pids=()
for tu in "$@"; do
  case "$tu" in
    */*) obj=$(grep -o "^build CMakeFiles/[^ ]*/cuda/$tu.o" build.ninja | head -1 | cut -d' ' -f2) ;;
    *) obj=CMakeFiles/fa3_kernels.dir/cuda/instantiations/$tu.cu.o ;;
  esac
  [ -n "$obj" ] || { echo "no object for $tu in $B/build.ninja"; exit 1; }
  name=$(basename "$tu")
  cmd=$(ninja -t commands "$obj" | tail -1)
  cmd=${cmd//$REPO\/cuda/$SRC/cuda}
  cmd=$(echo "$cmd" | sed -E "s# -MD -MT [^ ]+ -MF [^ ]+##; s# -o $obj# -o $D/$name.o#")
  (eval "$cmd" > "$D/$name.log" 2>&1 || { echo "FAILED $tu"; tail -20 "$D/$name.log"; exit 1; }) &
  pids+=($!)
  if [ ${#pids[@]} -ge "${JOBS:-2}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  link=${link//$obj/$D/$name.o}
done
for p in "${pids[@]}"; do wait "$p"; done
link=${link//-o $target/-o $D/_fa3_cuda.so}
eval "${link#: && }"
strip "$D/_fa3_cuda.so"
xz -T2 -c "$D/_fa3_cuda.so" > "$OUT"
grep -h "spill stores" "$D"/*.log | sort | uniq -c
ls -la "$OUT"
