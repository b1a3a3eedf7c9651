"""GPU tests: they run only where JAX sees a CUDA device and skip cleanly elsewhere."""

import os

import pytest

# Every kernel launch first fills its outputs with NaN, so an element a kernel fails to
# write shows up as NaN in the comparison (read by the FFI handler at its first call).
os.environ.setdefault("JAX_FA3_DEBUG_POISON", "1")
# The GPU tests exercise the backward kernels, which are opt-in until verified.
os.environ.setdefault("JAX_FA3_BWD_KERNELS", "1")


def _has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
