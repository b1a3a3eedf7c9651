"""jax_fa3.dot_product_attention against jax.nn.dot_product_attention(implementation="xla")."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3

pytestmark = pytest.mark.usefixtures("on_cpu")


@dataclasses.dataclass(frozen=True)
class Case:
  query: tuple[int, ...]  # BTNH or TNH
  key: tuple[int, ...]
  is_causal: bool = False
  local_window_size: int | tuple[int, int] | None = None
  query_seq_lengths: tuple[int, ...] | None = None
  key_value_seq_lengths: tuple[int, ...] | None = None
  scale: float | None = None
  dtype: str = "bfloat16"

  def __str__(self):
    return "-".join(
      f"{f.name}={getattr(self, f.name)}".replace(" ", "")
      for f in dataclasses.fields(self)
      if getattr(self, f.name) is not None
    )


F16 = "float16"
CASES = [
  Case((2, 7, 4, 64), (2, 113, 2, 64), is_causal=True),  # T < S, top-left
  Case((2, 113, 4, 64), (2, 7, 2, 64), is_causal=True, dtype=F16),  # T > S
  Case(
    (2, 113, 4, 64), (2, 113, 4, 64), query_seq_lengths=(50, 113), key_value_seq_lengths=(113, 30)
  ),
  Case(
    (3, 40, 8, 32),
    (3, 60, 2, 32),
    is_causal=True,
    query_seq_lengths=(0, 17, 40),
    key_value_seq_lengths=(60, 0, 25),
    dtype=F16,
  ),  # rows that see nothing
  Case((2, 113, 4, 64), (2, 7, 4, 64), local_window_size=3),  # T > S: empty rows
  Case((2, 50, 4, 64), (2, 50, 4, 64), is_causal=True, local_window_size=(5, 2), dtype=F16),
  Case((2, 50, 8, 64), (2, 80, 1, 64), local_window_size=(0, 7)),
  Case(
    (7, 4, 32),
    (9, 2, 32),
    is_causal=True,
    query_seq_lengths=(5,),
    key_value_seq_lengths=(6,),
    dtype=F16,
  ),  # TNH
  Case((2, 1, 8, 128), (2, 1000, 1, 128), is_causal=True, key_value_seq_lengths=(500, 1000)),
  Case((2, 33, 4, 80), (2, 33, 4, 80), scale=0.3, query_seq_lengths=(200, -3), dtype=F16),
  Case((1, 113, 2, 256), (1, 113, 2, 256), local_window_size=(10, 0), key_value_seq_lengths=(90,)),
]


def _arrays(case, normal):
  dtype = jnp.dtype(case.dtype)
  q, k, v = normal(case.query, dtype), normal(case.key, dtype), normal(case.key, dtype)
  dout = normal(case.query, dtype)
  lengths = {
    name: None if getattr(case, name) is None else jnp.array(getattr(case, name), jnp.int32)
    for name in ("query_seq_lengths", "key_value_seq_lengths")
  }
  return q, k, v, dout, lengths


def _run(fn, case, q, k, v, dout, lengths, **kwargs):
  """Output, residual and gradients of `fn` with `case`'s options."""

  def attention(q, k, v):
    return fn(
      q,
      k,
      v,
      scale=case.scale,
      is_causal=case.is_causal,
      local_window_size=case.local_window_size,
      return_residual=True,
      **lengths,
      **kwargs,
    )

  (out, residual), pullback = jax.vjp(attention, q, k, v)
  return (out, residual, *pullback((dout, jnp.zeros_like(residual))))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_jax_nn(case, normal):
  """Equal to jax.nn's XLA path computed in float32 on the same inputs, to one rounding of
  the result (two for gradients: rows that see nothing add theirs to the kernel's, rounded):
  outputs, residual and gradients, masked and padded rows included."""
  q, k, v, dout, lengths = _arrays(case, normal)
  ours = _run(jax_fa3.dot_product_attention, case, q, k, v, dout, lengths)
  upcast = [x.astype(jnp.float32) for x in (q, k, v, dout)]
  truth = _run(jax.nn.dot_product_attention, case, *upcast, lengths, implementation="xla")
  eps = float(jnp.finfo(case.dtype).eps)
  for name, actual, want in zip(("out", "residual", "dq", "dk", "dv"), ours, truth):
    assert actual.dtype == case.dtype and actual.shape == want.shape, name
    actual, want = np.asarray(actual, np.float64), np.asarray(want.astype(case.dtype), np.float64)
    masked = ~(np.abs(want) < 1e30)  # jax.nn's lse of a row that sees nothing, rounded
    np.testing.assert_array_equal(actual[masked], want[masked], err_msg=name)
    error = np.abs(actual[~masked] - want[~masked]).max(initial=0.0)
    ulps = 1 if name in ("out", "residual") else 2
    assert error <= ulps * eps * np.abs(want[~masked]).max(initial=0.0) + 1e-5, f"{name}: {error}"


def test_same_dtype_as_jax_nn_within_its_own_error(normal):
  """Against jax.nn in bfloat16, the difference is within jax.nn's own rounding error."""
  q, k, v = normal((2, 64, 4, 64)), normal((2, 96, 2, 64)), normal((2, 96, 2, 64))
  kwargs = dict(is_causal=True, key_value_seq_lengths=jnp.array([96, 40], jnp.int32))
  ours = jax_fa3.dot_product_attention(q, k, v, **kwargs)
  base = jax.nn.dot_product_attention(q, k, v, **kwargs, implementation="xla")
  truth = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kwargs)
  error = lambda x: float(jnp.max(jnp.abs(x.astype(jnp.float32) - truth)))
  assert error(ours) <= 2 * error(base) + 1e-5


@pytest.mark.parametrize(
  "unsupported", ["bias", "mask", "float32", "head_dim", "negative_window", "traced_scale"]
)
def test_falls_back_to_jax_nn(unsupported, normal):
  """implementation=None hands what fa3 does not support to jax.nn, with identical results;
  implementation="fa3" refuses it, naming the argument."""
  dtype = jnp.float32 if unsupported == "float32" else jnp.bfloat16
  head_dim = 288 if unsupported == "head_dim" else 32
  q, k, v = (normal((2, 16, 4, head_dim), dtype) for _ in range(3))
  kwargs, scale = {}, None
  if unsupported == "bias":
    kwargs["bias"] = normal((1, 4, 16, 16), dtype)
  if unsupported == "mask":
    kwargs["mask"] = jnp.tril(jnp.ones((16, 16), bool))[None, None]
  if unsupported == "negative_window":
    kwargs["local_window_size"] = (-1, 3)
  if unsupported == "traced_scale":
    scale = jnp.float32(0.25)
  call = lambda f, scale, **extra: f(q, k, v, scale=scale, **kwargs, **extra)
  ours = jax.jit(lambda s: call(jax_fa3.dot_product_attention, s))(scale)
  expected = jax.jit(lambda s: call(jax.nn.dot_product_attention, s))(scale)
  np.testing.assert_array_equal(ours, expected)
  name = {
    "float32": "float32",
    "head_dim": "head dim",
    "negative_window": "local_window_size",
    "traced_scale": "scale",
  }.get(unsupported, unsupported)
  with pytest.raises((ValueError, TypeError), match=name):
    jax.jit(lambda s: call(jax_fa3.dot_product_attention, s, implementation="fa3"))(scale)


FA3_ONLY_REFUSES = {
  # name: (query, key shapes, keyword arguments); each valid for jax.nn.
  "negative_scale": ((2, 16, 4, 32), (2, 16, 2, 32), dict(scale=-0.5)),
  "scale_above_1e4": ((2, 16, 4, 32), (2, 16, 2, 32), dict(scale=2e4)),
  "scale_below_1e-30": (
    (2, 16, 4, 32),
    (2, 16, 2, 32),
    dict(scale=1e-35),
  ),  # 0 in the kernels' float32
  "mixed_ranks": ((16, 4, 32), (1, 16, 2, 32), {}),  # rank 3 and a batch of 1
  "mask_2d": ((2, 16, 4, 32), (2, 16, 2, 32), dict(mask=np.tri(16, dtype=bool))),
  "empty_query_seq": ((2, 0, 4, 32), (2, 16, 2, 32), {}),
  "empty_key_seq": ((2, 16, 4, 32), (2, 0, 2, 32), dict(is_causal=True)),
  "empty_head_dim": ((2, 16, 4, 0), (2, 16, 2, 0), dict(scale=1.0)),
}


@pytest.mark.parametrize("name", FA3_ONLY_REFUSES)
def test_what_only_fa3_refuses_runs_on_jax_nn(name, normal):
  """implementation=None keeps jax.nn's result, residual included, for what jax.nn takes
  and the kernels do not (empty arrays give jax.nn's empty or all-zero result)."""
  query, key, kwargs = FA3_ONLY_REFUSES[name]
  q, k, v = normal(query), normal(key), normal(key)
  ours = jax_fa3.dot_product_attention(q, k, v, return_residual=True, **kwargs)
  expected = jax.nn.dot_product_attention(q, k, v, return_residual=True, **kwargs)
  for a, b in zip(ours, expected):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="implementation='fa3'"):
    jax_fa3.dot_product_attention(q, k, v, implementation="fa3", **kwargs)


def test_traced_window_runs_on_jax_nn(normal):
  """A traced local_window_size is valid for jax.nn (its mask is computed), not a kernel
  attribute: implementation=None hands it to jax.nn."""
  q, k, v = normal((2, 16, 4, 32)), normal((2, 16, 2, 32)), normal((2, 16, 2, 32))
  call = lambda f, w: f(q, k, v, local_window_size=(w, 2))
  ours = jax.jit(lambda w: call(jax_fa3.dot_product_attention, w))(3)
  np.testing.assert_array_equal(ours, jax.jit(lambda w: call(jax.nn.dot_product_attention, w))(3))


def test_implementation_fa3_runs_our_primitive(normal):
  q = normal((2, 16, 4, 32))
  jaxpr = jax.make_jaxpr(lambda q: jax_fa3.dot_product_attention(q, q, q, implementation="fa3"))(q)
  assert "fa3_fwd" in str(jaxpr)


@pytest.mark.parametrize("implementation", ["xla", "cudnn"])
def test_passes_other_implementations_through(implementation, monkeypatch):
  seen = {}
  monkeypatch.setattr(
    jax.nn,
    "dot_product_attention",
    lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs) or "result",
  )
  result = jax_fa3.dot_product_attention(
    1,
    2,
    3,
    4,
    5,
    scale=0.5,
    is_causal=True,
    query_seq_lengths=6,
    key_value_seq_lengths=7,
    local_window_size=(8, 9),
    return_residual=True,
    implementation=implementation,
  )
  assert result == "result" and seen["args"] == (1, 2, 3, 4, 5)
  assert seen["kwargs"] == dict(
    scale=0.5,
    is_causal=True,
    query_seq_lengths=6,
    key_value_seq_lengths=7,
    local_window_size=(8, 9),
    implementation=implementation,
    return_residual=True,
  )
