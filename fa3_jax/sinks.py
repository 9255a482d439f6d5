"""Learnable attention sinks (gpt-oss): one extra logit per query head in every row's softmax, a key of score
sinks[h] and value 0 (docs/integration.md §4.11).

A sink changes a row's normaliser only, so it is exact to add it to attention computed without one:

  lse' = log(exp(lse) + exp(sink)),    out' = out * exp(lse - lse')

and the backward needs nothing new from the kernels: given out' and lse', the probabilities exp(s - lse') they
recompute are the sinked softmax's, and D = rowsum(dout * out') is its D (the sink's value is 0, so it adds no term).
Only the sinks' own gradient is added, summed over the batch and the rows:

  dsinks[h] = -sum over rows of exp(sink[h] - lse') * (D - dlse)

(dlse, the cotangent of lse', where lse is returned and used). A row with no visible key gets out' = 0, lse' = sink.
Both run as fused XLA elementwise passes and reductions over out and lse; the kernels never see the sinks.

out is (..., heads, head_dim_v) and lse (..., heads, rows) in either layout of the attention ops: BSHD
(batch, seqlen, heads, d_v) with lse (batch, heads, seqlen), or packed (total, heads, d_v) with lse (heads, total).
"""

from __future__ import annotations

import jax.numpy as jnp


def _rows_last(x):
  """out-shaped (..., rows, heads) per-row values against lse's (..., heads, rows), and back."""
  return jnp.swapaxes(x, -1, -2)


def apply(out, lse, sinks):
  """(out', lse') of attention with sinks from (out, lse) without; sinks (heads,) float32."""
  sinked = jnp.logaddexp(lse, sinks[:, None])
  # exp(lse - lse') is 0 where the row saw no key; the where keeps a -inf sink (no sink at all) from making NaN.
  nothing = jnp.isneginf(sinked)
  scale = jnp.where(nothing, 0.0, jnp.exp(lse - jnp.where(nothing, 0.0, sinked)))
  return (out.astype(jnp.float32) * _rows_last(scale)[..., None]).astype(out.dtype), sinked


def gradient(dout, out, lse, dlse, sinks):
  """dsinks (heads,) float32 of attention with sinks, given its out' and lse' (apply's results), the cotangent dout
  and the optional cotangent dlse of lse'."""
  delta = _rows_last(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1))
  if dlse is not None:
    delta = delta - dlse
  p_sink = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(sinks[:, None] - lse))
  heads_axis = lse.ndim - 2
  return -jnp.sum(p_sink * delta, axis=tuple(a for a in range(lse.ndim) if a != heads_axis))
