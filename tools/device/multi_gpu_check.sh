#!/bin/bash
# One device call on a machine with several GPUs (nvidia-h100-x2; 4 or 8 work too): the
# multi-GPU tests (sharded against unsharded, forward and backward), then the scaling
# benchmark on all visible GPUs (issue 7).
# Usage (on the GPU machine, from the repo root, carrying .carry and, if any, .whl):
#   tools/device/multi_gpu_check.sh
# Writes to $OUT: gpu.txt, topology.txt, import.log, multi_gpu_tests.log, scaling.log and
# scaling/scaling.{json,md,png} (the json and md rewritten after every point).
# Knobs: TEST_TIMEOUT (200 s), BENCH_TIMEOUT (300 s), SEQLENS ("8192 32768 131072"),
# ITERATIONS (10), SWEEPS ("batch heads packed layout ring": the quick ones first).
set -o pipefail
source "$(dirname "$0")/device_env.sh"
# A GPU test run that finds no Hopper GPU fails instead of skipping everything.
export JAX_FA3_REQUIRE_GPU=1
# NVLink multicast stays off (a program that uses it can put the host's shared GPUs out of
# service): in NCCL, which XLA's collectives use, and in NVSHMEM and PyTorch for good measure.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m 2>&1 | tee "$OUT/topology.txt"
python3 -c "
import sys, jax, jax_fa3
gpus = jax.devices('gpu')
print('jax', jax.__version__, gpus)
print(jax_fa3.kernels_available())
sys.exit(0 if len(gpus) >= 2 and jax_fa3.kernels_available() else 'needs 2 or more GPUs and the kernels')
" 2>&1 | tee "$OUT/import.log" || exit 1
# The tests compile one small XLA graph per case: skip GEMM autotuning.
env XLA_FLAGS=--xla_gpu_autotune_level=0 timeout ${TEST_TIMEOUT:-200} \
  python3 -m pytest tests/gpu/test_multi_gpu.py tests/gpu/test_multi_gpu_decode.py -v -rs -p no:cacheprovider --durations=8 2>&1 \
  | tee "$OUT/multi_gpu_tests.log" | tail -50
echo "tests: exit ${PIPESTATUS[0]} (124: timed out)"
# The benchmark runs whatever the tests said: its timings stand apart from their verdict.
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/scaling.py --sweeps ${SWEEPS:-batch heads packed layout ring} \
  --seqlens ${SEQLENS:-8192 32768 131072} --iterations ${ITERATIONS:-10} --out "$OUT/scaling" 2>&1 \
  | tee "$OUT/scaling.log" | grep -v "^\[" | tail -70
echo "scaling: exit ${PIPESTATUS[0]} (124: timed out; scaling.json holds the points measured)"
