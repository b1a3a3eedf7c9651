#!/bin/bash
# The prebuilt wheel as a user without a compiler gets it, on the GPU machine: installed
# with `pip install --no-deps` into a clean folder, and the GPU tests run from a copy of
# tests/ outside the checkout, so nothing of the source tree can stand in for the wheel.
# Usage (on the GPU machine, from the repo root, carrying dist/):
#   tools/device/wheel_gpu_check.sh [dist/jax_fa3-...whl]    (default: the wheel for its python3)
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
tag=$(python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheel=$(realpath "${1:-$(ls dist/jax_fa3-*-"$tag"-"$tag"-*.whl | head -1)}")
echo "wheel: $(basename "$wheel"), $(du -h "$wheel" | cut -f1)"
scratch=$(mktemp -d)
python3 -m pip install --quiet --no-deps --no-index --target "$scratch/site" "$wheel"
cp -r tests "$scratch/tests"
cp pyproject.toml "$scratch/"  # pytest's settings; the package itself comes from the wheel
cd "$scratch"
export PYTHONPATH="$scratch/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_FA3_REQUIRE_GPU=1  # no Hopper GPU seen: an error, not 171 skips
python3 -P - <<'PY' 2>&1 | tee "$OUT/wheel_import.log"
import os, jax, jax_fa3
print("jax", jax.__version__, jax.devices())
print("jax_fa3 from", jax_fa3.__file__)
status = jax_fa3.kernels_available()
print(status)
assert jax_fa3.__file__.startswith(os.environ["PYTHONPATH"]), "not the wheel's jax_fa3"
assert status and "will not run" not in str(status), "the wheel's kernels do not run here"
PY
# Tests compile one small XLA graph per shape: skip GEMM autotuning, use several workers.
XLA_FLAGS=--xla_gpu_autotune_level=0 timeout "${TEST_TIMEOUT:-400}" \
  python3 -P -m pytest tests/gpu -q -n "${WORKERS:-8}" -p no:cacheprovider --durations=5 2>&1 \
  | tee "$OUT/wheel_tests.log" | grep -v PASSED | tail -30
