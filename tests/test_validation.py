"""Every argument check: the error names the argument, its shape or dtype, and the rule."""

import jax
import jax.numpy as jnp
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
    ((Q.astype(jnp.float32), K, K), {}, TypeError, r"q has dtype float32.*bfloat16 or float16.*astype"),
    ((Q, K, K.astype(jnp.float16)), {}, TypeError, r"share one dtype.*bfloat16, bfloat16, float16"),
    ((Q, K.astype(jnp.int8), K), {}, TypeError, r"k has dtype int8"),
    ((zeros(2, 0, 4, 64), K, K), {}, ValueError, r"q has an empty dimension: shape \(2, 0, 4, 64\)"),
    ((Q, zeros(3, 12, 2, 64), zeros(3, 12, 2, 64)), {}, ValueError, r"same batch size: q \(2, 8, 4, 64\), k \(3"),
    ((Q, zeros(2, 12, 2, 32), K), {}, ValueError, r"k's head dim must equal q's: .*k \(2, 12, 2, 32\)"),
    ((Q, K, zeros(2, 13, 2, 64)), {}, ValueError, r"v must have k's seqlen and heads: .*v \(2, 13, 2, 64\)"),
    ((Q, zeros(2, 12, 3, 64), zeros(2, 12, 3, 64)), {}, ValueError, r"q's heads \(4\) must be a multiple of k/v's heads \(3\)"),
    ((zeros(2, 8, 4, 320), zeros(2, 12, 2, 320), zeros(2, 12, 2, 320)), {}, ValueError, r"head dims must be at most 256: q \(2, 8, 4, 320\)"),
    ((Q, K, zeros(2, 12, 2, 512)), {}, ValueError, r"head dims must be at most 256: .*v \(2, 12, 2, 512\)"),
    ((Q, K, K), {"window_size": (-2, 0)}, ValueError, r"window_size must be a pair \(left, right\) of ints >= -1.*\(-2, 0\)"),
    ((Q, K, K), {"window_size": (3,)}, ValueError, r"window_size .* got \(3,\)"),
    ((Q, K, K), {"window_size": (1.5, 2)}, ValueError, r"window_size .* got \(1.5, 2\)"),
    ((Q, K, K), {"window_size": 4}, ValueError, r"window_size .* got 4"),
    ((Q, K, K), {"softcap": -1.0}, ValueError, r"softcap must be a finite number >= 0.*-1.0"),
    ((Q, K, K), {"softcap": "big"}, TypeError, r"softcap must be a static Python number .*, got 'big'"),
    ((Q, K, K), {"softmax_scale": [0.1]}, TypeError, r"softmax_scale must be a static Python number"),
    ((Q, K, K), {"softmax_scale": 0.0}, ValueError, r"softmax_scale must be a finite number > 0, got 0.0"),
    ((Q, K, K), {"softmax_scale": float("inf")}, ValueError, r"softmax_scale must be a finite number > 0, got inf"),
]


@pytest.mark.parametrize("args, kwargs, error, message", FLASH_ATTENTION_ERRORS,
                         ids=[e[3][:40] for e in FLASH_ATTENTION_ERRORS])
def test_flash_attention_errors(args, kwargs, error, message):
  with pytest.raises(error, match=message):
    jax_fa3.flash_attention(*args, **kwargs)


@pytest.mark.parametrize("name", ["softmax_scale", "softcap"])
def test_traced_statics_are_refused(name):
  with pytest.raises(TypeError, match=f"{name} must be a static Python number"):
    jax.jit(lambda x: jax_fa3.flash_attention(Q, K, K, **{name: x}))(1.0)


DROP_IN_ERRORS = [
    ((Q, K, zeros(2, 12, 2, 32)), {}, r"value shape \(2, 12, 2, 32\) must equal key shape \(2, 12, 2, 64\)"),
    ((zeros(3, 8, 4, 64), K, K), {}, r"query shape \(3, 8, 4, 64\) must match key shape .* batch and head_dim"),
    ((Q, zeros(2, 12, 3, 64), zeros(2, 12, 3, 64)), {}, r"multiple of key/value heads.*\(2, 8, 4, 64\)"),
    ((Q, K, K), {"query_seq_lengths": jnp.array([1, 2], jnp.int16)},
     r"query_seq_lengths must be int32 of shape \(batch,\) = \(2,\), got int16\[2\]"),
    ((Q, K, K), {"key_value_seq_lengths": jnp.array([1, 2, 3], jnp.int32)},
     r"key_value_seq_lengths must be int32 of shape \(batch,\) = \(2,\), got int32\[3\]"),
    ((Q, K, K.astype(jnp.float16)), {}, r"share one dtype, got bfloat16, bfloat16, float16"),
    ((Q, K, K), {"implementation": "triton"}, r"Unsupported implementation option: 'triton'"),
    ((zeros(8, 4, 64), K, K), {"implementation": "fa3"}, r"all of rank 4 \(BTNH\) or all of rank 3 \(TNH\), got ranks \(3, 4, 4\)"),
    ((Q, K, K), {"local_window_size": (2, 3, 4), "implementation": "fa3"}, r"local_window_size as an int or a pair of ints >= 0, got \(2, 3, 4\)"),
    ((Q, K, K), {"scale": -0.5, "implementation": "fa3"}, r"needs a finite `scale` > 0, got -0.5"),
]


@pytest.mark.parametrize("args, kwargs, message", DROP_IN_ERRORS,
                         ids=[e[2][:40] for e in DROP_IN_ERRORS])
def test_dot_product_attention_errors(args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    jax_fa3.dot_product_attention(*args, **kwargs)
