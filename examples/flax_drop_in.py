"""The Flax drop-in: an existing nnx model moves to jax_fa3's attention by one argument.

A model built with `nnx.MultiHeadAttention` takes
`attention_fn=jax_fa3.flax.nnx.dot_product_attention` at construction. A model that is
already built (or loaded) can have it set on its attention layers, since nnx modules are
plain Python objects; its weights stay as they are. That is what this script does, on
an encoder with grouped-query attention and a padded batch, and checks that the output
is Flax's, up to bfloat16 rounding.

    python examples/flax_drop_in.py
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import jax_fa3.flax


class Encoder(nnx.Module):
  """An existing model: nothing in it knows about jax_fa3."""

  def __init__(self, rngs):
    self.attention = nnx.MultiHeadAttention(
      num_heads=8, in_features=256, num_kv_heads=2, dtype=jnp.bfloat16, decode=False, rngs=rngs
    )
    self.mlp = nnx.Linear(256, 256, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(x, mask=mask)
    return x + self.mlp(jax.nn.gelu(x))


def use_jax_fa3(model, **options):
  """Sets jax_fa3's attention on every `nnx.MultiHeadAttention` inside `model`."""
  attention_fn = functools.partial(jax_fa3.flax.nnx.dot_product_attention, **options)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.MultiHeadAttention):
      module.attention_fn = attention_fn


def flax_and_jax_fa3_outputs():
  """The encoder's output on a padded batch with Flax's attention, then with jax_fa3's."""
  model = Encoder(nnx.Rngs(0))
  lengths = jnp.array([128, 77, 5, 128])  # a padded batch: valid tokens first
  x = jax.random.normal(jax.random.key(1), (4, 128, 256), jnp.bfloat16)
  valid = jnp.arange(128) < lengths[:, None]
  mask = nnx.make_attention_mask(valid, valid)
  forward = nnx.jit(Encoder.__call__)
  flax_out = forward(model, x, mask)

  # The mask only marks padding: say so, and the kernels take it as sequence lengths
  # (checked on the device). strict=True: should they not serve, this raises.
  use_jax_fa3(model, mask_structure="padding", strict=True)
  return flax_out, forward(model, x, mask)


def main():
  flax_out, jax_fa3_out = (x.astype(jnp.float32) for x in flax_and_jax_fa3_outputs())
  error, scale = jnp.max(jnp.abs(jax_fa3_out - flax_out)), jnp.max(jnp.abs(flax_out))
  print(
    f"max |jax_fa3 - Flax| = {error:.4f} on outputs up to {scale:.2f}, where one "
    f"bfloat16 step is {jnp.finfo(jnp.bfloat16).eps * scale:.4f}"
  )
  print(jax_fa3.kernels_available())  # where none are, jax_fa3 ran its float32 reference


if __name__ == "__main__":
  main()
