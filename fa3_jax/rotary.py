"""Rotary position embedding (RoFormer): the one rotation rule of the package, used by flash_attn_with_kvcache
(FlashAttention's cos / sin tables) and by the Flax modules (fa3_jax.flax.apply_rotary, angles from a base)."""

from __future__ import annotations

import jax.numpy as jnp


def rotate(x, cos, sin, interleaved: bool):
  """x rotated by the angles whose cosines and sines are cos / sin, computed in float32, in x's dtype.

  x: (..., rows, heads, head_dim); cos, sin: (..., rows, rotary_dim / 2), broadcastable against x without its
  heads axis, with rotary_dim <= head_dim and even. Feature pair j (j < rotary_dim / 2) turns by angle j: the pair
  (x[2j], x[2j + 1]) when `interleaved` (GPT-J), else (x[j], x[j + rotary_dim / 2]) ("rotate half", GPT-NeoX /
  LLaMA). Features from rotary_dim on pass unchanged.
  """
  half = cos.shape[-1]
  cos = cos.astype(jnp.float32)[..., None, :]
  sin = sin.astype(jnp.float32)[..., None, :]
  rot, rest = x[..., : 2 * half].astype(jnp.float32), x[..., 2 * half:]
  if interleaved:
    a, b = rot[..., 0::2], rot[..., 1::2]
    turned = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
  else:
    a, b = rot[..., :half], rot[..., half:]
    turned = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return jnp.concatenate([turned.astype(x.dtype), rest], axis=-1)
