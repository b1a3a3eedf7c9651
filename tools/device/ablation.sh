#!/bin/bash
# On the GPU machine: the paper's Table 2 setting (batch 4, seqlen 8448, 16 heads, head dim
# 128, non-causal) for each extension built by tools/device/build_ablation.sh.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
for name in full no_pingpong no_intra_wg_overlap; do
  echo "== $name"
  JAX_FA3_EXT_DIR=.carry/$name python3 tools/kernel_bench.py --head-dims 128 --seqlens 8448 --causal 0 \
    --batch 4 --impls jax_fa3 --json "${OUT:-/tmp}/ablation_$name.json" 2>&1 | grep -E "^jax_fa3|Error"
done
