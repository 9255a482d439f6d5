"""Pieces shared by the linen and nnx integrations: the attention_fn drop-in, mask recognition and rotary embedding.

Conventions are jax.nn's (docs/integration.md §7): causal and windows are top-left, masks are True/nonzero = attend.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from fa3_jax import _validate
from fa3_jax import jax_nn
from fa3_jax import rotary
from fa3_jax.kvcache import KVCache

# Logical axis names used by the modules' parameter and activation annotations.
BATCH, LENGTH, EMBED, HEADS, KV = "batch", "length", "embed", "heads", "kv"


# ---- argument checks, shared by make_attention_fn, attention_fn and both modules ------------------------------
# Each raises at trace time, naming the argument, what was expected and what was given: TypeError for a wrong type,
# ValueError for a wrong value. fa3_jax._validate's checks (bools, ints, dtypes, softcap) are used as they are.

def check_heads(num_heads, num_kv_heads) -> tuple[int, int]:
  """(num_heads, num_kv_heads) with num_kv_heads defaulting to num_heads and dividing it (GQA/MQA)."""
  num_heads = _validate.check_int("num_heads", num_heads, 1)
  num_kv_heads = num_heads if num_kv_heads is None else _validate.check_int("num_kv_heads", num_kv_heads, 1)
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads must be a multiple of num_kv_heads (GQA/MQA), got num_heads={num_heads}, "
                     f"num_kv_heads={num_kv_heads}")
  return num_heads, num_kv_heads


def check_rotary_head_dim(head_dim: int, source: str) -> None:
  """Rotary embedding rotates pairs of features: head_dim (named by `source` in the message) must be even."""
  if head_dim % 2:
    raise ValueError(f"rotary embedding needs an even head_dim, got {source} = {head_dim}")


def check_head_dim(qkv_features, num_heads: int, rotary: bool) -> int:
  """head_dim = qkv_features // num_heads, which must divide evenly (and be even with rotary)."""
  qkv_features = _validate.check_int("qkv_features", qkv_features, 1)
  if qkv_features % num_heads:
    raise ValueError(f"qkv_features must be divisible by num_heads, got qkv_features={qkv_features}, "
                     f"num_heads={num_heads}")
  head_dim = qkv_features // num_heads
  if rotary:
    check_rotary_head_dim(head_dim, f"qkv_features // num_heads = {qkv_features} // {num_heads}")
  return head_dim


def check_positive_float(name: str, value, *, optional: bool = False) -> float | None:
  """A finite Python number > 0 (a logits scale, a rotary base; static, so never a traced value); None passes
  through when `optional`."""
  if value is None and optional:
    return None
  or_none = " or None" if optional else ""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a Python float{or_none}, got {type(value).__name__}")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a finite number > 0{or_none}, got {value}")
  return float(value)


def check_window(local_window_size) -> tuple[int, int] | None:
  """None (no window), or (left, right) from an int w (= (w, w)) or a pair of ints >= 0 (top-left, jax.nn's)."""
  if local_window_size is None:
    return None
  # jax_nn's rules (TypeError for non-ints, ValueError below 0), so the drop-ins agree with dot_product_attention.
  return jax_nn._check_window(local_window_size)  # pylint: disable=protected-access


def check_attention_inputs(query, key, value) -> None:
  """attention_fn's query (batch..., q_len, heads, head_dim), key (batch..., kv_len, kv_heads, head_dim) and value
  (batch..., kv_len, kv_heads, head_dim_v): floating, the same batch dims, heads % kv_heads == 0 (as Flax's own
  attention, which also never broadcasts a batch of 1)."""
  for name, x, layout in (("query", query, "(batch..., q_len, heads, head_dim)"),
                          ("key", key, "(batch..., kv_len, kv_heads, head_dim)"),
                          ("value", value, "(batch..., kv_len, kv_heads, head_dim_v)")):
    _validate.check_is_array(name, x)
    if x.ndim < 3:
      raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")
  shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
  if not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
    raise ValueError(f"query, key and value must have the same batch dims (no broadcasting), got {shapes}")
  if key.shape[-3:-1] != value.shape[-3:-1]:
    raise ValueError(f"key and value must have the same kv_len and kv_heads, got {shapes}")
  heads, kv_heads = query.shape[-2], key.shape[-2]
  if heads == 0 or kv_heads == 0 or heads % kv_heads:
    raise ValueError(f"query's heads must be a multiple of key's and value's kv_heads, both > 0 (GQA/MQA), got "
                     f"{shapes}")
  if query.shape[-1] != key.shape[-1] or query.shape[-1] == 0:
    raise ValueError(f"query and key must have the same head_dim > 0, got {shapes}")


def check_module_inputs(inputs_q, inputs_k, inputs_v, features: tuple[int, int] | None = None) -> None:
  """A module's inputs_q (batch, q_len, in_features) and inputs_k/inputs_v (batch, kv_len, in_kv_features):
  features = (in_features, in_kv_features) when the module fixes them at construction."""
  for name, x, layout in (("inputs_q", inputs_q, "(batch, q_len, features)"),
                          ("inputs_k", inputs_k, "(batch, kv_len, features)"),
                          ("inputs_v", inputs_v, "(batch, kv_len, features)")):
    _validate.check_array(name, x, 3, layout)
  shapes = f"inputs_q {tuple(inputs_q.shape)}, inputs_k {tuple(inputs_k.shape)}, inputs_v {tuple(inputs_v.shape)}"
  if not inputs_q.shape[0] == inputs_k.shape[0] == inputs_v.shape[0]:
    raise ValueError(f"inputs_q, inputs_k and inputs_v must have the same batch size, got {shapes}")
  if inputs_k.shape[1] != inputs_v.shape[1]:
    raise ValueError(f"inputs_k and inputs_v must have the same kv_len, got {shapes}")
  if features is not None:
    in_features, in_kv_features = features
    for name, x, what, f in (("inputs_q", inputs_q, "in_features", in_features),
                             ("inputs_k", inputs_k, "in_kv_features", in_kv_features),
                             ("inputs_v", inputs_v, "in_kv_features", in_kv_features)):
      if x.shape[-1] != f:
        raise ValueError(f"{name} must have {what} = {f} features (last dim), got shape {tuple(x.shape)}")


def check_broadcastable(name: str, x, shape: tuple[int, ...], layout: str):
  """x (a mask or bias) as an array with len(shape) dims, each 1 or the matching entry of `shape`."""
  x = jnp.asarray(_validate.as_array(name, x))
  if x.ndim != len(shape) or any(d not in (1, e) for d, e in zip(x.shape, shape)):
    raise ValueError(f"{name} must be broadcastable to {layout} = {shape} with the same number of dims, got shape "
                     f"{tuple(x.shape)}")
  return x


def check_lengths(name: str, lengths, batch: int):
  """Sequence lengths as an integer array of shape (batch,) (traced values are fine)."""
  lengths = jnp.asarray(_validate.as_array(name, lengths))
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array of shape (batch,), got dtype {lengths.dtype}")
  if lengths.shape != (batch,):
    raise ValueError(f"{name} must have shape (batch,) = ({batch},), got shape {tuple(lengths.shape)}")
  return lengths


def check_positions(name: str, positions, batch: int, length: int):
  """Rotary positions as an integer array of shape (length,), (1, length) or (batch, length)."""
  positions = jnp.asarray(_validate.as_array(name, positions))
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array, got dtype {positions.dtype}")
  if positions.shape not in ((length,), (1, length), (batch, length)):
    raise ValueError(f"{name} must have shape (len,) or (batch|1, len) = ({length},) or ({batch}, {length}), got "
                     f"shape {tuple(positions.shape)}")
  return positions


def _mask_error(why: str) -> ValueError:
  return ValueError(
      f"fa3_jax attention cannot run this mask on its kernels: {why}. Pass instead: no mask plus is_causal=True "
      "(nnx) or make_attention_fn(is_causal=True) (linen) for causal attention, local_window_size=(left, right) for "
      "sliding windows, a padding mask whose values are known at trace time, or the seq-length arguments of "
      "fa3_jax.flax's MultiHeadAttention for padding; or build the function with "
      "make_attention_fn(dense_mask_fallback=True) to apply any mask on the dense float32 reference path.")


def masking_from_flax_mask(mask, masking: jax_nn.Masking, dense_mask_fallback: bool) -> jax_nn.Masking:
  """Fold a Flax mask (checked broadcastable to (batch, heads, T, S), batch not broadcast; nonzero = attend) into
  `masking`."""
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


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
  """The attention configuration of a module or attention_fn (constructor arguments), checked on construction.

  local_window_size is kept as None or (left, right); dense_mask_fallback: see make_attention_fn.
  """

  causal: bool = False
  local_window_size: tuple[int, int] | None = None
  softcap: float = 0.0
  softmax_scale: float | None = None
  rope_theta: float | None = None
  dense_mask_fallback: bool = False
  attention_chunk: int = 0

  def __post_init__(self):
    checked = dict(causal=_validate.check_bool("causal", self.causal),
                   local_window_size=check_window(self.local_window_size),
                   softcap=_validate.check_softcap(self.softcap),
                   softmax_scale=check_positive_float("softmax_scale", self.softmax_scale, optional=True),
                   rope_theta=check_positive_float("rope_theta", self.rope_theta, optional=True),
                   dense_mask_fallback=_validate.check_bool("dense_mask_fallback", self.dense_mask_fallback),
                   attention_chunk=_validate.check_attention_chunk(self.attention_chunk))
    for name, value in checked.items():
      object.__setattr__(self, name, value)  # frozen: store the normalised values

  def masking(self, causal: bool = False) -> jax_nn.Masking:
    """The window, causality (self.causal or `causal`) and chunks as top-left Masking."""
    left, right = self.local_window_size or (None, None)
    right = jax_nn._min_bound(right, 0 if (self.causal or causal) else None)  # pylint: disable=protected-access
    return jax_nn.Masking(left=left, right=right, chunk=self.attention_chunk)


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
  Bad arguments raise TypeError / ValueError here, naming the argument.

  The returned function takes query (batch..., q_len, heads, head_dim), key/value (batch..., kv_len, kv_heads,
  head_dim) and returns (batch..., q_len, heads, head_dim) in the computation dtype, with Flax's keywords:
    mask: (batch..., heads|1, q_len, kv_len), nonzero/True = attend (flax's make_causal_mask / make_attention_mask
      output). A mask whose values are known at trace time (flax's make_causal_mask, also inside jit/remat, or a
      constant padding mask) is read then: causal/window bands become kernel arguments, and padding whose valid
      positions are a prefix of each row becomes per-batch lengths on the kernels, with
      fa3_jax.dot_product_attention's rules for when their alignment matches (a causal padding mask of equal
      query and key lengths always does; other known padding runs the dense path). Other masks raise ValueError
      saying what to pass instead, unless dense_mask_fallback.
    bias: (batch..., heads|1, q_len, kv_len) added to the logits; runs the dense float32 path.
    dropout_rate, deterministic, dropout_rng, broadcast_dropout: dropout_rate > 0 with deterministic=False raises
      NotImplementedError (the kernels have no dropout).
    dtype: computation dtype (query/key/value are cast to it); bfloat16/float16 use the kernels, float32 the
      reference path. None keeps the inputs' promoted dtype.
    precision: ignored (the kernels accumulate in float32).
    module: set by Flax when sow_weights=True; raises NotImplementedError (attention weights are never formed).
    is_causal: nnx's per-call flag, combined with the bound one.
  As Flax's own attention, query, key and value must have the same batch dims (a batch of 1 is not broadcast),
  key and value the same kv_len and kv_heads, query and key the same head_dim.
  """
  options = AttentionOptions(causal=_validate.check_bool("is_causal", is_causal),
                             local_window_size=check_window(local_window_size),
                             softcap=_validate.check_softcap(softcap),
                             softmax_scale=check_positive_float("scale", scale, optional=True),
                             dense_mask_fallback=_validate.check_bool("dense_mask_fallback", dense_mask_fallback))

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                   dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                   is_causal=False, input_positions=None):
    del broadcast_dropout, dropout_rng, precision
    return _attention_fn(options, query, key, value, bias=bias, mask=mask, dropout_rate=dropout_rate,
                         deterministic=deterministic, dtype=dtype, module=module, is_causal=is_causal,
                         input_positions=input_positions)

  return attention_fn


def _attention_fn(options: AttentionOptions, query, key, value, *, bias, mask, dropout_rate, deterministic, dtype,
                  module, is_causal, input_positions):
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
  check_attention_inputs(query, key, value)
  masking = options.masking(causal=_validate.check_bool("is_causal", is_causal))
  dtype = jnp.result_type(query, key, value) if dtype is None else _validate.check_float_dtype("dtype", dtype)
  batch_dims = query.shape[:-3]
  t, n, _ = query.shape[-3:]
  s = key.shape[-3]
  b = math.prod(batch_dims)  # explicit, as reshape(-1, ...) cannot infer a batch when another dim is 0
  q, k, v = (x.astype(dtype).reshape(b, *x.shape[-3:]) for x in (query, key, value))
  layout = "(batch..., heads|1, q_len, kv_len)"
  if mask is not None:
    mask = check_broadcastable("mask", mask, (*batch_dims, n, t, s), layout)
    mask = jnp.broadcast_to(mask, (*batch_dims, *mask.shape[-3:])).reshape(b, *mask.shape[-3:])
    masking = masking_from_flax_mask(mask, masking, options.dense_mask_fallback)
  if bias is not None:
    bias = check_broadcastable("bias", bias, (*batch_dims, n, t, s), layout)
    bias = jnp.broadcast_to(bias, (*batch_dims, *bias.shape[-3:])).reshape(b, *bias.shape[-3:])
    masking = dataclasses.replace(masking, bias=bias)
  out, _ = jax_nn.attend(q, k, v, masking, scale=options.softmax_scale, softcap=options.softcap)
  return out.reshape(*batch_dims, *out.shape[1:])


attention_fn = make_attention_fn()
attention_fn.__doc__ = "make_attention_fn() with no bound options: " + (make_attention_fn.__doc__ or "")


# ---- rotary position embedding -------------------------------------------------------------------------------

def apply_rotary(x, positions, theta: float = 10000.0):
  """Rotary embedding (RoFormer, "rotate half" layout as flax.nnx.RoPE and LLaMA/GPT-NeoX).

  x: (batch, seqlen, heads, head_dim) with even head_dim; positions: (batch|1, seqlen) or (seqlen,) ints.
  Returns x's shape and dtype; the rotation is computed in float32.
  """
  _validate.check_array("x", x, 4, "(batch, seqlen, heads, head_dim)")
  d = x.shape[-1]
  check_rotary_head_dim(d, "x.shape[-1]")
  theta = check_positive_float("theta", theta)
  positions = check_positions("positions", positions, x.shape[0], x.shape[1])
  freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (batch|, seqlen, d/2)
  return rotary.rotate(x, jnp.cos(angles), jnp.sin(angles), interleaved=False)


# ---- what the modules share ------------------------------------------------------------------------------------

def module_config(*, num_heads, num_kv_heads, qkv_features, out_features, dtype,
                  **attention) -> tuple[int, int, int | None, AttentionOptions]:
  """Checks a module's constructor arguments (`attention`: AttentionOptions' fields).

  Returns (num_heads, num_kv_heads, head_dim, options); head_dim is None while qkv_features is None (linen: until the
  first call, which infers it from the inputs).
  """
  num_heads, num_kv_heads = check_heads(num_heads, num_kv_heads)
  if out_features is not None:
    _validate.check_int("out_features", out_features, 1)
  if dtype is not None:
    _validate.check_float_dtype("dtype", dtype)
  options = AttentionOptions(**attention)
  head_dim = (None if qkv_features is None
              else check_head_dim(qkv_features, num_heads, rotary=options.rope_theta is not None))
  return num_heads, num_kv_heads, head_dim, options


def module_attention(opts: AttentionOptions, q, k, v, *, mask=None, positions=None, kv_positions=None,
                     query_seq_lengths=None, key_value_seq_lengths=None, segment_ids=None, max_segments=None,
                     sinks=None):
  """The attention step of the modules: rotary, masking, fa3 attention. q (B, T, N, H), k/v (B, S, K, H); sinks:
  the module's (N,) sink logits, or None.

  The call arguments are checked against q/k/v here (the modules' docstrings give their shapes).
  """
  b, t, n, _ = q.shape
  s = k.shape[1]
  if segment_ids is not None:
    if s != t:
      raise ValueError(f"segment_ids packs documents for self-attention, so q_len and kv_len must be equal, got "
                       f"q_len={t}, kv_len={s}")
    others = [name for name, x in (("mask", mask), ("query_seq_lengths", query_seq_lengths),
                                   ("key_value_seq_lengths", key_value_seq_lengths)) if x is not None]
    if others:
      raise ValueError(f"segment_ids cannot be combined with {', '.join(others)}: mark padding tokens with a "
                       "negative segment id instead")
  segments = _validate.segment_ids(segment_ids, None, max_segments, b, t, s)
  if opts.rope_theta is None:
    if positions is not None or kv_positions is not None:
      raise ValueError("positions / kv_positions are rotary positions, but this module has rope_theta=None (no "
                       "rotary embedding); construct it with rope_theta=... or leave them out")
  else:
    positions = jnp.arange(t) if positions is None else check_positions("positions", positions, b, t)
    if kv_positions is None:  # self-attention lengths: keys sit at the queries' positions
      kv_positions = positions if s == t else jnp.arange(s)
    else:
      kv_positions = check_positions("kv_positions", kv_positions, b, s)
    q = apply_rotary(q, positions, opts.rope_theta)
    k = apply_rotary(k, kv_positions, opts.rope_theta)
  masking = opts.masking()
  lengths = {name: None if x is None else check_lengths(name, x, b).astype(jnp.int32) for name, x in
             (("query_seq_lengths", query_seq_lengths), ("key_value_seq_lengths", key_value_seq_lengths))}
  q_lengths = lengths["query_seq_lengths"]
  # One array passed for both stays one object, which lets jax_nn prove the kernels' alignment (as
  # dot_product_attention does).
  kv_lengths = q_lengths if key_value_seq_lengths is query_seq_lengths else lengths["key_value_seq_lengths"]
  masking = dataclasses.replace(masking, q_lengths=q_lengths, kv_lengths=kv_lengths, segments=segments)
  if mask is not None:
    mask = check_broadcastable("mask", mask, (b, n, t, s), "(batch|1, heads|1, q_len, kv_len)")
    mask = jnp.broadcast_to(mask, (b, *mask.shape[1:]))
    masking = masking_from_flax_mask(mask, masking, opts.dense_mask_fallback)
  out, _ = jax_nn.attend(q, k, v, masking, scale=opts.softmax_scale, softcap=opts.softcap,
                         sinks=_validate.check_sinks(sinks, n))
  return out


def check_cache_call(kv_cache, inputs_q, inputs_k, inputs_v, **others) -> None:
  """A module call with kv_cache: self-attention of inputs_q, none of the arguments in `others` (name -> value)
  given, and a KVCache."""
  if not isinstance(kv_cache, KVCache):
    raise TypeError(f"kv_cache must be a fa3_jax.KVCache (fa3_jax.KVCache.create(...)), got "
                    f"{type(kv_cache).__name__}")
  if (inputs_k is not None and inputs_k is not inputs_q) or (inputs_v is not None and inputs_v is not inputs_q):
    raise ValueError("kv_cache decodes self-attention: pass inputs_q only (its keys and values join the cache)")
  given = [name for name, x in others.items() if x is not None]
  if given:
    raise ValueError(f"kv_cache cannot be combined with {', '.join(given)}: the cache's lengths place the new "
                     "tokens (rotary positions, visibility); pass query_seq_lengths for right-padded prompts")


def module_cached_attention(opts: AttentionOptions, q, k, v, cache: KVCache, query_seq_lengths=None, sinks=None):
  """The modules' decode step: q (B, T, N, H), k / v (B, T, K, H) of T new tokens per sequence join the cache at its
  lengths and attend everything so far. The new tokens sit at positions lengths + r: rotary turns them there, and
  the module's top-left causal / window bands become the kernel's bottom-right ones (the last query at the last
  key), which is the same rule at these positions. query_seq_lengths (B,): the real tokens of right-padded rows,
  whose padded rows come out 0; it needs a causal module (else real queries would see padded keys).

  The computation runs in the cache's dtype. Returns (out (B, T, N, H), the updated cache).
  """
  b, t = q.shape[:2]
  if cache.lengths.shape != (b,):
    raise ValueError(f"kv_cache must hold the batch of inputs_q ({b} sequences), got lengths of shape "
                     f"{tuple(cache.lengths.shape)}")
  want = (k.shape[2], k.shape[3], v.shape[3])
  have = (cache.k.shape[2], cache.k.shape[3], cache.v.shape[3])
  if have != want:
    raise ValueError(f"kv_cache must have this module's (num_kv_heads, head_dim, head_dim_v) = {want}, got {have}")
  masking = opts.masking()
  if query_seq_lengths is not None:
    if masking.right != 0:
      raise NotImplementedError("query_seq_lengths with kv_cache (right-padded prompts) needs a causal module "
                                "(causal=True or a window with right = 0): otherwise real queries would see the "
                                "padded keys")
    query_seq_lengths = check_lengths("query_seq_lengths", query_seq_lengths, b).astype(jnp.int32)
  q, k, v = (x.astype(cache.k.dtype) for x in (q, k, v))
  if opts.rope_theta is not None:
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    q, k = (apply_rotary(x, positions, opts.rope_theta) for x in (q, k))
  window = (-1 if masking.left is None else masking.left, -1 if masking.right is None else masking.right)
  # Chunks and sinks only where the module has them, so caches whose attend predates them still serve.
  extras = {} if not opts.attention_chunk else dict(attention_chunk=opts.attention_chunk)
  if sinks is not None:
    extras["sinks"] = sinks
  out, cache = cache.attend(q, k, v, num_new=query_seq_lengths, softmax_scale=opts.softmax_scale,
                            window_size=window, softcap=opts.softcap, **extras)
  if query_seq_lengths is not None:
    out = jnp.where(jnp.arange(t)[None, :, None, None] < query_seq_lengths[:, None, None, None], out, 0)
  return out, cache
