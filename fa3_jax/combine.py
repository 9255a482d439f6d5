"""flash_attn_combine: attention over a union of key sets from the attention over each set (split-KV).

Each part s gives out_s = sum_j p_sj v_j / Z_s and lse_s = log Z_s over its keys. Over all keys,
lse = log sum_s exp(lse_s) and out = sum_s exp(lse_s - lse) out_s: the parts' outputs weighted by their share of the
softmax mass. A part with no visible key (lse_s = -inf) has weight 0; if no part has one, out = 0 and lse = -inf,
as in a single call.
"""

from __future__ import annotations

import jax.numpy as jnp

from fa3_jax import _validate


def combine_parts(out_partial, lse_partial):
  """(out, lse) float32 from out_partial (splits, ..., rows, heads, dim) and lse_partial (splits, ..., heads, rows)."""
  lse_partial = jnp.swapaxes(lse_partial.astype(jnp.float32), -1, -2)  # (splits, ..., rows, heads)
  top = jnp.max(lse_partial, axis=0)
  safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
  mass = jnp.sum(jnp.exp(lse_partial - safe_top), axis=0)
  lse = jnp.where(mass > 0, jnp.log(mass) + safe_top, -jnp.inf)
  weight = jnp.where(mass > 0, jnp.exp(lse_partial - jnp.where(mass > 0, lse, 0.0)), 0.0)
  out = jnp.sum(weight[..., None] * out_partial.astype(jnp.float32), axis=0)
  return out, jnp.swapaxes(lse, -1, -2)


def flash_attn_combine(out_partial, lse_partial, out_dtype=None, return_lse=False):
  """Merges attention computed over disjoint parts of the keys (split-KV, or several caches) into the attention over
  all of them.

  Args:
    out_partial: (num_splits, batch, seqlen, heads, head_dim_v) float array: each part's normalised output.
    lse_partial: (num_splits, batch, heads, seqlen) float array: each part's natural-log logsumexp, -inf for rows that
      saw no key of the part.
    out_dtype: the dtype of out; default float32.
    return_lse: also return the merged lse (batch, heads, seqlen) float32.

  Returns:
    out (batch, seqlen, heads, head_dim_v), or (out, lse). A row that no part saw gets out = 0 and lse = -inf.
    Pure JAX: differentiable, and runs under jit, vmap and sharding like any elementwise-and-reduce computation.
  """
  _validate.check_array("out_partial", out_partial, 5, "(num_splits, batch, seqlen, heads, head_dim_v)")
  _validate.check_array("lse_partial", lse_partial, 4, "(num_splits, batch, heads, seqlen)")
  for name, x in (("out_partial", out_partial), ("lse_partial", lse_partial)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be a float array, got {x.dtype}")
  s, b, t, h, _ = out_partial.shape
  if lse_partial.shape != (s, b, h, t):
    raise ValueError(f"lse_partial must have shape (num_splits, batch, heads, seqlen) = {(s, b, h, t)} to match "
                     f"out_partial {tuple(out_partial.shape)}, got {tuple(lse_partial.shape)}")
  if s == 0:
    raise ValueError("out_partial must have at least one split (dim 0), got 0")
  out_dtype = jnp.float32 if out_dtype is None else _validate.check_float_dtype("out_dtype", out_dtype)
  return_lse = _validate.check_bool("return_lse", return_lse)
  out, lse = combine_parts(out_partial, lse_partial)
  out = out.astype(out_dtype)
  return (out, lse) if return_lse else out

