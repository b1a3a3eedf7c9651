#!/bin/bash
# Builds the forward ablation extensions (bf16, head dim 128) for the paper's Table 2 into
# .carry/<name>/ (git-ignored, carried to the GPU machine): the real kernel, no pingpong,
# no intra-warpgroup overlap. Python 3.12 headers: the GPU machine's interpreter.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/work/envs/py312/bin/python}
for ablation in "" no_pingpong no_intra_wg_overlap; do
  name=${ablation:-full}
  build=build/ablation_$name
  cmake -S . -B "$build" -G Ninja -DJAX_FA3_CUDA=ON -DPython_EXECUTABLE="$PYTHON" \
    -DJAX_FA3_VARIANTS=bf16_hdim128 -DJAX_FA3_FWD_ABLATION="$ablation" > /dev/null
  cmake --build "$build" --parallel 2
  mkdir -p ".carry/$name" && cp "$build"/_fa3_cuda*.so ".carry/$name/"
done
