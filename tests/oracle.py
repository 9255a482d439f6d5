"""Independent oracles: dense attention written directly from the documented semantics.

`numpy_attention` works in float64 NumPy (the forward oracle); `dense_attention` is the same in float32 JAX so that
`jax.grad` of it is the gradient oracle. `numpy_varlen_attention` / `dense_varlen_attention` are their
variable-length counterparts: each packed sequence on its own, with the same dense attention. None shares code with
fa3_jax.
"""

import jax
import jax.numpy as jnp
import numpy as np


def visible_mask(seqlen_q, seqlen_k, causal=False, window=(-1, -1)):
  """(seqlen_q, seqlen_k) bool, bottom-right aligned; -1 = unbounded."""
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
  return mask


def _dense(xp, q, k, v, scale, causal, window, softcap):
  """Dense attention written straight from the semantics with array module xp: (out, lse)."""
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  k = xp.repeat(k, h // hk, axis=2)
  v = xp.repeat(v, h // hk, axis=2)
  s = xp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap > 0:
    s = softcap * xp.tanh(s / softcap)
  mask = xp.asarray(visible_mask(sq, sk, causal, window))
  any_visible = mask.any(-1)[:, None]
  m = xp.where(any_visible, xp.where(mask, s, -np.inf).max(-1, keepdims=True), 0)
  p = xp.where(mask, xp.exp(xp.where(mask, s, 0) - m), 0)
  l = p.sum(-1, keepdims=True)
  l_safe = xp.where(l > 0, l, 1)
  out = xp.einsum("bhqk,bkhd->bqhd", p / l_safe, v)
  lse = xp.where(l > 0, xp.log(l_safe) + m, -np.inf)[..., 0]
  return out, lse


def numpy_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0):
  """float64 NumPy (out (b, s_q, h, d_v), lse (b, h, s_q)); rows without visible keys give 0 and -inf."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  return _dense(np, q, k, v, scale, causal, window, softcap)


def dense_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0):
  """float32 JAX dense attention (out only, in q's dtype), differentiable: the gradient oracle."""
  out, _ = _dense(jnp, *(x.astype(jnp.float32) for x in (q, k, v)), scale, causal, window, softcap)
  return out.astype(q.dtype)


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


def _per_sequence(xp, set_rows, q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, scale, causal, window, softcap):
  """Packed (out (total_q, h, d_v), lse (h, total_q)): zeros / -inf, then each sequence's dense attention written
  into its rows by set_rows(array, rows, value)."""
  h, dv = q.shape[1], v.shape[-1]
  out = xp.zeros((q.shape[0], h, dv), q.dtype)
  lse = xp.full((h, q.shape[0]), -np.inf, q.dtype)
  for (oq, lq), (ok, lk) in zip(sequence_rows(cu_q, used_q, max_q, q.shape[0]),
                                sequence_rows(cu_k, used_k, max_k, k.shape[0])):
    if lq == 0 or lk == 0:  # no queries, or queries that see no key: 0 and -inf
      continue
    o, l = _dense(xp, q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk], scale, causal, window, softcap)
    out = set_rows(out, (slice(oq, oq + lq),), o[0])
    lse = set_rows(lse, (slice(None), slice(oq, oq + lq)), l[0])
  return out, lse


def _numpy_set(x, index, value):
  x[index] = value
  return x


def numpy_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q=None, used_k=None, scale=None, causal=False,
                           window=(-1, -1), softcap=0.0):
  """float64 NumPy per-sequence attention of packed q (total_q, h, d), k, v (total_k, h_k, d | d_v) with concrete
  cu_seqlens / seqused: (out (total_q, h, d_v), lse (h, total_q)); rows of no sequence give 0 and -inf."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  return _per_sequence(np, _numpy_set, q, k, v, cu_q, cu_k, max_q, max_k, used_q, used_k, scale, causal, window,
                       softcap)


def dense_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, used_q=None, used_k=None, scale=None, causal=False,
                           window=(-1, -1), softcap=0.0):
  """float32 JAX per-sequence attention (out in q's dtype, lse float32), differentiable: the varlen gradient
  oracle. cu_seqlens / seqused must be concrete."""
  out, lse = _per_sequence(jnp, lambda x, index, value: x.at[index].set(value),
                           *(x.astype(jnp.float32) for x in (q, k, v)), cu_q, cu_k, max_q, max_k, used_q, used_k,
                           scale, causal, window, softcap)
  return out.astype(q.dtype), lse


def random_qkv(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v=None, dtype=jnp.float16):
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, seqlen_q, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, seqlen_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, seqlen_k, kv_heads, head_dim_v), jnp.float32).astype(dtype)
  return q, k, v
