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
# The extension is built on the CPU machine and carried in .carry/ (git-ignored), as is or
# xz-compressed (27 MB -> 2.3 MB, so that several builds fit one call's carry limit).
cp .carry/orig/_fa3_cuda*.so jax_fa3/ 2>/dev/null
# use_build FILE.so.xz: unpack a carried build over the extension (A/B runs in one call).
use_build() {
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$1" jax_fa3/_fa3_cuda.cpython-312-x86_64-linux-gnu.so
}
if ls .carry/orig/_fa3_cuda*.so.xz > /dev/null 2>&1; then use_build .carry/orig/_fa3_cuda*.so.xz; fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false
