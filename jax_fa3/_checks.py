"""Argument rules shared by the public entry points, where attention.py's checks call them.

The kernels take softmax_scale and softcap as float32 attributes and compute
`softcap * log2(e)` and `softmax_scale / softcap` from them in float32. The bounds below
keep every one of those finite and non-zero, so what the float32 reference computes off
the GPU is what the kernels compute on it (the handlers refuse a scale that rounds to 0
or a non-finite softcap at run time, long after the call was traced).
"""

import jax

# softmax_scale in [MIN_SOFTMAX_SCALE, MAX_SOFTMAX_SCALE]. The scores q·k·scale are
# float32: up to 1e4 they stay finite for any |q·k| < 3.4e34; a larger scale is far outside
# any model's use and is refused rather than risk scores that overflow to inf and an
# output of zeros or NaN. Below 1e-30 the scale is not a usable number either (and below
# 1.4e-45 it rounds to 0 in float32).
MIN_SOFTMAX_SCALE = 1e-30
MAX_SOFTMAX_SCALE = 1e4
# softcap is 0 (off) or in [MIN_SOFTCAP, MAX_SOFTCAP]: then softcap·log2(e) and
# softmax_scale / softcap (at most 1e4 / 1e-30) are finite float32 numbers.
MIN_SOFTCAP = 1e-30
MAX_SOFTCAP = 1e30


def as_float(name, value):
  """A real number as a Python float, or a ValueError where it has none (an int past
  float's range)."""
  try:
    return float(value)
  except OverflowError:
    raise ValueError(
      f"{name} must be a finite number, got {value!r}, which overflows float"
    ) from None


def softmax_scale_rule(scale):
  """The rule a concrete softmax_scale breaks, or None."""
  if not MIN_SOFTMAX_SCALE <= scale <= MAX_SOFTMAX_SCALE:  # NaN fails too
    return (
      f"must be a finite number in [{MIN_SOFTMAX_SCALE:g}, {MAX_SOFTMAX_SCALE:g}] (above, "
      "the float32 scores may overflow; below, it is no usable scale)"
    )
  return None


def softcap_rule(softcap):
  """The rule a concrete softcap breaks, or None."""
  if softcap != 0 and not MIN_SOFTCAP <= softcap <= MAX_SOFTCAP:  # NaN fails too
    return (
      f"must be 0 (off) or a finite number in [{MIN_SOFTCAP:g}, {MAX_SOFTCAP:g}] (the "
      "kernels take softcap * log2(e) and softmax_scale / softcap in float32)"
    )
  return None


def refuse_traced(name, value, role):
  """A TypeError for a traced `value` (or a tuple holding one): `name` is static because
  `role` (what it decides when the call is traced)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  if any(isinstance(x, jax.core.Tracer) for x in values):
    raise TypeError(
      f"{name} must be static, not a traced value: {role}. Pass it as a "
      "Python constant, e.g. through functools.partial or jit's static_argnames"
    )


def refused_by_both(unsupported, jax_nn_error):
  """dot_product_attention(implementation=None): the error for arguments jax_fa3 can't take
  and `jax.nn` refused too, of `unsupported`'s type, saying both reasons."""
  return type(unsupported)(
    f"dot_product_attention: jax.nn.dot_product_attention refused these arguments "
    f"({type(jax_nn_error).__name__}: {jax_nn_error}), and jax_fa3 cannot take them "
    f"either: {unsupported}"
  )
