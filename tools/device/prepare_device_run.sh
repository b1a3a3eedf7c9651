#!/bin/bash
# Everything a device call needs from this machine, built into git-ignored folders that the
# `run` tool carries: .carry/orig (the extension for the GPU machine's Python 3.12),
# optionally the ablation builds, and .whl (wheels the GPU image lacks, for the notebook).
# Usage: tools/device/prepare_device_run.sh [--ablation] [--notebook-wheels] [--fa3-wheel]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/work/envs/py312/bin/python}
cmake -S . -B build/device -G Ninja -DJAX_FA3_CUDA=ON -DPython_EXECUTABLE="$PYTHON" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/device --parallel 2
mkdir -p .carry/orig && cp build/device/_fa3_cuda*.so .carry/orig/
for arg in "$@"; do
  case "$arg" in
    --ablation) tools/device/build_ablation.sh ;;
    --notebook-wheels)
      # nbclient/ipykernel and their dependencies for cp312 (see examples' README section).
      python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl nbclient nbformat ipykernel ;;
    --fa3-wheel)
      # FlashAttention-3's own kernels for the side-by-side benchmark (head dim 128; einops is
      # already on the GPU image).
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl "flash-attn3-jax==0.2.3" ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done
ls -la .carry/*/
