"""flax.nnx integration: `attention_fn` for flax.nnx.MultiHeadAttention and fa3_jax's own MultiHeadAttention."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from fa3_jax import _validate
from fa3_jax.flax import _common
from fa3_jax.flax._common import apply_rotary, attention_fn, make_attention_fn

__all__ = ["MultiHeadAttention", "apply_rotary", "attention_fn", "make_attention_fn"]


def _annotated(init, logical_axes):
  """Logical-axis metadata without eager sharding: the names need rules (nnx.logical_axis_rules) to mean mesh axes,
  so placing parameters is left to the caller (nnx.get_partition_spec + jax.device_put, or nnx.jit shardings)."""
  return nnx.with_partitioning(init, logical_axes, eager_sharding=False)


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (MHA/GQA/MQA) on fa3_jax kernels, with optional rotary embedding.

  Parameters have flax.nnx.MultiHeadAttention's names and shapes, so its state can be loaded directly:
    query.kernel (in_features, num_heads, head_dim), key/value.kernel (in_kv_features, num_kv_heads, head_dim),
    out.kernel (num_heads, head_dim, out_features), biases (heads, head_dim) and (out_features,).
  Sharding annotations (nnx.with_partitioning, logical names resolved by nnx.logical_axis_rules):
    query/key/value kernels ("embed", "heads", "kv"), their biases ("heads", "kv"), out kernel
    ("heads", "kv", "embed"), out bias ("embed",). Shard "heads" on one mesh axis for q and k/v alike (GQA needs
    num_kv_heads divisible by that axis' size).

  Args:
    num_heads: query heads; num_kv_heads: key/value heads (default num_heads; num_heads % num_kv_heads == 0).
    in_features, qkv_features (default in_features; head_dim = qkv_features // num_heads), out_features (default
      in_features), in_kv_features (default in_features).
    causal: top-left causal (jax.nn convention). local_window_size: None, w or (left, right), top-left.
    softcap: logits softcap (0 = off). softmax_scale: default 1/sqrt(head_dim).
    rope_theta: if set, rotary embedding ("rotate half", as nnx.RoPE) with this base on q and k.
    dtype: computation dtype (bfloat16/float16 run the kernels on Hopper; float32 the reference path);
      None = promoted from inputs and params. param_dtype: parameter dtype.
    kernel_init, bias_init, use_bias: as flax.nnx.MultiHeadAttention.
    dense_mask_fallback: see make_attention_fn.
    use_sinks: learnable attention sinks (gpt-oss): a parameter `sinks` (num_heads,) of param_dtype, initialised
      to 0 and annotated ("heads",), one extra logit per head in every softmax (flash_attn_func's sinks).
    attention_chunk: int >= 0 (0: off), chunked local attention (Llama 4): token i attends token j only if
      i // attention_chunk == j // attention_chunk (per document with segment_ids), on top of causal / window.
  Bad arguments raise TypeError / ValueError here (in __call__ for call arguments), naming the argument.

  Decoding: pass kv_cache=fa3_jax.KVCache.create(...) to `__call__`; it returns (out, next cache), which the
  caller carries to the next step (under jit, donate it: the append is then in place). Prefill and decode steps are
  the same call (docs/integration.md §7).
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *, causal: bool = False, local_window_size=None,
               softcap: float = 0.0, softmax_scale: float | None = None, rope_theta: float | None = None,
               dtype=None, param_dtype=jnp.float32, use_bias: bool = True,
               kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
               dense_mask_fallback: bool = False, use_sinks: bool = False, attention_chunk: int = 0,
               rngs: nnx.Rngs):
    in_features = _validate.check_int("in_features", in_features, 1)
    in_kv_features = (in_features if in_kv_features is None
                      else _validate.check_int("in_kv_features", in_kv_features, 1))
    out_features = in_features if out_features is None else out_features
    self.num_heads, self.num_kv_heads, self.head_dim, self.options = _common.module_config(
        num_heads=num_heads, num_kv_heads=num_kv_heads,
        qkv_features=in_features if qkv_features is None else qkv_features, out_features=out_features, dtype=dtype,
        causal=causal, local_window_size=local_window_size, softcap=softcap, softmax_scale=softmax_scale,
        rope_theta=rope_theta, dense_mask_fallback=dense_mask_fallback, attention_chunk=attention_chunk)
    self.in_features, self.in_kv_features = in_features, in_kv_features
    self.dtype = dtype
    linear = functools.partial(
        nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
        kernel_init=_annotated(kernel_init, (_common.EMBED, _common.HEADS, _common.KV)),
        bias_init=_annotated(bias_init, (_common.HEADS, _common.KV)), rngs=rngs)
    self.query = linear(in_features, (self.num_heads, self.head_dim))
    self.key = linear(in_kv_features, (self.num_kv_heads, self.head_dim))
    self.value = linear(in_kv_features, (self.num_kv_heads, self.head_dim))
    self.out = nnx.LinearGeneral(
        (self.num_heads, self.head_dim), out_features, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
        use_bias=use_bias,
        kernel_init=_annotated(kernel_init, (_common.HEADS, _common.KV, _common.EMBED)),
        bias_init=_annotated(bias_init, (_common.EMBED,)), rngs=rngs)
    if _validate.check_bool("use_sinks", use_sinks):
      self.sinks = nnx.Param(_annotated(nnx.initializers.zeros_init(), (_common.HEADS,))(
          rngs.params(), (self.num_heads,), param_dtype))
    else:
      self.sinks = None

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, positions=None, kv_positions=None,
               query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None, max_segments=None,
               kv_cache=None):
    """inputs_q (batch, q_len, in_features); inputs_k/inputs_v (batch, kv_len, in_kv_features), default inputs_q.

    mask: optional (batch|1, heads|1, q_len, kv_len), nonzero = attend (see make_attention_fn for which masks run
      where). positions / kv_positions: (batch|1, len) or (len,) int rotary positions, default arange (only with
      rope_theta). query_seq_lengths / key_value_seq_lengths: optional (batch,) int padding lengths (on the kernels
      where their alignment provably matches jax.nn's, e.g. one array passed for both; see
      fa3_jax.dot_product_attention). segment_ids: optional (batch, len) ints for packed self-attention
      (documents packed into rows, see flash_attn_func's q_segment_ids): tokens attend only within their
      document, negative ids mark padding (output 0), causal / local_window_size apply per document; pass
      positions that restart at 0 with each document for rotary. Not combined with mask or the seq lengths.
      max_segments: static bound on the documents per row (default len; setting it is the fast path).
    kv_cache: optional fa3_jax.KVCache of batch sequences (this module's num_kv_heads and head_dim): self-attention
      of the q_len new tokens, which join the cache at its lengths (rotary positions lengths + r; the causal /
      window bands at those positions) and attend all its keys; query_seq_lengths may give the real tokens of
      right-padded rows (causal modules). Not combined with inputs_k, mask, positions or the other arguments.
    Returns (batch, q_len, out_features); with kv_cache, (that, the updated cache).
    """
    if kv_cache is not None:
      _common.check_cache_call(kv_cache, inputs_q, inputs_k, inputs_v, mask=mask, positions=positions,
                               kv_positions=kv_positions, key_value_seq_lengths=key_value_seq_lengths,
                               segment_ids=segment_ids, max_segments=max_segments)
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    _common.check_module_inputs(inputs_q, inputs_k, inputs_v, features=(self.in_features, self.in_kv_features))
    q, k, v = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
    if self.dtype is not None:
      q, k, v = (x.astype(self.dtype) for x in (q, k, v))
    sinks = None if self.sinks is None else self.sinks[...]
    if kv_cache is not None:
      out, kv_cache = _common.module_cached_attention(self.options, q, k, v, kv_cache, query_seq_lengths,
                                                      sinks=sinks)
      return self.out(out.astype(q.dtype)), kv_cache
    out = _common.module_attention(self.options, q, k, v, mask=mask, positions=positions,
                                   kv_positions=kv_positions, query_seq_lengths=query_seq_lengths,
                                   key_value_seq_lengths=key_value_seq_lengths,
                                   segment_ids=segment_ids, max_segments=max_segments, sinks=sinks)
    return self.out(out)
