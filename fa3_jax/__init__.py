"""fa3_jax: FlashAttention-3-class attention for JAX on NVIDIA Hopper GPUs, with a pure-JAX reference path."""

from fa3_jax import fp8
from fa3_jax.attention import RESIDUAL_NAMES
from fa3_jax.combine import flash_attn_combine
from fa3_jax.context_parallel import context_parallel_attention
from fa3_jax.context_parallel import zigzag_reorder
from fa3_jax.context_parallel import zigzag_restore
from fa3_jax.attention import flash_attn_func
from fa3_jax.attention import flash_attn_qkvpacked_func
from fa3_jax.attention import flash_attn_varlen_func
from fa3_jax.attention import kernel_available
from fa3_jax.jax_nn import dot_product_attention
from fa3_jax.kvcache import KVCache
from fa3_jax.kvcache import flash_attn_with_kvcache

__all__ = ["KVCache", "RESIDUAL_NAMES", "context_parallel_attention", "dot_product_attention", "flash_attn_combine",
           "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "fp8",
           "kernel_available", "zigzag_reorder", "zigzag_restore"]
__version__ = "0.1.0"
