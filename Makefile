# The README's two quick-start commands; each first sets up .venv (Python >= 3.11).
#   make bench   benchmark against jax.nn.dot_product_attention (BENCH_ARGS="--help")
#   make test    the test suite (PYTEST_ARGS="-x -k lowering")
# Where nvcc is found, `pip install .` also builds the Hopper kernels; JAX_FA3_CUDA=OFF skips them.

PYTHON ?= python3
VENV ?= .venv
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: bench test

bench: | $(VENV)
	$(VENV)/bin/pip install --quiet ".[bench]"
	$(VENV)/bin/python benchmarks/bench.py $(BENCH_ARGS)

# The pytest script, not `python -m pytest`, so the installed package is tested, not ./jax_fa3.
test: | $(VENV)
	$(VENV)/bin/pip install --quiet ".[test]"
	$(VENV)/bin/pytest $(PYTEST_ARGS)

$(VENV):
	$(PYTHON) -m venv $(VENV)
