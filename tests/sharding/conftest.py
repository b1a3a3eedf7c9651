"""Sharded attention on 8 CPU devices, against the same computation on one device.

XLA makes 8 CPU devices only if told before JAX creates its CPU backend, and the flag
would hold for the whole run. So tests/test_sharding.py runs this folder in a subprocess
with the flag and JAX_FA3_EIGHT_CPU_DEVICES=1, and any other run leaves it uncollected.
The checks themselves are tests/sharding_checks.py's, shared with tests/gpu/test_multi_gpu.py.
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import sharding_checks
from sharding_checks import assert_close

if os.environ.get("JAX_FA3_EIGHT_CPU_DEVICES") != "1":
  collect_ignore_glob = ["test_*.py"]

_largest_differences = sharding_checks.LargestDifferences()


@pytest.fixture(scope="session", autouse=True)
def eight_cpu_devices():
  assert len(jax.devices("cpu")) == 8, "run by tests/test_sharding.py with 8 CPU devices"


@pytest.fixture
def make_mesh():
  """`make_mesh(shape, names, explicit=False)`: CPU devices with Auto (or Explicit) axes."""

  def make(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(
      shape,
      names,
      axis_types=(kind,) * len(names),
      devices=jax.devices("cpu")[: int(np.prod(shape))],
    )

  return make


@pytest.fixture
def collectives():
  """`collectives(hlo_text)`: the kinds of collective operations in compiled HLO text."""
  return sharding_checks.collectives


@pytest.fixture
def forward_and_vjp():
  """`forward_and_vjp(attention)`: (q, k, v, dout) -> dict of out and the gradients for
  cotangent dout (sharded like out, so that nothing needs a reduction over devices)."""
  return sharding_checks.forward_and_vjp


@pytest.fixture(name="assert_close")
def assert_close_fixture():
  """`assert_close(actual, expected, dtype)`: within 2 eps(dtype) of max|expected|."""
  return assert_close


@pytest.fixture
def compare(request):
  """`compare(fn, arrays, specs, mesh)`: jit(fn), where fn returns a dict of arrays, on the
  arrays sharded as `specs` over `mesh` equals jit(fn) on one device, within 2 eps of the
  largest value (eps of the inputs' dtype). Returns the sharded results and the compiled
  HLO text."""

  def run(fn, arrays, specs, mesh):
    with jax.default_device(jax.devices("cpu")[0]):
      expected = jax.jit(fn)(*arrays)
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(arrays, specs)]
    compiled = jax.jit(fn).lower(*sharded).compile()
    actual = compiled(*sharded)
    for name, e in expected.items():
      assert actual[name].shape == e.shape and actual[name].dtype == e.dtype, name
      difference, scale = assert_close(actual[name], e, arrays[0].dtype, name)
      _largest_differences.record(request.node.name, arrays[0].dtype, name, difference, scale)
    return actual, compiled.as_text()

  return run


def pytest_terminal_summary(terminalreporter):
  _largest_differences.write(terminalreporter)
