"""jax_fa3: FlashAttention-3 for JAX on NVIDIA Hopper."""

from jax_fa3._kernels import kernels_available
from jax_fa3.attention import dot_product_attention, flash_attention, flash_attention_varlen
from jax_fa3.fp8 import fp8_attention
from jax_fa3.kvcache import flash_attention_with_kvcache

__all__ = [
  "dot_product_attention",
  "flash_attention",
  "flash_attention_varlen",
  "flash_attention_with_kvcache",
  "fp8_attention",
  "kernels_available",
]
__version__ = "0.1.0"
