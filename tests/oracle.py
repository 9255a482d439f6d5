"""Independent oracles: dense attention written directly from the documented semantics.

`numpy_attention` works in float64 NumPy (the forward oracle); `dense_attention` is the same in float32 JAX so that
`jax.grad` of it is the gradient oracle. Neither shares code with fa3_jax.
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


def numpy_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0):
  """float64 (out (b, s_q, h, d_v), lse (b, h, s_q)); rows without visible keys give 0 and -inf."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  k = np.repeat(k, h // hk, axis=2)
  v = np.repeat(v, h // hk, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap > 0:
    s = softcap * np.tanh(s / softcap)
  mask = visible_mask(sq, sk, causal, window)
  s = np.where(mask, s, -np.inf)
  m = s.max(-1, keepdims=True)
  any_visible = np.isfinite(m)
  p = np.where(any_visible, np.exp(s - np.where(any_visible, m, 0)), 0)
  l = p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1), v)
  lse = np.where(l[..., 0] > 0, (np.log(np.where(l > 0, l, 1)) + np.where(any_visible, m, 0))[..., 0], -np.inf)
  return out, lse


def dense_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0):
  """float32 JAX dense attention (out only), differentiable: the gradient oracle."""
  dtype = q.dtype
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  b, sq, h, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  scale = 1 / np.sqrt(d) if scale is None else scale
  k = jnp.repeat(k, h // hk, axis=2)
  v = jnp.repeat(v, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if softcap > 0:
    s = softcap * jnp.tanh(s / softcap)
  mask = jnp.asarray(visible_mask(sq, sk, causal, window))
  s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(jnp.where(mask.any(-1)[:, None], s, 0.0), axis=-1)
  p = jnp.where(mask, p, 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v).astype(dtype)


def random_qkv(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, head_dim_v=None, dtype=jnp.float16):
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, seqlen_q, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, seqlen_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, seqlen_k, kv_heads, head_dim_v), jnp.float32).astype(dtype)
  return q, k, v
