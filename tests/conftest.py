"""Shared fixtures. The CPU tests run the float32 reference path even where a GPU exists."""

import collections
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    terminalreporter.write_line(
      f"{dtype:9} {quantity:9} {error:9.3g}  {ratio:8.3f}            {case}"
    )
