"""flash_attention_with_kvcache sharded over several GPUs (P >= 2, at most 8), through the
decode kernel, against the float64 oracle (decode_checks: test_decode_kernel.py's
tolerances, the returned caches entry by entry): a contiguous cache split over the batch or
the heads and a paged pool over its heads run with no communication; q split over the batch
of a paged pool is gathered. The results keep the inputs' shardings.

Like test_multi_gpu.py (whose devices and meshes these are), the tests skip, with the
reason, where fewer than 2 devices are visible, and JAX_FA3_MULTI_DEVICE_PLATFORM=cpu runs
them on CPU devices (the float32 reference path, no kernel):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
      JAX_FA3_MULTI_DEVICE_PLATFORM=cpu python -m pytest tests/gpu/test_multi_gpu_decode.py
"""

import zlib

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from decode_checks import (
  assert_matches_the_oracle,
  assert_sharded_as,
  calls_the_kernel,
  decode_inputs,
  run_sharded,
)
from sharding_checks import collectives
from test_multi_gpu import NUM, ON_GPU, PLATFORM, mesh_of

# tests/gpu/conftest.py leaves the skipping of this module to the module: by device count.
CHECKS_ITS_OWN_DEVICES = True
pytestmark = pytest.mark.skipif(
  NUM < 2, reason=f"needs 2 or more {PLATFORM.upper()} devices; {NUM} visible"
)


def _sharded(request, specs, explicit, **inputs):
  """The sharded call on inputs drawn for the test: (arrays, results, HLO text, mesh)."""
  mesh = mesh_of((NUM,), ("x",), explicit)
  rng = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
  arrays = decode_inputs(rng, **inputs)
  results, hlo = run_sharded(arrays, specs, mesh)
  assert calls_the_kernel(hlo) == ON_GPU
  assert not assert_matches_the_oracle(arrays, results).any()
  return results, hlo, mesh


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_contiguous_split_over_the_batch(explicit, request):
  """2 sequences a device, GQA 4:1, two query rows and two new tokens each."""
  batch = P("x")
  results, hlo, mesh = _sharded(
    request,
    [batch] * 3 + [batch] * 3 + [None],
    explicit,
    batch=2 * NUM,
    heads=8,
    kv_heads=2,
    seqlen_q=2,
    seqlen_new=2,
  )
  assert collectives(hlo) == set()
  assert_sharded_as(results, mesh, (batch, batch, batch, batch))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_contiguous_split_over_the_heads(explicit, request):
  """4 query heads and their k/v head a device; lengths replicated."""
  heads = P(None, None, "x")
  specs = [heads, heads, heads, P(), heads, heads, None]
  results, hlo, mesh = _sharded(
    request, specs, explicit, batch=3, heads=4 * NUM, kv_heads=NUM, seqlen_new=1
  )
  assert collectives(hlo) == set()
  assert_sharded_as(results, mesh, (heads, P(None, "x", None), heads, heads))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_paged_split_over_the_heads(explicit, request):
  """A paged pool split over its k/v heads, the page table and lengths replicated."""
  heads = P(None, None, "x")
  specs = [heads, heads, heads, P(), heads, heads, P()]
  results, hlo, mesh = _sharded(
    request,
    specs,
    explicit,
    batch=3,
    heads=4 * NUM,
    kv_heads=NUM,
    capacity=1024,
    seqlen_new=3,
    page_size=64,
  )
  assert collectives(hlo) == set()
  assert_sharded_as(results, mesh, (heads, P(None, "x", None), heads, heads))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_paged_with_q_split_over_the_batch_is_gathered(explicit, request):
  """q, the new tokens, lengths and page table split over the batch, the pool replicated:
  the pool cannot follow the batch, so they are gathered and every device writes the same
  rows into its copy of the pool."""
  batch = P("x")
  specs = [batch, P(), P(), batch, batch, batch, batch]
  results, hlo, mesh = _sharded(
    request,
    specs,
    explicit,
    batch=2 * NUM,
    heads=8,
    kv_heads=2,
    capacity=512,
    seqlen_new=1,
    page_size=16,
  )
  assert "all-gather" in collectives(hlo)
  assert_sharded_as(results[2:], mesh, (P(), P()))
