# Sourced on the GPU machine, from the repo root, by the device-call scripts
# (tools/device/gpu_check.sh, multi_gpu_check.sh) and the profilers (tools/profile.sh,
# profile_source.sh): the carried wheels and extension, and the environment every run
# there uses. Elsewhere it only sets OUT (default /tmp/out) and PYTHONPATH.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Carried wheels (.whl, git-ignored) the GPU image lacks: installed into /tmp/site.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# The extension is built on the CPU machine and carried in .carry/ (git-ignored).
cp .carry/orig/_fa3_cuda*.so jax_fa3/ 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false
