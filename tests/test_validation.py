"""Every argument check: the error names the argument, its shape or dtype, and the rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fa3

pytestmark = pytest.mark.usefixtures("on_cpu")

bf16 = jnp.bfloat16


def zeros(*shape, dtype=bf16):
  return jnp.zeros(shape, dtype)


Q, K = zeros(2, 8, 4, 64), zeros(2, 12, 2, 64)

FLASH_ATTENTION_ERRORS = [
  ((zeros(8, 4, 64), K, K), {}, ValueError, r"q must have rank 4 .*\(8, 4, 64\)"),
  ((Q, K, zeros(2, 12, 2, 64, 1)), {}, ValueError, r"v must have rank 4 .*\(2, 12, 2, 64, 1\)"),
  (
    (Q.astype(jnp.float32), K, K),
    {},
    TypeError,
    r"q has dtype float32.*bfloat16 or float16.*astype",
  ),
  ((Q, K, K.astype(jnp.float16)), {}, TypeError, r"share one dtype.*bfloat16, bfloat16, float16"),
  ((Q, K.astype(jnp.int8), K), {}, TypeError, r"k has dtype int8"),
  ((zeros(2, 0, 4, 64), K, K), {}, ValueError, r"q has an empty dimension: shape \(2, 0, 4, 64\)"),
  (
    (Q, zeros(3, 12, 2, 64), zeros(3, 12, 2, 64)),
    {},
    ValueError,
    r"same batch size: q \(2, 8, 4, 64\), k \(3",
  ),
  (
    (Q, zeros(2, 12, 2, 32), K),
    {},
    ValueError,
    r"k's head dim must equal q's: .*k \(2, 12, 2, 32\)",
  ),
  (
    (Q, K, zeros(2, 13, 2, 64)),
    {},
    ValueError,
    r"v must have k's seqlen and heads: .*v \(2, 13, 2, 64\)",
  ),
  (
    (Q, zeros(2, 12, 3, 64), zeros(2, 12, 3, 64)),
    {},
    ValueError,
    r"q's heads \(4\) must be a multiple of k/v's heads \(3\)",
  ),
  (
    (zeros(2, 8, 4, 320), zeros(2, 12, 2, 320), zeros(2, 12, 2, 320)),
    {},
    ValueError,
    r"head dims must be at most 256: q \(2, 8, 4, 320\)",
  ),
  (
    (Q, K, zeros(2, 12, 2, 512)),
    {},
    ValueError,
    r"head dims must be at most 256: .*v \(2, 12, 2, 512\)",
  ),
  (
    (Q, K, K),
    {"window_size": (-2, 0)},
    ValueError,
    r"window_size must be a pair \(left, right\) of ints >= -1.*\(-2, 0\)",
  ),
  ((Q, K, K), {"window_size": (3,)}, ValueError, r"window_size .* got \(3,\)"),
  ((Q, K, K), {"window_size": (1.5, 2)}, ValueError, r"window_size .* got \(1.5, 2\)"),
  ((Q, K, K), {"window_size": 4}, ValueError, r"window_size .* got 4"),
  (
    (Q, K, K),
    {"softcap": -1.0},
    ValueError,
    r"softcap must be 0 \(off\) or a finite number in \[1e-30, 1e\+30\] .*got -1.0",
  ),
  # Finite in Python, but 0 or inf in the kernels' float32 (softcap * log2(e), scale / softcap).
  (
    (Q, K, K),
    {"softcap": 1e-300},
    ValueError,
    r"softcap must be 0 \(off\) or a finite number in \[1e-30, 1e\+30\] .*got 1e-300",
  ),
  (
    (Q, K, K),
    {"softcap": 3e38},
    ValueError,
    r"softcap must be 0 \(off\) .*in float32\), got 3e\+38",
  ),
  (
    (Q, K, K),
    {"softcap": "big"},
    TypeError,
    r"softcap must be a static Python number .*, got 'big'",
  ),
  ((Q, K, K), {"softmax_scale": [0.1]}, TypeError, r"softmax_scale must be a static Python number"),
  (
    (Q, K, K),
    {"softcap": "30"},
    TypeError,
    r"softcap must be a static Python number .*, got '30' of type str",
  ),
  (
    (Q, K, K),
    {"softcap": True},
    TypeError,
    r"softcap must be a static Python number .*, got True of type bool",
  ),
  (
    (Q, K, K),
    {"softmax_scale": "0.125"},
    TypeError,
    r"softmax_scale must be a static Python number .*'0.125'",
  ),
  (
    (Q, K, K),
    {"softmax_scale": 0.0},
    ValueError,
    r"softmax_scale must be a finite number in \[1e-30, 10000\] .*got 0.0",
  ),
  (
    (Q, K, K),
    {"softmax_scale": float("inf")},
    ValueError,
    r"softmax_scale must be a finite number in .*got inf",
  ),
  (
    (Q, K, K),
    {"softmax_scale": float("nan")},
    ValueError,
    r"softmax_scale must be a finite number in .*got nan",
  ),
  (
    (Q, K, K),
    {"softmax_scale": 2e4},
    ValueError,
    r"softmax_scale .*\(above, the float32 scores may overflow; .*got 20000.0",
  ),
  # 0 in float32: the handler would refuse it on the GPU only, when the call runs.
  (
    (Q, K, K),
    {"softmax_scale": 1e-300},
    ValueError,
    r"softmax_scale .*below, it is no usable scale\), got 1e-300",
  ),
  (
    (Q, K, K),
    {"softmax_scale": 10**400},
    ValueError,
    r"softmax_scale must be a finite number, got 1000.*which overflows float",
  ),
  (
    (Q, K, K),
    {"causal": "False"},
    TypeError,
    r"causal must be a bool \(True or False\), got 'False' of type str",
  ),
  ((Q, K, K), {"causal": None}, TypeError, r"causal must be a bool .*got None"),
  (
    (Q, K, K),
    {"deterministic": "no"},
    TypeError,
    r"deterministic must be a bool .*got 'no' of type str",
  ),
  ((Q, K, K), {"return_lse": 1}, TypeError, r"return_lse must be a bool .*got 1 of type int"),
]


@pytest.mark.parametrize(
  "args, kwargs, error, message",
  FLASH_ATTENTION_ERRORS,
  ids=[e[3][:40] for e in FLASH_ATTENTION_ERRORS],
)
def test_flash_attention_errors(args, kwargs, error, message):
  with pytest.raises(error, match=message):
    jax_fa3.flash_attention(*args, **kwargs)


@pytest.mark.parametrize("name", ["softmax_scale", "softcap"])
def test_traced_statics_are_refused(name):
  with pytest.raises(TypeError, match=f"{name} must be a static Python number .*traced value"):
    jax.jit(lambda x: jax_fa3.flash_attention(Q, K, K, **{name: x}))(1.0)


@pytest.mark.parametrize(
  "function, name, role",
  [
    (jax_fa3.flash_attention, "causal", "selects the kernel's mask"),
    (jax_fa3.flash_attention, "return_lse", "sets how many arrays the call returns"),
    (jax_fa3.flash_attention, "deterministic", "selects the backward kernel's mode"),
    (jax_fa3.dot_product_attention, "is_causal", "selects the attention mask"),
    (jax_fa3.dot_product_attention, "return_residual", "sets how many arrays the call returns"),
  ],
  ids=lambda x: x if isinstance(x, str) and " " not in x else None,
)
def test_traced_flags_are_refused_as_not_static(function, name, role):
  """A flag traced by jit: a TypeError that names it, says it must be static and why,
  not JAX's TracerBoolConversionError from inside jax_fa3."""
  with pytest.raises(
    TypeError,
    match=f"{name} must be static, a Python bool, not a traced value: it {role}.*static_argnames",
  ):
    jax.jit(lambda flag: function(Q, K, K, **{name: flag}))(True)


def test_numpy_bools_and_numbers_are_taken():
  """NumPy bools and scalars (and 0-d arrays for numbers) count as static values."""
  expected = jax_fa3.flash_attention(
    Q, K, K, causal=True, return_lse=True, softmax_scale=0.1, softcap=5.0
  )
  ours = jax_fa3.flash_attention(
    Q,
    K,
    K,
    causal=np.bool_(True),
    return_lse=np.True_,
    deterministic=np.False_,
    softmax_scale=np.float32(0.1),
    softcap=np.array(5.0),
  )
  for a, b in zip(ours, expected):
    np.testing.assert_array_equal(a, b)


Q3 = zeros(8, 4, 64)  # rank 3 (TNH): one batch element, as in jax.nn
DROP_IN_ERRORS = [
  # jax.nn's own rules, checked whichever implementation would run.
  (
    (Q, K, zeros(2, 12, 2, 32)),
    {},
    ValueError,
    r"value shape \(2, 12, 2, 32\) must equal key shape \(2, 12, 2, 64\)",
  ),
  (
    (zeros(3, 8, 4, 64), K, K),
    {},
    ValueError,
    r"same batch size .*query \(3, 8, 4, 64\), key \(2, 12, 2, 64\)",
  ),
  (
    (Q3, K, K),
    {},
    ValueError,
    r"same batch size \(a rank-3 array has batch 1\), got query \(8, 4, 64\)",
  ),
  (
    (Q, zeros(2, 12, 2, 32), zeros(2, 12, 2, 32)),
    {},
    ValueError,
    r"same head_dim .*query \(2, 8, 4, 64\), key \(2, 12, 2, 32\)",
  ),
  (
    (Q, zeros(2, 12, 3, 64), zeros(2, 12, 3, 64)),
    {},
    ValueError,
    r"multiple of key/value heads.*\(2, 8, 4, 64\)",
  ),
  (
    (Q, K[None], K[None]),
    {},
    ValueError,
    r"key must have rank 4 .* or rank 3 .*got shape \(1, 2, 12, 2, 64\)",
  ),
  ((Q[0, 0], K[0, 0], K[0, 0]), {}, ValueError, r"query must have rank 4 .*got shape \(4, 64\)"),
  (
    (Q.astype(jnp.int32), K.astype(jnp.int32), K.astype(jnp.int32)),
    {},
    TypeError,
    r"query must have a floating-point dtype, got int32",
  ),
  (
    (Q.astype(jnp.complex64), K.astype(jnp.complex64), K.astype(jnp.complex64)),
    {},
    TypeError,
    r"floating-point dtype, got complex64",
  ),
  (
    (Q, K, K.astype(jnp.float16)),
    {},
    ValueError,
    r"share one dtype, got bfloat16, bfloat16, float16",
  ),
  (
    (Q, K, K),
    {"query_seq_lengths": jnp.array([1, 2], jnp.int16)},
    ValueError,
    r"query_seq_lengths must be int32 of shape \(batch,\) = \(2,\), got int16\[2\]",
  ),
  (
    (Q, K, K),
    {"key_value_seq_lengths": jnp.array([1, 2, 3], jnp.int32)},
    ValueError,
    r"key_value_seq_lengths must be int32 of shape \(batch,\) = \(2,\), got int32\[3\]",
  ),
  (
    (Q, K, K),
    {"mask": jnp.ones((2, 4, 8, 11), bool)},
    ValueError,
    r"mask must broadcast to \[batch, heads, T, S\] = \[2, 4, 8, 12\] .*got shape \(2, 4, 8, 11\)",
  ),
  (
    (Q, K, K),
    {"mask": jnp.ones((1, 2, 4, 8, 12), bool)},
    ValueError,
    r"mask must broadcast to .*got shape \(1, 2, 4, 8, 12\)",
  ),
  (
    (Q, K, K),
    {"bias": zeros(2, 2, 8, 12)},
    ValueError,
    r"bias must broadcast to \[batch, heads, T, S\] = \[2, 4, 8, 12\] .*\(2, 2, 8, 12\)",
  ),
  (
    (Q, K, K),
    {"mask": jnp.ones((8, 12), jnp.int32)},
    TypeError,
    r"mask must be boolean .*got dtype int32",
  ),
  (
    (Q, K, K),
    {"local_window_size": (2,)},
    ValueError,
    r"local_window_size must be an int or a pair \(left, right\) of ints, got \(2,\)",
  ),
  ((Q, K, K), {"local_window_size": (2.5, 1)}, ValueError, r"local_window_size .* got \(2.5, 1\)"),
  ((Q, K, K), {"local_window_size": 2.0}, ValueError, r"local_window_size .* got 2.0"),
  (
    (Q, K, K),
    {"local_window_size": (2, 3, 4), "implementation": "fa3"},
    ValueError,
    r"local_window_size .* got \(2, 3, 4\)",
  ),
  ((Q, K, K), {"scale": float("nan")}, ValueError, r"scale must be finite, got nan"),
  ((Q, K, K), {"scale": float("-inf")}, ValueError, r"scale must be finite, got -inf"),
  (
    (Q, K, K),
    {"scale": "0.1"},
    TypeError,
    r"scale must be a real number or a scalar array, got '0.1'",
  ),
  ((Q, K, K), {"scale": jnp.ones(2)}, TypeError, r"scale must be a real number or a scalar array"),
  (
    (Q, K, K),
    {"is_causal": "False"},
    TypeError,
    r"is_causal must be a bool \(True or False\), got 'False'",
  ),
  (
    (Q, K, K),
    {"return_residual": 1},
    TypeError,
    r"return_residual must be a bool .*got 1 of type int",
  ),
  (
    (Q, K, K),
    {"implementation": "triton"},
    ValueError,
    r"Unsupported implementation option: 'triton'",
  ),
  # Valid for jax.nn, refused by implementation="fa3" only (None runs jax.nn).
  (
    (Q3, K[:1], K[:1]),
    {"implementation": "fa3"},
    ValueError,
    r"all of rank 4 \(BTNH\) or all of rank 3 \(TNH\), got ranks \(3, 4, 4\)",
  ),
  (
    (Q, K, K),
    {"scale": -0.5, "implementation": "fa3"},
    ValueError,
    r"implementation='fa3': `scale` must be a finite number in \[1e-30, 10000\] .*got -0.5",
  ),
  (
    (Q, K, K),
    {"scale": 2e4, "implementation": "fa3"},
    ValueError,
    r"implementation='fa3': `scale` must be .*got 20000.0",
  ),
  (
    (Q, K, K),
    {"scale": 1e-35, "implementation": "fa3"},
    ValueError,
    r"implementation='fa3': `scale` must be .*got 1e-35",
  ),
  # Refused whichever implementation runs.
  (
    (Q, K, K),
    {"scale": 10**400},
    ValueError,
    r"scale must be a finite number, got 1000.*which overflows float",
  ),
  (
    (Q, K, K),
    {"bias": jnp.zeros((2, 4, 8, 12), jnp.complex64)},
    TypeError,
    r"bias must be real .*got dtype complex64",
  ),
  (
    (Q, K, K),
    {"is_causal": "False", "implementation": "xla"},
    TypeError,
    r"is_causal must be a bool \(True or False\), got 'False'",
  ),
  (
    (Q, K, K),
    {"return_residual": 0, "implementation": "cudnn"},
    TypeError,
    r"return_residual must be a bool .*got 0 of type int",
  ),
  (
    (Q[:, :0], K, K),
    {"implementation": "fa3"},
    ValueError,
    r"needs query and key without an empty dimension, got query \(2, 0, 4, 64\)",
  ),
]


@pytest.mark.parametrize(
  "args, kwargs, error, message", DROP_IN_ERRORS, ids=[e[3][:40] for e in DROP_IN_ERRORS]
)
def test_dot_product_attention_errors(args, kwargs, error, message):
  with pytest.raises(error, match=message):
    jax_fa3.dot_product_attention(*args, **kwargs)


def test_nan_scale_is_refused_under_jit():
  """A NaN scale used to reach jax.nn under jit and return finite numbers."""
  with pytest.raises(ValueError, match="scale must be finite, got nan"):
    jax.jit(lambda q: jax_fa3.dot_product_attention(q, K, K, scale=float("nan")))(Q)


@pytest.mark.parametrize(
  "entry, name, role",
  [
    (
      lambda x: jax_fa3.flash_attention(Q, K, K, window_size=(x, 0)),
      "window_size",
      "selects the kernel's mask",
    ),
    (
      lambda x: jax_fa3.flash_attention_varlen(
        Q[0],
        K[0],
        K[0],
        jnp.array([0, 8], jnp.int32),
        jnp.array([0, 12], jnp.int32),
        max_seqlen_q=x,
      ),
      "max_seqlen_q",
      "FlashAttention takes it as a Python int",
    ),
    (
      lambda x: jax_fa3.flash_attention_with_kvcache(
        Q[:, :1], K, K, jnp.array([3, 4], jnp.int32), window_size=(-1, x)
      ),
      "window_size",
      "selects the kernel's mask",
    ),
    (
      lambda x: jax_fa3.flash_attention_with_kvcache(
        Q[:, :1], K, K, jnp.array([3, 4], jnp.int32), num_splits=x
      ),
      "num_splits",
      "workspace",
    ),
  ],
  ids=[
    "flash_attention-window_size",
    "varlen-max_seqlen_q",
    "kvcache-window_size",
    "kvcache-num_splits",
  ],
)
def test_traced_static_ints_are_refused_as_not_static(entry, name, role):
  """A traced window or split count: a TypeError that says it must be static and why, not a
  ValueError that prints a tracer as if it were a wrong number."""
  with pytest.raises(TypeError, match=f"{name} must be static, not a traced value: .*{role}"):
    jax.jit(entry)(2)


def test_jax_nn_refusing_what_fa3_cannot_take_raises_both_reasons(monkeypatch):
  """implementation=None falls back to jax.nn for what the kernels can't take; should jax.nn
  refuse it too (here simulated), the error names jax_fa3's reason and jax.nn's, in the type
  of jax_fa3's, instead of leaving jax.nn's alone."""

  def refuse(*args, **kwargs):
    raise ValueError("too many values to unpack (expected 4)")

  monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
  with pytest.raises(
    ValueError,
    match=r"jax.nn.dot_product_attention refused these arguments "
    r"\(ValueError: too many values to unpack \(expected 4\)\), "
    r"and jax_fa3 cannot take them either: implementation='fa3' "
    r"does not support `bias`",
  ) as raised:
    jax_fa3.dot_product_attention(Q, K, K, bias=zeros(2, 4, 8, 12))
  assert isinstance(raised.value.__cause__, ValueError)
