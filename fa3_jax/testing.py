"""Helpers for checking attention kernels the way FlashAttention-3 does (KERNELS.md §9.1); used by our GPU tests and
the self-check of `python -m fa3_jax`, and usable by anyone comparing an attention implementation with the reference.

The rule: an implementation passes if its error against the float32 reference is at most `rtol` times the error of
a plain same-precision implementation (`same_precision_attention`) plus `atol`, the output dtype's rounding noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax._config import AttentionConfig


def same_precision_attention(q, k, v, cfg: AttentionConfig):
  """Dense attention computed in the input precision (FA3's `pt` baseline): the softmax scale is applied to K, the
  scores, probabilities and output are rounded to the input dtype after each step. Returns out (b, s_q, h, d_v)."""
  dtype = q.dtype
  b, sq, h, _ = q.shape
  sk, hk = k.shape[1], k.shape[2]
  k = jnp.repeat(k, h // hk, axis=2)
  v = jnp.repeat(v, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, (k * cfg.softmax_scale).astype(dtype),
                 preferred_element_type=jnp.float32).astype(dtype)
  if cfg.softcap > 0:
    s = (cfg.softcap * jnp.tanh(s.astype(jnp.float32) / cfg.softcap)).astype(dtype)
  left, right = cfg.resolved_window(sq, sk)
  row = jnp.arange(sq)[:, None] + sk - sq
  col = jnp.arange(sk)[None, :]
  visible = (col >= row - left) & (col <= row + right)
  s = jnp.where(visible, s.astype(jnp.float32), -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  p = jnp.where(visible.any(axis=-1)[:, None], p, 0.0).astype(dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(dtype)


def fa3_tolerance(ref, pt, dtype, rtol: float, extra_atol: float = 0.0) -> float:
  """rtol * max|pt - ref| + atol with atol = 2 * the dtype's rounding noise near 0.3 (+ extra_atol)."""
  ref = np.asarray(ref, np.float32)
  noise = np.asarray((jnp.asarray(ref, dtype) + 0.3 - 0.3).astype(jnp.float32)) - ref
  atol = 2.0 * float(np.max(np.abs(noise), initial=0.0)) + extra_atol
  return rtol * float(np.max(np.abs(np.asarray(pt, np.float32) - ref), initial=0.0)) + atol


def fa3_check(name: str, out, ref, pt, *, softcap: bool, gradient: bool = False) -> tuple[bool, str]:
  """(passed, message) for `out` against `ref` under the FA3 rule: rtol 2 (3 with softcap); gradients get
  3e-4 more atol with softcap. NaN never passes."""
  rtol = 3.0 if softcap else 2.0
  extra = 3e-4 if (gradient and softcap) else 0.0
  out32 = np.asarray(jnp.asarray(out).astype(jnp.float32))
  err = float(np.max(np.abs(out32 - np.asarray(ref, np.float32)), initial=0.0))
  tol = fa3_tolerance(ref, pt, jnp.asarray(out).dtype, rtol, extra)
  passed = bool(np.isfinite(out32).all()) and err <= tol
  return passed, f"{name}: max error {err:.3e} vs allowed {tol:.3e}"
