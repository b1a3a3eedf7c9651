"""Shared fixtures. The CPU tests run the float32 reference path even where a GPU exists."""

import collections
import importlib.util
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# STAND-IN until helper B's jax_fa3/fp8_quantize.py is merged (issue 15): the contract's
# quantizer from tests/fp8_quantize_standin.py. DELETE with that file at the merge.
def _install_quantizer_stand_in():
  try:
    if importlib.util.find_spec("jax_fa3.fp8_quantize") is not None:
      return
  except ModuleNotFoundError:  # no jax_fa3 to import here (python -P without an install)
    return
  import fp8_quantize_standin  # pylint: disable=import-outside-toplevel
  sys.modules["jax_fa3.fp8_quantize"] = fp8_quantize_standin


_install_quantizer_stand_in()

# (dtype, quantity) -> the worst (error / (eps * max|oracle|), error, test id) seen.
_worst_errors = collections.defaultdict(lambda: (0.0, 0.0, ""))


@pytest.fixture
def on_cpu():
  """Runs the test on the CPU backend (the reference path); use via pytestmark."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


@pytest.fixture
def normal(request):
  """Draws fresh standard-normal arrays, seeded by the test's id."""
  rng = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))

  def draw(shape, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return draw


@pytest.fixture
def record_error(request):
  """Notes an error against the oracle for the end-of-run summary."""
  def record(dtype, quantity, error, oracle_max):
    eps = float(jnp.finfo(dtype).eps)
    ratio = error / (eps * oracle_max) if oracle_max else 0.0
    key = (jnp.dtype(dtype).name, quantity)
    if ratio >= _worst_errors[key][0]:
      _worst_errors[key] = (ratio, error, request.node.name)

  return record


def pytest_terminal_summary(terminalreporter):
  if not _worst_errors:
    return
  terminalreporter.section("max error against the float64 oracle")
  terminalreporter.write_line("dtype     quantity  max|err|   in eps*max|oracle|  case")
  for (dtype, quantity), (ratio, error, case) in sorted(_worst_errors.items()):
    terminalreporter.write_line(f"{dtype:9} {quantity:9} {error:9.3g}  {ratio:8.3f}            {case}")
