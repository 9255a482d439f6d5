"""Independent oracles: dense attention written directly from the documented semantics.

`numpy_attention` works in float64 NumPy (the forward oracle); `dense_attention` is the same in float32 JAX so that
`jax.grad` of it is the gradient oracle. `numpy_varlen_attention` / `dense_varlen_attention` are their
variable-length counterparts: each packed sequence on its own, with the same dense attention; and
`numpy_segment_attention` / `dense_segment_attention` the segment-id ones: each batch row's positions of one id, on
each side, as one sequence. None shares code with fa3_jax.
"""

import jax
import jax.numpy as jnp
import numpy as np


def visible_mask(seqlen_q, seqlen_k, causal=False, window=(-1, -1), chunk=0):
  """(seqlen_q, seqlen_k) bool, bottom-right aligned; -1 = unbounded; chunk > 0: only keys of the query's chunk
  (position // chunk, floor division)."""
  left, right = window
  if causal:
    right = 0
  i = np.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
  j = np.arange(seqlen_k)[None, :]
  mask = np.ones((seqlen_q, seqlen_k), bool)
  if left >= 0:
    mask &= j >= i - left
  if right >= 0:
    mask &= j <= i + right
  if chunk > 0:
    mask &= i // chunk == j // chunk
  return mask


def _dense(xp, q, k, v, scale, causal, window, softcap, sinks=None, chunk=0):
  """Dense attention written straight from the semantics with array module xp: (out, lse). sinks (h,): an extra
  logit per head in every row's softmax, whose value is 0."""
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  k = xp.repeat(k, h // hk, axis=2)
  v = xp.repeat(v, h // hk, axis=2)
  s = xp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap > 0:
    s = softcap * xp.tanh(s / softcap)
  mask = xp.asarray(visible_mask(sq, sk, causal, window, chunk))
  any_visible = mask.any(-1)[:, None]
  m = xp.where(any_visible, xp.where(mask, s, -np.inf).max(-1, keepdims=True), 0)
  if sinks is not None:
    sink = xp.asarray(sinks)[None, :, None, None]
    m = xp.where(any_visible, xp.maximum(m, sink), sink)
  p = xp.where(mask, xp.exp(xp.where(mask, s, 0) - m), 0)
  l = p.sum(-1, keepdims=True)
  if sinks is not None:
    l = l + xp.exp(sink - m)
  l_safe = xp.where(l > 0, l, 1)
  out = xp.einsum("bhqk,bkhd->bqhd", p / l_safe, v)
  lse = xp.where(l > 0, xp.log(l_safe) + m, -np.inf)[..., 0]
  return out, lse


def numpy_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, sinks=None, chunk=0):
  """float64 NumPy (out (b, s_q, h, d_v), lse (b, h, s_q)); rows without visible keys give 0 and -inf (with sinks:
  0 and the sink)."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  sinks = None if sinks is None else np.asarray(sinks, np.float64)
  return _dense(np, q, k, v, scale, causal, window, softcap, sinks, chunk)


def dense_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, sinks=None, chunk=0,
                    return_lse=False):
  """float32 JAX dense attention (out in q's dtype, and lse with return_lse), differentiable: the gradient oracle
  (in the sinks too)."""
  out, lse = _dense(jnp, *(x.astype(jnp.float32) for x in (q, k, v)), scale, causal, window, softcap,
                    None if sinks is None else sinks.astype(jnp.float32), chunk)
  return (out.astype(q.dtype), lse) if return_lse else out.astype(q.dtype)


def sequence_rows(cu_seqlens, seqused, max_seqlen, total):
  """[(offset, length)] of each sequence, by the documented rule: offset = cu[b] clamped to [0, total], length =
  seqused[b] if given else cu[b + 1] - cu[b], clamped to [0, max_seqlen] and to total - offset."""
  cu = np.asarray(cu_seqlens, np.int64)
  rows = []
  for b in range(len(cu) - 1):
    offset = min(max(int(cu[b]), 0), total)
    length = int(cu[b + 1] - cu[b]) if seqused is None else int(seqused[b])
    rows.append((offset, max(0, min(length, max_seqlen, total - offset))))
  return rows


def _no_keys_lse(xp, shape, dtype, sinks, heads_axis):
  """The lse of rows that see no key: -inf, or the sink of their head."""
  if sinks is None:
    return xp.full(shape, -np.inf, dtype)
  index = [None] * len(shape)
  index[heads_axis] = slice(None)
  return xp.asarray(sinks, dtype)[tuple(index)] + xp.zeros(shape, dtype)  # a writable copy


def _per_sequence(xp, set_rows, q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, scale, causal, window, softcap,
                  sinks, chunk):
  """Packed (out (total_q, h, d_v), lse (h, total_q)): zeros / -inf (the sinks), then each sequence's dense
  attention written into its rows by set_rows(array, rows, value)."""
  h, dv = q.shape[1], v.shape[-1]
  out = xp.zeros((q.shape[0], h, dv), q.dtype)
  lse = _no_keys_lse(xp, (h, q.shape[0]), q.dtype, sinks, 0)
  for (oq, lq), (ok, lk) in zip(sequence_rows(cu_q, used_q, max_q, q.shape[0]),
                                sequence_rows(cu_k, used_k, max_k, k.shape[0])):
    if lq == 0 or lk == 0:  # no queries, or queries that see no key: 0 and -inf
      continue
    o, l = _dense(xp, q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk], scale, causal, window, softcap,
                  sinks, chunk)
    out = set_rows(out, (slice(oq, oq + lq),), o[0])
    lse = set_rows(lse, (slice(None), slice(oq, oq + lq)), l[0])
  return out, lse


def _numpy_set(x, index, value):
  x[index] = value
  return x


def numpy_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q=None, used_k=None, scale=None, causal=False,
                           window=(-1, -1), softcap=0.0, sinks=None, chunk=0):
  """float64 NumPy per-sequence attention of packed q (total_q, h, d), k, v (total_k, h_k, d | d_v) with concrete
  cu_seqlens / seqused: (out (total_q, h, d_v), lse (h, total_q)); rows of no sequence give 0 and -inf."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  sinks = None if sinks is None else np.asarray(sinks, np.float64)
  return _per_sequence(np, _numpy_set, q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, scale, causal, window,
                       softcap, sinks, chunk)


def dense_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q=None, used_k=None, scale=None, causal=False,
                           window=(-1, -1), softcap=0.0, sinks=None, chunk=0):
  """float32 JAX per-sequence attention (out in q's dtype, lse float32), differentiable: the varlen gradient
  oracle. cu_seqlens / seqused must be concrete."""
  out, lse = _per_sequence(jnp, lambda x, index, value: x.at[index].set(value),
                           *(x.astype(jnp.float32) for x in (q, k, v)), cu_q, cu_k, max_q, max_k, used_q, used_k,
                           scale, causal, window, softcap, None if sinks is None else sinks.astype(jnp.float32),
                           chunk)
  return out.astype(q.dtype), lse


def segment_rows(q_ids, kv_ids):
  """[(b, query positions, key positions)] of every segment, read straight from concrete ids (b, s): the positions
  of one non-negative id in row b of each side (key positions possibly empty)."""
  q_ids, kv_ids = np.asarray(q_ids), np.asarray(kv_ids)
  return [(b, np.flatnonzero(q_ids[b] == x), np.flatnonzero(kv_ids[b] == x))
          for b in range(q_ids.shape[0]) for x in np.unique(q_ids[b][q_ids[b] >= 0])]


def _per_segment(xp, set_rows, q, k, v, q_ids, kv_ids, scale, causal, window, softcap, chunk=0):
  """BSHD (out, lse (b, h, s_q)): zeros / -inf, then each segment's dense attention (bottom-right aligned between its
  query and key positions) written into its query rows."""
  b, sq, h = q.shape[:3]
  out = xp.zeros((b, sq, h, v.shape[-1]), q.dtype)
  lse = xp.full((b, h, sq), -np.inf, q.dtype)
  for row, pq, pk in segment_rows(q_ids, kv_ids):
    if len(pk) == 0:
      continue
    o, l = _dense(xp, q[row:row + 1, pq], k[row:row + 1, pk], v[row:row + 1, pk], scale, causal, window, softcap,
                  chunk=chunk)
    out = set_rows(out, (row, pq), o[0])
    lse = set_rows(lse, (row, slice(None), pq), l[0].T)  # the int and the array index put the positions first
  return out, lse


def numpy_segment_attention(q, k, v, q_ids, kv_ids, scale=None, causal=False, window=(-1, -1), softcap=0.0, chunk=0):
  """float64 NumPy attention within segments of concrete ids: (out (b, s_q, h, d_v), lse (b, h, s_q)); chunk counts
  positions from each segment's start."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  return _per_segment(np, _numpy_set, q, k, v, q_ids, kv_ids, scale, causal, window, softcap, chunk)


def dense_segment_attention(q, k, v, q_ids, kv_ids, scale=None, causal=False, window=(-1, -1), softcap=0.0):
  """float32 JAX attention within segments (out in q's dtype, lse float32), differentiable: the gradient oracle."""
  out, lse = _per_segment(jnp, lambda x, index, value: x.at[index].set(value),
                          *(x.astype(jnp.float32) for x in (q, k, v)), q_ids, kv_ids, scale, causal, window, softcap)
  return out.astype(q.dtype), lse


def random_qkv(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v=None, dtype=jnp.float16):
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, seqlen_q, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, seqlen_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, seqlen_k, kv_heads, head_dim_v), jnp.float32).astype(dtype)
  return q, k, v


# ---- comparisons shared by the variable-length and segment-id tests --------------------------------------------

def assert_close(got, want, atol=2e-3):
  """Errors relative to the largest finite entry of `want` (at least 1); infinities must match exactly."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
  np.testing.assert_allclose(got, want, atol=atol * scale, rtol=0)


def assert_out_and_lse_close(out, lse, want_out, want_lse):
  """out as assert_close; lse -inf exactly where want_lse is, and close elsewhere."""
  assert_close(out, want_out)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=1e-4, rtol=1e-5)


def out_and_lse_loss(out_shape, lse_shape, seed=1):
  """loss(attention) -> f(q, k, v): a random weighting of attention's out and lse, so that gradients carry an lse
  cotangent too; rows without keys (lse = -inf) contribute nothing."""
  rng = np.random.default_rng(seed)
  w_out = jnp.asarray(rng.standard_normal(out_shape, np.float32))
  w_lse = jnp.asarray(rng.standard_normal(lse_shape, np.float32))

  def loss(attention):
    def f(q, k, v):
      o, l = attention(q, k, v)
      return jnp.sum(o.astype(jnp.float32) * w_out) + jnp.sum(jnp.where(jnp.isfinite(l), l * w_lse, 0.0))
    return f

  return loss


def mask_arguments(flash_kwargs):
  """The oracles' (causal, window, softcap) keywords for flash_attn_func's causal / window_size / softcap ones."""
  return dict(causal=flash_kwargs.get("causal", False), window=flash_kwargs.get("window_size", (-1, -1)),
              softcap=flash_kwargs.get("softcap", 0.0))
