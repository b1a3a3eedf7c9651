"""Sharded attention on 8 CPU devices, against the same computation on one device.

XLA makes 8 CPU devices only if told before JAX creates its CPU backend, and the flag
would hold for the whole run. So tests/test_sharding.py runs this folder in a subprocess
with the flag and JAX_FA3_EIGHT_CPU_DEVICES=1, and any other run leaves it uncollected.
"""

import collections
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

if os.environ.get("JAX_FA3_EIGHT_CPU_DEVICES") != "1":
  collect_ignore_glob = ["test_*.py"]

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")

# (dtype, quantity) -> the largest |sharded - unsharded| seen, relative to max|unsharded|.
_largest_differences = collections.defaultdict(lambda: (0.0, 0.0, ""))


@pytest.fixture(scope="session", autouse=True)
def eight_cpu_devices():
  assert len(jax.devices("cpu")) == 8, "run by tests/test_sharding.py with 8 CPU devices"


@pytest.fixture
def make_mesh():
  """`make_mesh(shape, names, explicit=False)`: CPU devices with Auto (or Explicit) axes."""
  def make(shape, names, explicit=False):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names),
                         devices=jax.devices("cpu")[:int(np.prod(shape))])
  return make


@pytest.fixture
def collectives():
  """`collectives(hlo_text)`: the kinds of collective operations in compiled HLO text."""
  return lambda hlo_text: {kind for kind in COLLECTIVES
                           if re.search(rf"\s{kind}(-start)?\(", hlo_text)}


@pytest.fixture
def forward_and_vjp():
  """`forward_and_vjp(attention)`: (q, k, v, dout) -> dict of out and the gradients for
  cotangent dout (sharded like out, so that nothing needs a reduction over devices)."""
  def wrap(attention):
    def run(q, k, v, dout):
      out, pullback = jax.vjp(attention, q, k, v)
      dq, dk, dv = pullback(dout)
      return dict(out=out, dq=dq, dk=dk, dv=dv)
    return run
  return wrap


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
      _record(request.node.name, jnp.dtype(arrays[0].dtype).name, name, difference, scale)
    return actual, compiled.as_text()

  return run


def assert_close(actual, expected, dtype, name=""):
  """|actual - expected| <= 2 eps(dtype) max|expected|; returns both sides of that."""
  difference = float(jnp.max(jnp.abs(jnp.asarray(actual, jnp.float32)
                                     - jnp.asarray(expected, jnp.float32))))
  scale = float(jnp.max(jnp.abs(jnp.asarray(expected, jnp.float32))))
  assert difference <= 2 * float(jnp.finfo(dtype).eps) * scale, (
      f"{name}: |sharded - unsharded| = {difference}, max |unsharded| = {scale}")
  return difference, scale


def _record(case, dtype, quantity, difference, scale):
  ratio = difference / scale if scale else 0.0
  if ratio >= _largest_differences[(dtype, quantity)][0]:
    _largest_differences[(dtype, quantity)] = (ratio, difference, case)


def pytest_terminal_summary(terminalreporter):
  if not _largest_differences:
    return
  terminalreporter.section("largest |sharded - unsharded|")
  terminalreporter.write_line("dtype     quantity   max|diff|  / max|unsharded|  case")
  for (dtype, quantity), (ratio, difference, case) in sorted(_largest_differences.items()):
    terminalreporter.write_line(
        f"{dtype:9} {quantity:10} {difference:9.3g}  {ratio:9.3g}         {case}")
