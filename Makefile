# The README's commands. Each first sets up .venv (Python >= 3.11) and installs the package.
#   make test      the test suite (PYTEST_ARGS="-x -k lowering")
#   make bench     benchmark against jax.nn.dot_product_attention (BENCH_ARGS="--help")
#   make install   the package and an extra (EXTRAS=examples)
#   make wheel     wheels with every kernel for CPython 3.11-3.13, into dist/
# Where nvcc is found, installing builds the Hopper kernels (JAX_FA3_CUDA=OFF skips them),
# once: the build folder (build/<wheel tag>) is kept, and an install with no change
# compiles nothing. Ninja shows each file as it is compiled, "[done/total]".

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BENCH_ARGS ?=
PYTEST_ARGS ?=
EXTRAS ?=
# Requirements installed with the package, e.g. JAX_PIN="jax==0.10.2 jaxlib==0.10.2".
JAX_PIN ?=
WHEEL_PYTHONS ?= 3.11 3.12 3.13

# With an NVIDIA driver: jax's CUDA wheels (the cuda12 or cuda13 extra, after the driver's
# CUDA version). With a Hopper GPU: the GPU tests must run, a skip is a failure.
CUDA_MAJOR := $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p')
JAX_CUDA ?= $(if $(CUDA_MAJOR),$(shell [ $(CUDA_MAJOR) -ge 13 ] && echo cuda13 \
                                                                 || echo cuda12))
HOPPER := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -x 9.0)

.PHONY: bench test install wheel

# $(call install,extras): the requirements first, then the package alone, built without
# isolation against them (so the header paths, and the build folder, stay the same). The
# build's pinned jaxlib is not installed (it would hold back .venv's jax): CMake fetches its
# XLA FFI headers into the build folder, once, unless JAX_PIN installs that very jaxlib.
define install
	$(VENV)/bin/python tools/requirements.py build package $(1) $(JAX_CUDA) \
	  | $(VENV)/bin/pip install --quiet -r /dev/stdin $(JAX_PIN)
	$(VENV)/bin/pip install --no-deps --no-build-isolation --verbose . 2>&1 \
	  | sed -u "/^ *ptxas info/d; /^ *[0-9]* bytes stack frame/d"
endef

# The pytest script, not `python -m pytest`, so the installed package is tested, not ./jax_fa3.
test: | $(VENV)
	$(call install,test)
	$(if $(HOPPER),JAX_FA3_REQUIRE_GPU=1) $(VENV)/bin/pytest $(PYTEST_ARGS)

bench: | $(VENV)
	$(call install,bench)
	$(VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

install: | $(VENV)
	$(call install,$(EXTRAS))

wheel:
	tools/build_wheels.sh $(WHEEL_PYTHONS)

$(VENV):
	$(PYTHON) -m venv $(VENV)
