"""Checks shared by the multi-device tests: tests/sharding/ (8 CPU devices) and
tests/gpu/test_multi_gpu.py (several GPUs).

Imported by name: pytest puts tests/ on sys.path, as it does for the folder of any
conftest.py outside a package.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo_text):
  """The kinds of collective operations in compiled HLO text (synchronous, or the start of
  an asynchronous one)."""
  return {kind for kind in COLLECTIVES if re.search(rf"\s{kind}(-start)?\(", hlo_text)}


def collective_dtypes(hlo_text, kind):
  """The element types (s32, f16, ...) of the results of the `kind` collectives in
  compiled HLO text."""
  return re.findall(rf"= \(?(\w+)\[[^\n]*\s{kind}(?:-start)?\(", hlo_text)


def assert_packed_ring(hlo_text, striped=False):
  """Packed sequences on a ring: K/V go round it (collective-permutes), and no
  floating-point array is gathered (nor, unless striped, exchanged all-to-all). XLA
  partitions the making of the rows (segments.rows sorts the ids over the whole row) with
  collectives of the integer ids, which stay: O(seqlen) bytes, not O(seqlen heads
  head_dim), and shared by every layer that takes the same ids."""
  found = collectives(hlo_text)
  assert "collective-permute" in found, found
  for kind in ("all-gather", "all-to-all"):
    types = collective_dtypes(hlo_text, kind)
    floats = {t for t in types if not t.startswith(("s", "u", "pred"))}
    if striped and kind == "all-to-all":
      assert floats, "the striped layout restripes q, k, v (and out, lse) all-to-all"
    else:
      assert not floats, (kind, types)


def collective_shapes(hlo_text, kind):
  """(element type, shape) of every array in the results of the `kind` collectives in
  compiled HLO text (an asynchronous start's result holds its operands too)."""
  shapes = []
  for result in re.findall(rf"= ([^=\n]*?)\s{kind}(?:-start)?\(", hlo_text):
    for element_type, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
      shapes.append((element_type, tuple(int(d) for d in dims.split(",") if d)))
  return shapes


def assert_all_gather(hlo_text, kv_heads, zigzag=False):
  """All-gather attention: K/V are gathered and their gradients reduce-scattered, nothing
  is exchanged all-to-all, and q (whose heads differ from the k/v heads in these tests) is
  never gathered: every floating-point array gathered has the k/v heads (v maybe a wider
  head dim: the lse's gradient), or is a packed row's int32 fields as 16-bit words
  ([..., 4, 2]). The zigzag layout moves the
  query halves by collective-permutes; the contiguous one moves no floating-point array so.
  (Making packed rows from the ids exchanges int32 ids, O(seqlen): those may stay.)"""
  found = collectives(hlo_text)
  assert {"all-gather", "reduce-scatter"} <= found, found
  floats = {kind: _float_shapes(hlo_text, kind) for kind in COLLECTIVES}
  assert not floats["all-to-all"], floats["all-to-all"]
  assert bool(floats["collective-permute"]) == zigzag, floats["collective-permute"]
  for shape in floats["all-gather"]:
    assert shape[2] == kv_heads or shape[2:] == (4, 2), shape


def _float_shapes(hlo_text, kind):
  return [
    shape
    for element_type, shape in collective_shapes(hlo_text, kind)
    if not element_type.startswith(("s", "u", "pred"))
  ]


def forward_and_vjp(attention):
  """(q, k, v, dout) -> dict of out and the gradients for cotangent dout (sharded like out,
  so that nothing needs a reduction over devices)."""

  def run(q, k, v, dout):
    out, pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback(dout)
    return dict(out=out, dq=dq, dk=dk, dv=dv)

  return run


def assert_close(actual, expected, dtype, name="", eps_factor=2):
  """|actual - expected| <= eps_factor eps(dtype) max|expected|; returns both sides of that.

  Compares on the host, so the two may live on different devices.
  """
  actual, expected = (np.asarray(x).astype(np.float32) for x in (actual, expected))
  difference = float(np.max(np.abs(actual - expected), initial=0.0))
  scale = float(np.max(np.abs(expected), initial=0.0))
  assert difference <= eps_factor * float(jnp.finfo(dtype).eps) * scale, (
    f"{name}: |sharded - unsharded| = {difference}, max |unsharded| = {scale}"
  )
  return difference, scale


class LargestDifferences:
  """(dtype, quantity) -> the largest |sharded - unsharded| seen, relative to
  max|unsharded|, for a table at the end of the run."""

  def __init__(self):
    self._largest = {}

  def record(self, case, dtype, quantity, difference, scale):
    ratio = difference / scale if scale else 0.0
    key = (jnp.dtype(dtype).name, quantity)
    if ratio >= self._largest.get(key, (0.0,))[0]:
      self._largest[key] = (ratio, difference, case)

  def write(self, terminalreporter):
    if not self._largest:
      return
    terminalreporter.section("largest |sharded - unsharded|")
    terminalreporter.write_line(
      "dtype     quantity   max|diff|  / max|unsharded|  / eps(dtype)  case"
    )
    for (dtype, quantity), (ratio, difference, case) in sorted(self._largest.items()):
      in_eps = ratio / float(jnp.finfo(dtype).eps)
      terminalreporter.write_line(
        f"{dtype:9} {quantity:10} {difference:9.3g}  {ratio:9.3g}"
        f"         {in_eps:6.2f}       {case}"
      )
