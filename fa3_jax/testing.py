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
  # Each step computed in float32 and rounded to dtype, as PyTorch does (JAX would first round 0.3 itself to dtype,
  # which makes the noise vanish wherever ref is exactly 0).
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  noise = rounded(rounded(rounded(ref) + np.float32(0.3)) - np.float32(0.3)) - rounded(ref)
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


def _poison_device_memory(nbytes: int) -> None:
  """Fill about nbytes of freed device memory with NaN, so that a kernel's unwritten output elements (which XLA
  allocates from that memory next) show up as NaN instead of stale plausible values."""
  jax.block_until_ready(jnp.full((max(nbytes // 4, 1),), jnp.nan, jnp.float32)).delete()


def check_kernel(dtype, head_dim: int, head_dim_v: int, seqlen_q: int, seqlen_k: int, *, batch: int = 2,
                 heads: int = 6, kv_heads: int = 6, causal: bool = False, window_size=(-1, -1),
                 softcap: float = 0.0, backward: bool = True, deterministic: bool = False,
                 seed: int = 0) -> list[tuple[bool, str]]:
  """Runs flash_attn_func (the kernel, on a GPU build) and the float32 reference on fresh random inputs and checks
  out, lse and (with backward) dq, dk, dv with the FA3 rule. Returns [(passed, message)]."""
  from fa3_jax import _validate, attention, reference  # late import: fa3_jax imports this module's siblings

  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, seqlen_q, heads, head_dim), jnp.float32)
  if softcap > 0:
    q = q * (softcap / 4)  # FA3's recipe: make the cap bite
  q = q.astype(dtype)
  k = jax.random.normal(keys[1], (batch, seqlen_k, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (batch, seqlen_k, kv_heads, head_dim_v), jnp.float32).astype(dtype)
  dout = jax.random.normal(keys[3], (batch, seqlen_q, heads, head_dim_v), jnp.float32).astype(dtype)
  kwargs = dict(causal=causal, window_size=window_size, softcap=softcap, deterministic=deterministic)
  cfg = _validate.attention_config(head_dim, None, causal, window_size, softcap, deterministic)

  as_f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  ours = jax.jit(lambda q, k, v: attention.flash_attn_func(q, k, v, return_lse=True, **kwargs))
  # The oracle: the blockwise reference on float32 copies of the same inputs, with its own blockwise backward
  # (memory linear in seqlen, cheap to compile), at full float32 matmul precision (JAX's default on GPUs is
  # TF32, whose 10-bit mantissa is no better than the fp16 kernel under test).
  highest = jax.default_matmul_precision("highest")
  ref_fwd = jax.jit(lambda q, k, v: reference.attention_forward(*as_f32(q, k, v), cfg))
  pt = jax.jit(lambda q, k, v: same_precision_attention(q, k, v, cfg))
  jax.block_until_ready(ours.lower(q, k, v).compile())
  _poison_device_memory(4 * q.size * 4)
  out, lse = ours(q, k, v)
  with highest:
    ref_out, ref_lse = ref_fwd(q, k, v)
  results = [fa3_check("out", out, ref_out, pt(q, k, v), softcap=softcap > 0)]
  lse, ref_lse_np = np.asarray(lse), np.asarray(ref_lse)
  same_inf = np.array_equal(np.isneginf(lse), np.isneginf(ref_lse_np))
  finite = np.isfinite(lse) & np.isfinite(ref_lse_np)
  lse_err = float(np.max(np.abs(lse[finite] - ref_lse_np[finite]), initial=0.0))
  results.append((same_inf and lse_err <= 1e-3, f"lse: -inf rows match {same_inf}, max error {lse_err:.2e}"))
  if backward:
    def grads(fn):
      return jax.jit(lambda q, k, v, dout: jax.vjp(fn, q, k, v)[1](dout))

    got = grads(lambda q, k, v: attention.flash_attn_func(q, k, v, **kwargs))(q, k, v, dout)
    with highest:
      want = jax.jit(lambda q, k, v, out, lse, dout: reference.attention_backward(
          *as_f32(q, k, v, out), lse, dout.astype(jnp.float32), cfg))(q, k, v, ref_out, ref_lse, dout)
    base = grads(lambda q, k, v: same_precision_attention(q, k, v, cfg))(q, k, v, dout)
    for name, g, w, b in zip(("dq", "dk", "dv"), got, want, base):
      results.append(fa3_check(name, g, w, b, softcap=softcap > 0, gradient=True))
  return results
