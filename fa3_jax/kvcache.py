"""flash_attn_with_kvcache: attention of new queries against a KV cache, with the cache update (FA3's interface).

The call is three steps: rotary on the new keys and the queries (fa3_jax.rotary), the append of the new keys and
values into the caches (an XLA scatter, in place when the caches are donated under jit), and a forward-only
attention over each sequence's keys [cache_leftpad, cache_seqlens + seqlen_new) as a sequence layout
(docs/integration.md §4.8): keys BSHD with seqused_k, or, with cache_leftpad, the same buffer as packed keys whose
sequence b starts at b * capacity + leftpad; paged caches as a paged layout (the pages and their table), which the
kernels still gather per shard; with cache_leftpad, paged caches and cache_batch_idx gather each sequence's keys
first.

KVCache holds a cache with its lengths as one pytree, for decoding loops and the Flax modules' decode path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax import _pack_gqa
from fa3_jax import _split_kv
from fa3_jax import _validate
from fa3_jax import rotary
from fa3_jax import sharding
from fa3_jax import sinks as sinks_lib
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward_only(cfg: AttentionConfig, q, k, v, sequences: SequenceLayout):
  return sharding.attention_fwd(q, k, v, cfg, sequences)


@_forward_only.defjvp
def _no_derivative(cfg, primals, tangents):
  raise NotImplementedError("flash_attn_with_kvcache is forward-only (as FlashAttention-3's): it has no gradient. "
                            "Differentiate flash_attn_func or flash_attn_varlen_func instead")


def _per_sequence(name: str, x, batch: int, low: int, high: int | None):
  """An int or (batch,) integer array as int32 (batch,); known values checked to lie in [low, high]."""
  if _validate._is_int(x):
    x = np.full((batch,), int(x), np.int32)
  x = _validate._int_vector(name, x, batch, f"(batch,) = ({batch},)")
  known = _validate._known(x)
  if known is not None and ((known < low).any() or (high is not None and (known > high).any())):
    i = _validate._first((known < low) | (known > (np.inf if high is None else high)))
    raise ValueError(f"{name} must lie in [{low}, {'inf' if high is None else high}], got {int(known[i])} at "
                     f"sequence {i}")
  return jnp.asarray(x, jnp.int32)


def _check_cache_args(q, k_cache, v_cache, k, v, page_table):
  """Shapes and dtypes; returns (paged, capacity)."""
  _validate.check_array("q", q, 4, "(batch, seqlen_q, heads, head_dim)")
  paged = page_table is not None
  layout = "(num_pages, page_size, kv_heads, head_dim)" if paged else "(batch_cache, seqlen_cache, kv_heads, head_dim)"
  _validate.check_array("k_cache", k_cache, 4, layout)
  _validate.check_array("v_cache", v_cache, 4, layout.replace("head_dim)", "head_dim_v)"))
  _validate.check_half_dtype("q", q)
  for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
    if x is not None and x.dtype != q.dtype:
      raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
  if k_cache.shape[:3] != v_cache.shape[:3]:
    raise ValueError(f"k_cache and v_cache must agree in all but the head dim, got {tuple(k_cache.shape)} and "
                     f"{tuple(v_cache.shape)}")
  h, d = q.shape[2:]
  hk, dk, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
  if hk == 0 or h % hk:
    raise ValueError(f"heads of q must be a multiple of kv_heads of the caches (GQA/MQA), got heads={h}, "
                     f"kv_heads={hk}")
  if dk != d:
    raise ValueError(f"k_cache must have the head_dim of q, got q head_dim={d}, k_cache head_dim={dk}")
  _validate.check_head_dims(d, dv)
  if (k is None) != (v is None):
    raise ValueError("k and v (the new keys and values) must be given together, or neither")
  if k is not None:
    _validate.check_array("k", k, 4, "(batch, seqlen_new, kv_heads, head_dim)")
    _validate.check_array("v", v, 4, "(batch, seqlen_new, kv_heads, head_dim_v)")
    want_k = (q.shape[0], k.shape[1], hk, d)
    if tuple(k.shape) != want_k or tuple(v.shape) != (*want_k[:3], dv):
      raise ValueError(f"k and v must have shapes {want_k} and {(*want_k[:3], dv)} (batch, seqlen_new, kv_heads, "
                       f"head dims of the caches), got {tuple(k.shape)} and {tuple(v.shape)}")
  if not paged:
    return False, k_cache.shape[1]
  _validate.check_array("page_table", page_table, 2, "(batch, max_pages_per_seq)")
  if not jnp.issubdtype(page_table.dtype, jnp.integer) or page_table.shape[0] != q.shape[0]:
    raise ValueError(f"page_table must be an int32 array of shape (batch, max_pages_per_seq) with batch = "
                     f"{q.shape[0]}, got {page_table.dtype} {tuple(page_table.shape)}")
  known = _validate._known(page_table)
  if known is not None and ((known < 0) | (known >= k_cache.shape[0])).any():
    raise ValueError(f"page_table entries must lie in [0, num_pages = {k_cache.shape[0]}), got "
                     f"{int(known[(known < 0) | (known >= k_cache.shape[0])][0])}")
  return True, page_table.shape[1] * k_cache.shape[1]


def _append(cache, new, start, batch_idx, page_table):
  """cache with new's rows (batch, seqlen_new, ...) written at positions start[b] + r of sequence b; rows past the
  sequence's capacity are dropped."""
  pos = start[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)[None, :]  # (batch, seqlen_new)
  if page_table is None and batch_idx is None:
    # Cache entry b takes sequence b's rows: a scatter per entry (vmapped), which XLA partitions along a sharded
    # batch with no collectives (a scatter over batch indices it would gather).
    return jax.vmap(lambda c, n, p: c.at[p].set(n, mode="drop"))(cache, new, pos)
  if page_table is None:
    return cache.at[batch_idx[:, None], pos].set(new, mode="drop")
  page_size, max_pages = cache.shape[1], page_table.shape[1]
  slot = pos // page_size
  page = jnp.take_along_axis(page_table.astype(jnp.int32), jnp.clip(slot, 0, max_pages - 1), axis=1)
  page = jnp.where(slot < max_pages, page, cache.shape[0])  # past the table: out of bounds, dropped
  return cache.at[page, pos % page_size].set(new, mode="drop")


def _keys(cache, batch_idx):
  """Each sequence's rows of a contiguous cache (batch, capacity, kv_heads, dim)."""
  return cache if batch_idx is None else jnp.take(cache, batch_idx, axis=0, mode="clip")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, num_splits=0, pack_gqa=None, return_lse=False, sinks=None,
                            attention_chunk=0):
  """Attention of q against a KV cache, after appending k / v to it (FlashAttention-3's interface). Forward only.

  Args:
    q: (batch, seqlen_q, heads, head_dim) float16 | bfloat16.
    k_cache, v_cache: contiguous (batch_cache, seqlen_cache, kv_heads, head_dim / head_dim_v), or paged
      (num_pages, page_size, kv_heads, head_dim / head_dim_v) with page_table; q's dtype. Any page_size >= 1.
    k, v: optional new keys / values (batch, seqlen_new, kv_heads, head_dim / head_dim_v), written into the caches
      at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of sequence b (rows past the capacity are
      dropped).
    rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2) float tables, rotary_dim even and <= head_dim,
      seqlen_ro >= the capacity: k row r is rotated at position cache_seqlens[b] + r (the cache stores rotated
      keys); q rows at cache_seqlens[b] + r when causal or windowed, else all at cache_seqlens[b].
      rotary_interleaved: GPT-J pairs (True) or rotate-half halves (False).
    cache_seqlens: int or (batch,) int32: valid keys per sequence before the append; default the full capacity
      (then k / v cannot be given).
    cache_batch_idx: optional (batch,) int32 (contiguous caches): sequence b uses cache entry cache_batch_idx[b];
      default b (then batch_cache must be batch).
    cache_leftpad: optional (batch,) int32: sequence b's keys start at cache row cache_leftpad[b].
    page_table: (batch, max_pages_per_seq) int32 page indices; capacity = max_pages_per_seq * page_size.
    softmax_scale, causal, window_size, softcap: as flash_attn_func; causal / windows are bottom-right aligned:
      query row r sits at position cache_seqlens[b] + seqlen_new - seqlen_q + r.
    num_splits: split-KV (docs/kernels.md §2.10): each tile's keys are cut into this many chunks whose partial
      results a combine kernel merges; 0 chooses from batch, heads, cache length and the GPU's SMs; at most 256.
      pack_gqa: GQA packing (docs/kernels.md §2.12): the query heads of a KV head share one tile, so decoding reads
      each cache once per KV head. None packs where it is exact and the group's rows fit a tile (s_q * heads /
      kv_heads <= 128); True forces it (NotImplementedError where it is not exact: causal or windowed calls with
      several query rows); False never packs.
    return_lse: also return lse (batch, heads, seqlen_q) float32.
    sinks: optional (heads,) sink logits, as flash_attn_func's.
    attention_chunk: as flash_attn_func's, with key positions counted from the sequence's first key
      (cache_leftpad[b]), as causal and windows count them. A single query row (decoding) attends its chunk's keys
      so far, with split-KV and GQA packing as without chunks.

  Sequence b attends its keys [cache_leftpad[b], cache_seqlens[b] + seqlen_new) (clipped to the capacity). Query
  rows that see no key get out = 0 and lse = -inf (the sink with sinks).

  Returns:
    out (batch, seqlen_q, heads, head_dim_v); (out, lse) with return_lse; with k / v given, also the updated caches:
    (out, k_cache, v_cache) or (out, lse, k_cache, v_cache). Under jit with the caches donated the update reuses
    their buffers. Differentiating raises NotImplementedError. Paged caches (and, with cache_leftpad or
    cache_batch_idx, contiguous ones) gather each sequence's keys into a temporary (batch, capacity, ...) array
    until the forward kernel reads the pages itself.
  """
  paged, capacity = _check_cache_args(q, k_cache, v_cache, k, v, page_table)
  q, k_cache, v_cache = (jnp.asarray(x) for x in (q, k_cache, v_cache))
  k, v = (None if x is None else jnp.asarray(x) for x in (k, v))
  page_table = None if page_table is None else jnp.asarray(page_table)
  b, seqlen_q = q.shape[:2]
  seqlen_new = 0 if k is None else k.shape[1]
  cfg = _validate.attention_config(q.shape[-1], softmax_scale, causal, window_size, softcap, False,
                                   attention_chunk)
  sinks = _validate.check_sinks(sinks, q.shape[2])
  return_lse = _validate.check_bool("return_lse", return_lse)
  num_splits = _validate.check_int("num_splits", num_splits, 0)
  if num_splits > _split_kv.MAX_SPLITS:
    raise ValueError(f"num_splits must be at most {_split_kv.MAX_SPLITS} (0 chooses), got {num_splits}")
  if pack_gqa is not None:
    pack_gqa = _validate.check_bool("pack_gqa", pack_gqa)
  if cache_seqlens is None:
    if k is not None:
      raise ValueError("k / v are appended at cache_seqlens: pass cache_seqlens (an int or a (batch,) int32 array)")
    cache_seqlens = capacity
  cache_seqlens = _per_sequence("cache_seqlens", cache_seqlens, b, 0, capacity - seqlen_new)
  if paged and cache_batch_idx is not None:
    raise ValueError("cache_batch_idx selects contiguous cache entries; with page_table pick the pages instead")
  if cache_batch_idx is None and not paged and k_cache.shape[0] != b:
    raise ValueError(f"k_cache must have q's batch ({b}) in dim 0 unless cache_batch_idx maps sequences to cache "
                     f"entries, got {k_cache.shape[0]}")
  batch_idx = None if cache_batch_idx is None else _per_sequence("cache_batch_idx", cache_batch_idx, b, 0,
                                                                 k_cache.shape[0] - 1)
  leftpad = None if cache_leftpad is None else _per_sequence("cache_leftpad", cache_leftpad, b, 0, capacity)
  rotary_interleaved = _validate.check_bool("rotary_interleaved", rotary_interleaved)
  if (rotary_cos is None) != (rotary_sin is None):
    raise ValueError("rotary_cos and rotary_sin must be given together, or neither")
  if rotary_cos is not None:
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
      _validate.check_array(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
      if t.shape != rotary_cos.shape or 2 * t.shape[1] > q.shape[-1] or t.shape[0] < capacity:
        raise ValueError(f"{name} must have shape (seqlen_ro, rotary_dim / 2) with seqlen_ro >= the cache capacity "
                         f"{capacity} and rotary_dim <= head_dim {q.shape[-1]}, like rotary_cos "
                         f"{tuple(rotary_cos.shape)}; got {tuple(t.shape)}")

  def at_positions(table, pos):  # (batch, rows) positions -> (batch, rows, rotary_dim / 2)
    return jnp.take(jnp.asarray(table), jnp.clip(pos, 0, table.shape[0] - 1), axis=0)

  if k is not None:
    if rotary_cos is not None:
      pos = cache_seqlens[:, None] + jnp.arange(seqlen_new, dtype=jnp.int32)
      k = rotary.rotate(k, at_positions(rotary_cos, pos), at_positions(rotary_sin, pos), rotary_interleaved)
    k_cache = _append(k_cache, k, cache_seqlens, batch_idx, page_table)
    v_cache = _append(v_cache, v, cache_seqlens, batch_idx, page_table)
  if rotary_cos is not None:
    windowed = cfg.window_left is not None or cfg.window_right is not None
    pos = cache_seqlens[:, None] + (jnp.arange(seqlen_q, dtype=jnp.int32) if windowed else 0)
    pos = jnp.broadcast_to(pos, (b, seqlen_q))
    q = rotary.rotate(q, at_positions(rotary_cos, pos), at_positions(rotary_sin, pos), rotary_interleaved)

  length = cache_seqlens + seqlen_new
  keys_per_row = capacity if not cfg.attention_chunk else min(capacity, cfg.attention_chunk)  # for the split count
  if cfg.attention_chunk and seqlen_q == 1:
    # The row sits at the last key, so its chunk is a start for its keys: the call stays BSHD in q (split-KV, GQA
    # packing) instead of running each chunk as a sequence.
    first = jnp.zeros_like(length) if leftpad is None else leftpad
    last = jnp.maximum(length - first - 1, 0)
    leftpad = first + last // cfg.attention_chunk * cfg.attention_chunk
    cfg = dataclasses.replace(cfg, attention_chunk=0)
  if paged:
    sequences = SequenceLayout(seqused_k=length, page_table=page_table.astype(jnp.int32))
    keys, values = k_cache, v_cache
  else:
    keys, values, sequences = _keys(k_cache, batch_idx), _keys(v_cache, batch_idx), SequenceLayout(seqused_k=length)
  if leftpad is not None:
    # Sequence b's keys start at cache_leftpad[b]: each sequence's rows back to back, as packed keys.
    keys, values, _ = sequences.unpaged(keys, values)
    starts = jnp.arange(b, dtype=jnp.int32) * capacity + leftpad
    sequences = SequenceLayout(cu_seqlens_k=jnp.concatenate([starts, jnp.full((1,), b * capacity, jnp.int32)]),
                               seqused_k=jnp.maximum(length - leftpad, 0), max_seqlen_k=capacity)
    keys, values = (x.reshape(b * capacity, *x.shape[2:]) for x in (keys, values))
  heads, kv_heads = q.shape[2], k_cache.shape[2]
  pack = _pack_gqa.choose(pack_gqa, cfg, seqlen_q, heads, kv_heads)
  rows, tile_heads = (seqlen_q * (heads // kv_heads), kv_heads) if pack else (seqlen_q, heads)
  cfg = dataclasses.replace(cfg, num_splits=_split_kv.resolve(num_splits, b, tile_heads, rows, keys_per_row,
                                                              q.shape[-1], v_cache.shape[-1]))
  if 0 in (b, seqlen_q, heads):
    out = jnp.zeros((*q.shape[:3], v_cache.shape[-1]), q.dtype)
    lse = jnp.full((b, heads, seqlen_q), -jnp.inf, jnp.float32)
  elif pack:
    out, lse = _pack_gqa.unpack(*_forward_only(_pack_gqa.unmasked(cfg), _pack_gqa.pack(q, kv_heads), keys, values,
                                               sequences), heads)
  else:
    out, lse = _forward_only(cfg, q, keys, values, sequences)
  if sinks is not None:
    out, lse = sinks_lib.apply(out, lse, sinks)
  result = (out, lse) if return_lse else (out,)
  if k is not None:
    result = (*result, k_cache, v_cache)
  return result[0] if len(result) == 1 else result


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """A KV cache and its lengths, one pytree: what a decoding loop carries from step to step (and donates under jit).

  k, v: contiguous (batch, capacity, kv_heads, head_dim / head_dim_v), or paged (num_pages, page_size, kv_heads,
    head_dim / head_dim_v) with page_table (batch, pages_per_sequence) int32; float16 | bfloat16.
  lengths: (batch,) int32, the valid keys of each sequence.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  page_table: jax.Array | None = None

  @classmethod
  def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype=jnp.bfloat16, *,
             head_dim_v: int | None = None, page_size: int | None = None) -> "KVCache":
    """An empty cache (lengths 0) for `capacity` keys per sequence. With page_size, the caches are pages and each
    sequence owns ceil(capacity / page_size) of them, in order (a serving system would hand pages out itself)."""
    batch, capacity, kv_heads, head_dim = (_validate.check_int(name, x, 1) for name, x in (
        ("batch", batch), ("capacity", capacity), ("kv_heads", kv_heads), ("head_dim", head_dim)))
    head_dim_v = head_dim if head_dim_v is None else _validate.check_int("head_dim_v", head_dim_v, 1)
    lengths = jnp.zeros((batch,), jnp.int32)
    if page_size is None:
      rows, table = (batch, capacity), None
    else:
      page_size = _validate.check_int("page_size", page_size, 1)
      pages = -(-capacity // page_size)
      rows, table = (batch * pages, page_size), jnp.arange(batch * pages, dtype=jnp.int32).reshape(batch, pages)
    return cls(jnp.zeros((*rows, kv_heads, head_dim), dtype), jnp.zeros((*rows, kv_heads, head_dim_v), dtype),
               lengths, table)

  @property
  def capacity(self) -> int:
    """Keys each sequence can hold."""
    return self.k.shape[1] if self.page_table is None else self.page_table.shape[1] * self.k.shape[1]

  def attend(self, q, k, v, num_new=None, **kwargs):
    """Appends k, v (batch, seqlen_new, kv_heads, head_dim / head_dim_v) at each sequence's length and attends q
    (batch, seqlen_q, heads, head_dim) over the keys so far (flash_attn_with_kvcache; kwargs: its softmax_scale,
    causal, window_size, softcap, num_splits, pack_gqa, ...). num_new: optional (batch,) int, the real rows of k /
    v per sequence (prompts of different lengths, right-padded); default all seqlen_new. The rows past num_new are
    written but not counted: the next append overwrites them, and with causal=True no real query sees them.

    Returns (out (batch, seqlen_q, heads, head_dim_v), the cache with the rows appended).
    """
    out, k_cache, v_cache = flash_attn_with_kvcache(q, self.k, self.v, k, v, cache_seqlens=self.lengths,
                                                    page_table=self.page_table, **kwargs)
    # Known values are checked to lie in [0, seqlen_new]; traced ones are clipped there.
    added = k.shape[1] if num_new is None else jnp.clip(
        _per_sequence("num_new", num_new, q.shape[0], 0, k.shape[1]), 0, k.shape[1])
    return out, dataclasses.replace(self, k=k_cache, v=v_cache, lengths=self.lengths + added)
