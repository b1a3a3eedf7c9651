"""jax_fa3: FlashAttention-3 for JAX on NVIDIA Hopper."""

from jax_fa3._kernels import kernels_available
from jax_fa3.attention import dot_product_attention, flash_attention, flash_attention_varlen

__all__ = ["dot_product_attention", "flash_attention", "flash_attention_varlen",
           "kernels_available"]
__version__ = "0.1.0"
