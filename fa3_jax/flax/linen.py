"""flax.linen integration: `attention_fn` for flax.linen.MultiHeadDotProductAttention and fa3_jax's own
MultiHeadAttention."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from fa3_jax import _validate
from fa3_jax.flax import _common
from fa3_jax.flax._common import apply_rotary, attention_fn, make_attention_fn

__all__ = ["MultiHeadAttention", "apply_rotary", "attention_fn", "make_attention_fn"]


class MultiHeadAttention(nn.Module):
  """Multi-head attention (MHA/GQA/MQA) on fa3_jax kernels, with optional rotary embedding.

  Parameters have flax.linen.MultiHeadDotProductAttention's names and shapes (for num_kv_heads == num_heads its
  params load directly): query/kernel (in, num_heads, head_dim), key|value/kernel (in_kv, num_kv_heads, head_dim),
  out/kernel (num_heads, head_dim, out_features), biases (heads, head_dim) and (out_features,).
  Logical axes (nn.with_logical_partitioning; map them with nn.logical_axis_rules): q/k/v kernels
  ("embed", "heads", "kv"), their biases ("heads", "kv"), out kernel ("heads", "kv", "embed"), out bias ("embed",);
  activations are constrained to ("batch", "length", "heads", "kv") around attention.

  Attributes:
    num_heads, num_kv_heads (default num_heads), qkv_features (default input features; head_dim =
      qkv_features // num_heads), out_features (default input features).
    causal, local_window_size (top-left, jax.nn convention), softcap, softmax_scale (default 1/sqrt(head_dim)),
    rope_theta (rotary base; None = no rotary), dtype (computation dtype; bfloat16/float16 run the kernels),
    param_dtype, use_bias, kernel_init, bias_init, dense_mask_fallback (see make_attention_fn).
    use_sinks: learnable attention sinks (gpt-oss): a parameter `sinks` (num_heads,) of param_dtype, initialised to 0,
      logical axes ("heads",) (flash_attn_func's sinks). attention_chunk: chunked local attention (Llama 4), top-left
      like causal (see the nnx module).
  Bad attributes raise TypeError / ValueError on construction, naming the attribute (head_dim's rules, when
  qkv_features is left to the inputs, at the first call).

  Decoding: pass kv_cache=fa3_jax.KVCache.create(...) to `__call__`, which then returns (out, next cache); the
  cache is an ordinary argument and result (no mutable collection), so a decoding loop carries and donates it
  (docs/integration.md §7).
  """

  num_heads: int
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  causal: bool = False
  local_window_size: Any = None
  softcap: float = 0.0
  softmax_scale: float | None = None
  rope_theta: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dense_mask_fallback: bool = False
  use_sinks: bool = False
  attention_chunk: int = 0

  def __post_init__(self):
    super().__post_init__()
    self._config(self.qkv_features)  # bad attributes raise on construction (head_dim's once qkv_features is known)

  def _config(self, qkv_features):
    """The checked (num_heads, num_kv_heads, head_dim, AttentionOptions); head_dim None if qkv_features is."""
    return _common.module_config(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, qkv_features=qkv_features,
        out_features=self.out_features, dtype=self.dtype, causal=self.causal, local_window_size=self.local_window_size,
        softcap=self.softcap, softmax_scale=self.softmax_scale, rope_theta=self.rope_theta,
        dense_mask_fallback=self.dense_mask_fallback, attention_chunk=self.attention_chunk)

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, positions=None, kv_positions=None,
               query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None, max_segments=None,
               kv_cache=None):
    """inputs_q (batch, q_len, features); inputs_k/inputs_v (batch, kv_len, features_kv), default inputs_q.

    mask: optional (batch|1, heads|1, q_len, kv_len), nonzero = attend. positions / kv_positions: rotary
    positions (batch|1, len) or (len,) ints, default arange (only with rope_theta). query_seq_lengths /
    key_value_seq_lengths: (batch,) ints. segment_ids: (batch, len) ints for packed self-attention (documents
    packed into rows, see flash_attn_func's q_segment_ids): tokens attend only within their document, negative ids
    mark padding (output 0), causal / local_window_size apply per document; pass positions that restart at 0 with
    each document for rotary. Not combined with mask or the seq lengths. max_segments: static bound on the
    documents per row (default len; setting it is the fast path). kv_cache: optional fa3_jax.KVCache, the decode
    path (see the nnx module: the new tokens join the cache and attend all of it; query_seq_lengths may give the
    real tokens of right-padded rows). Returns (batch, q_len, out_features); with kv_cache, (that, the updated
    cache). Bad shapes or types raise ValueError / TypeError naming the argument.
    """
    if kv_cache is not None:
      _common.check_cache_call(kv_cache, inputs_q, inputs_k, inputs_v, mask=mask, positions=positions,
                               kv_positions=kv_positions, key_value_seq_lengths=key_value_seq_lengths,
                               segment_ids=segment_ids, max_segments=max_segments)
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    _common.check_module_inputs(inputs_q, inputs_k, inputs_v)
    num_heads, num_kv_heads, head_dim, options = self._config(
        inputs_q.shape[-1] if self.qkv_features is None else self.qkv_features)
    dense = functools.partial(
        nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, (_common.EMBED, _common.HEADS, _common.KV)),
        bias_init=nn.with_logical_partitioning(self.bias_init, (_common.HEADS, _common.KV)))
    q = dense(features=(num_heads, head_dim), name="query")(inputs_q)
    k = dense(features=(num_kv_heads, head_dim), name="key")(inputs_k)
    v = dense(features=(num_kv_heads, head_dim), name="value")(inputs_v)
    if self.dtype is not None:
      q, k, v = (x.astype(self.dtype) for x in (q, k, v))
    axes = (_common.BATCH, _common.LENGTH, _common.HEADS, _common.KV)
    q, k, v = (nn.with_logical_constraint(x, axes) for x in (q, k, v))
    sinks = None
    if _validate.check_bool("use_sinks", self.use_sinks):
      sinks = self.param("sinks", nn.with_logical_partitioning(nn.initializers.zeros_init(), (_common.HEADS,)),
                         (num_heads,), self.param_dtype)
    if kv_cache is not None:
      out, kv_cache = _common.module_cached_attention(options, q, k, v, kv_cache, query_seq_lengths, sinks=sinks)
      out = out.astype(q.dtype)
    else:
      out = _common.module_attention(options, q, k, v, mask=mask, positions=positions, kv_positions=kv_positions,
                                     query_seq_lengths=query_seq_lengths,
                                     key_value_seq_lengths=key_value_seq_lengths,
                                     segment_ids=segment_ids, max_segments=max_segments, sinks=sinks)
    out = nn.with_logical_constraint(out, axes)
    out = nn.DenseGeneral(
        features=inputs_q.shape[-1] if self.out_features is None else self.out_features, axis=(-2, -1),
        dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, (_common.HEADS, _common.KV, _common.EMBED)),
        bias_init=nn.with_logical_partitioning(self.bias_init, (_common.EMBED,)), name="out")(out)
    return out if kv_cache is None else (out, kv_cache)
