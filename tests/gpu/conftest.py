"""GPU tests: they run only where JAX sees a Hopper GPU and skip cleanly elsewhere.

JAX_FA3_REQUIRE_GPU=1 makes that skip an error instead (the device scripts, and
`make test` on a Hopper machine, set it): a GPU run that tests nothing fails.
"""

import os

import pytest

# Every kernel launch first fills its outputs with NaN, so an element a kernel fails to
# write shows up as NaN in the comparison (read by the FFI handler at its first call).
# Forced: an inherited JAX_FA3_DEBUG_POISON=0 must not turn it off unnoticed.
if os.environ.get("JAX_FA3_DEBUG_POISON", "1") != "1":
  print(
    f"tests/gpu: JAX_FA3_DEBUG_POISON={os.environ['JAX_FA3_DEBUG_POISON']!r} overridden "
    "with 1: the GPU tests always poison kernel outputs"
  )
os.environ["JAX_FA3_DEBUG_POISON"] = "1"

import sharding_checks  # pylint: disable=wrong-import-position

# test_multi_gpu.py's sharded-vs-unsharded differences, tabled at the end of the run.
_largest_differences = sharding_checks.LargestDifferences()


def _has_hopper_gpu() -> bool:
  import jax

  try:
    return any(getattr(d, "compute_capability", None) == "9.0" for d in jax.devices("cuda"))
  except RuntimeError:  # no CUDA backend
    return False


def pytest_collection_modifyitems(config, items):
  if _has_hopper_gpu():
    return
  here = os.path.dirname(__file__)
  if os.environ.get("JAX_FA3_REQUIRE_GPU") == "1" and any(
    str(item.fspath).startswith(here) for item in items
  ):
    import jax

    raise pytest.UsageError(
      f"JAX_FA3_REQUIRE_GPU=1, but JAX sees no Hopper GPU (its devices: {jax.devices()}): "
      "the GPU tests would all skip. Is jax installed with its CUDA wheels "
      "(pip install 'jax[cuda13]')?"
    )
  skip = pytest.mark.skip(reason="needs a Hopper GPU")
  for item in items:
    # A module that counts its devices itself (test_multi_gpu.py) skips by that count.
    own_check = getattr(getattr(item, "module", None), "CHECKS_ITS_OWN_DEVICES", False)
    if str(item.fspath).startswith(here) and not own_check:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def largest_differences():
  """A sharding_checks.LargestDifferences, written in the terminal summary."""
  return _largest_differences


def pytest_terminal_summary(terminalreporter):
  _largest_differences.write(terminalreporter)
