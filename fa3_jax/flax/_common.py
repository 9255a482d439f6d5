"""Pieces shared by the linen and nnx integrations: the attention_fn drop-in, mask recognition and rotary embedding.

Conventions are jax.nn's (JAX_FFI.md §8): causal and windows are top-left, masks are True/nonzero = attend.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fa3_jax import jax_nn

# Logical axis names used by the modules' parameter and activation annotations.
BATCH, LENGTH, EMBED, HEADS, KV = "batch", "length", "embed", "heads", "kv"


def _mask_error(why: str) -> ValueError:
  return ValueError(
      f"fa3_jax attention cannot run this mask on its kernels: {why}. Pass instead: no mask plus is_causal=True "
      "(nnx) or make_attention_fn(is_causal=True) (linen) for causal attention, local_window_size=(left, right) for "
      "sliding windows, a padding mask whose values are known at trace time, or the seq-length arguments of "
      "fa3_jax.flax's MultiHeadAttention for padding; or build the function with "
      "make_attention_fn(dense_mask_fallback=True) to apply any mask on the dense float32 reference path.")


def masking_from_flax_mask(mask, shape, masking: jax_nn.Masking, dense_mask_fallback: bool) -> jax_nn.Masking:
  """Fold a Flax mask (broadcastable to `shape` = (batch, heads, T, S), nonzero = attend) into `masking`."""
  mask = jnp.asarray(mask)
  if mask.ndim != 4 or any(d not in (1, e) for d, e in zip(mask.shape, shape)):
    raise ValueError(f"mask must be broadcastable to (batch, heads, q_len, kv_len) = {shape}, got {mask.shape}")
  known = jax_nn.concrete_value(mask)
  structure = None if known is None else jax_nn.analyse_mask(known != 0)
  if structure is not None:
    return masking.with_structure(structure)
  if dense_mask_fallback:
    return dataclasses.replace(masking, dense_mask=mask != 0)
  if known is None:
    raise _mask_error("its values depend on traced data (or on inputs of the jit/remat being traced), so its "
                      "structure cannot be read when tracing")
  raise _mask_error("it is not a top-left causal/window band combined with query and key padding, the same for "
                    "every head")


def make_attention_fn(*, is_causal: bool = False, local_window_size=None, softcap: float = 0.0,
                      scale: float | None = None, dense_mask_fallback: bool = False):
  """An `attention_fn` for flax.linen.MultiHeadDotProductAttention and flax.nnx.MultiHeadAttention, on fa3_jax.

  Args:
    is_causal: always apply a top-left causal mask (linen passes causality only as a mask; this avoids it).
    local_window_size: None, w or (left, right): query i sees keys i - left ... i + right (jax.nn convention).
    softcap: if > 0, logits become softcap * tanh(logits / softcap).
    scale: logits scale; default 1/sqrt(head_dim) (Flax's default too).
    dense_mask_fallback: run masks that are not recognised (data-dependent, or not causal/window/padding shaped)
      on the dense float32 path instead of raising. Needed for linen's decode=True, whose mask carries the cache
      index.

  The returned function takes query (batch..., q_len, heads, head_dim), key/value (batch..., kv_len, kv_heads,
  head_dim) and returns (batch..., q_len, heads, head_dim) in the computation dtype, with Flax's keywords:
    mask: (batch..., heads|1, q_len, kv_len), nonzero/True = attend (flax's make_causal_mask / make_attention_mask
      output). A mask whose values are known at trace time (flax's make_causal_mask, also inside jit/remat, or a
      constant padding mask) is read then: causal/window bands become kernel arguments, padding runs the dense
      path (until varlen kernels land). Other masks raise ValueError saying what to pass instead, unless
      dense_mask_fallback.
    dropout_rate, deterministic, dropout_rng, broadcast_dropout: dropout_rate > 0 with deterministic=False raises
      NotImplementedError (the kernels have no dropout).
    dtype: computation dtype (query/key/value are cast to it); bfloat16/float16 use the kernels, float32 the
      reference path. None keeps the inputs' promoted dtype.
    precision: ignored (the kernels accumulate in float32).
    module: set by Flax when sow_weights=True; raises NotImplementedError (attention weights are never formed).
    is_causal: nnx's per-call flag, combined with the bound one.
  """
  bound = dict(causal=jax_nn._validate.check_bool("is_causal", is_causal),  # pylint: disable=protected-access
               window=jax_nn._check_window(local_window_size),  # pylint: disable=protected-access
               softcap=jax_nn._validate.check_softcap(softcap), scale=scale,  # pylint: disable=protected-access
               dense_mask_fallback=bool(dense_mask_fallback))

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                   is_causal=False, input_positions=None):
    del broadcast_dropout, dropout_rng, precision
    return _attention_fn(query, key, value, bias=bias, mask=mask, dropout_rate=dropout_rate,
                         deterministic=deterministic, dtype=dtype, module=module, is_causal=is_causal,
                         input_positions=input_positions, **bound)

  return attention_fn


def _attention_fn(query, key, value, *, bias, mask, dropout_rate, deterministic, dtype, module, is_causal,
                  input_positions, causal, window, softcap, scale, dense_mask_fallback):
  if dropout_rate > 0.0 and not deterministic:
    raise NotImplementedError(
        f"fa3_jax attention has no dropout (the fused kernels never form the attention weights), got "
        f"dropout_rate={dropout_rate} with deterministic=False; set dropout_rate=0.0, or deterministic=True for "
        "this call, and put dropout elsewhere (e.g. on the attention output)")
  if module is not None:
    raise NotImplementedError("sow_weights=True: fa3_jax attention never forms the attention weights to sow")
  if input_positions is not None:
    raise NotImplementedError("input_positions (RoPE inside attention_fn) is not supported by this attention_fn; "
                              "use fa3_jax.flax's MultiHeadAttention(rope_theta=...) for rotary embeddings")
  if dtype is not None:
    query, key, value = (x.astype(dtype) for x in (query, key, value))
  else:
    common = jnp.result_type(query, key, value)
    query, key, value = (x.astype(common) for x in (query, key, value))
  batch_dims = query.shape[:-3]
  t, n, _ = query.shape[-3:]
  s = key.shape[-3]
  q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (query, key, value))
  b = q.shape[0]
  left, right = window
  masking = jax_nn.Masking(left=left, right=jax_nn._min_bound(right, 0 if (causal or is_causal) else None))  # pylint: disable=protected-access
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.ndim != len(batch_dims) + 3:
      raise ValueError(f"mask must have shape (batch..., heads|1, q_len, kv_len) with batch dims {batch_dims}, got "
                       f"{mask.shape}")
    mask = jnp.broadcast_to(mask, (*batch_dims, *mask.shape[-3:])).reshape(b, *mask.shape[-3:])
    masking = masking_from_flax_mask(mask, (b, n, t, s), masking, dense_mask_fallback)
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = jnp.broadcast_to(bias, (*batch_dims, *bias.shape[-3:])).reshape(b, *bias.shape[-3:])
    masking = dataclasses.replace(masking, bias=bias)
  out, _ = jax_nn.attend(q, k, v, masking, scale=scale, softcap=softcap)
  return out.reshape(*batch_dims, *out.shape[1:])


attention_fn = make_attention_fn()
attention_fn.__doc__ = "make_attention_fn() with no bound options: " + (make_attention_fn.__doc__ or "")


# ---- rotary position embedding -------------------------------------------------------------------------------

def apply_rotary(x, positions, theta: float = 10000.0):
  """Rotary embedding (RoFormer, "rotate half" layout as flax.nnx.RoPE and LLaMA/GPT-NeoX).

  x: (batch, seqlen, heads, head_dim) with even head_dim; positions: (batch, seqlen) or (seqlen,) ints.
  Returns x's shape and dtype; the rotation is computed in float32.
  """
  d = x.shape[-1]
  if d % 2:
    raise ValueError(f"rotary embedding needs an even head_dim, got {d}")
  freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs  # (batch|, seqlen, d/2)
  angles = jnp.broadcast_to(angles, (x.shape[0], x.shape[1], d // 2))[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ---- what the modules share ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """The attention configuration of a module (constructor arguments), validated once."""

  causal: bool = False
  local_window_size: tuple[int, int] | None = None
  softcap: float = 0.0
  softmax_scale: float | None = None
  rope_theta: float | None = None

  def masking(self) -> jax_nn.Masking:
    left, right = jax_nn._check_window(self.local_window_size)  # pylint: disable=protected-access
    return jax_nn.Masking(left=left, right=jax_nn._min_bound(right, 0 if self.causal else None))  # pylint: disable=protected-access


def module_attention(opts: AttentionOptions, q, k, v, *, mask=None, positions=None, kv_positions=None,
                     query_seq_lengths=None, key_value_seq_lengths=None, dense_mask_fallback: bool = False):
  """The attention step of the modules: rotary, masking, fa3 attention. q (B, T, N, H), k/v (B, S, K, H)."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  if opts.rope_theta is not None:
    positions = jnp.arange(t) if positions is None else positions
    kv_positions = (jnp.arange(s) if s != t or positions is None else positions) if kv_positions is None \
        else kv_positions
    q = apply_rotary(q, positions, opts.rope_theta)
    k = apply_rotary(k, kv_positions, opts.rope_theta)
  masking = opts.masking()
  if query_seq_lengths is not None:
    masking = dataclasses.replace(masking, q_valid=jnp.arange(t)[None, :] < jnp.asarray(query_seq_lengths)[:, None])
  if key_value_seq_lengths is not None:
    masking = dataclasses.replace(
        masking, kv_valid=jnp.arange(s)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None])
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, *jnp.shape(mask)[-3:])) if jnp.ndim(mask) == 4 else mask
    masking = masking_from_flax_mask(mask, (b, n, t, s), masking, dense_mask_fallback)
  out, _ = jax_nn.attend(q, k, v, masking, scale=opts.softmax_scale, softcap=opts.softcap)
  return out


def head_dim_of(qkv_features: int, num_heads: int, num_kv_heads: int) -> int:
  if qkv_features % num_heads:
    raise ValueError(f"qkv_features must be divisible by num_heads, got {qkv_features} and {num_heads}")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads must be a multiple of num_kv_heads (GQA/MQA), got {num_heads} and {num_kv_heads}")
  return qkv_features // num_heads
