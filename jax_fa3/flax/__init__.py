"""jax_fa3 in Flax: swap the attention function of a Flax attention module for jax_fa3's.

- `jax_fa3.flax.linen`: `dot_product_attention` for
  `flax.linen.MultiHeadDotProductAttention(attention_fn=...)`, and that module with it as
  the default.
- `jax_fa3.flax.nnx`: `dot_product_attention` for
  `flax.nnx.MultiHeadAttention(attention_fn=...)`, and that module with it as the default.

Where the kernels can't serve a call (dropout while training, a bias, an arbitrary mask,
sown attention weights, float32), Flax's own attention runs after a one-time warning, or
`strict=True` raises.
"""

from jax_fa3.flax import linen, nnx

__all__ = ["linen", "nnx"]
