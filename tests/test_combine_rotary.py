"""flash_attn_combine against attention over all keys at once, and the rotary rule against complex multiplication
(NumPy oracles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import rotary


def _np_attention(q, k, v, visible):
  """(out, lse) of q (b, t, h, d), k / v (b, s, h, d) with a (t, s) visibility mask, float64."""
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(visible, s, -np.inf)
  top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
  top = np.where(np.isfinite(top), top, 0.0)
  p = np.exp(s - top)
  z = p.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", p / np.where(z > 0, z, 1.0), v)
  lse = np.where(z[..., 0] > 0, np.log(np.where(z[..., 0] > 0, z[..., 0], 1.0)) + top[..., 0], -np.inf)
  return out, lse


def test_combine_equals_attention_over_all_keys():
  rng = np.random.default_rng(0)
  b, t, s, h, d = 2, 5, 37, 3, 16
  q, k, v = (rng.standard_normal(shape) for shape in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))
  # Row 0 sees no key at all; the others see a causal-like prefix, so some parts are empty for some rows.
  visible = np.arange(s)[None, :] < np.array([0, 3, 11, 30, 37])[:, None]
  want_out, want_lse = _np_attention(q, k, v, visible)
  bounds = [0, 4, 13, 13, 29, 37]  # one empty split
  parts = [_np_attention(q, k[:, lo:hi], v[:, lo:hi], visible[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
  out_partial = np.stack([o for o, _ in parts]).astype(np.float32)
  lse_partial = np.stack([l for _, l in parts]).astype(np.float32)
  out, lse = fa3_jax.flash_attn_combine(out_partial, lse_partial, return_lse=True)
  assert out.dtype == jnp.float32 and out.shape == (b, t, h, d) and lse.shape == (b, h, t)
  np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5)
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
  finite = np.isfinite(want_lse)
  np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, 0], 0.0)  # the row no part saw


def test_combine_one_split_is_identity_and_casts():
  rng = np.random.default_rng(1)
  o = rng.standard_normal((1, 2, 3, 4, 8)).astype(np.float32)
  lse = rng.standard_normal((1, 2, 4, 3)).astype(np.float32)
  out = fa3_jax.flash_attn_combine(o, lse, out_dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(o[0]).astype(jnp.bfloat16)))


def test_combine_under_jit_and_grad():
  rng = np.random.default_rng(2)
  o = jnp.asarray(rng.standard_normal((3, 1, 2, 2, 4)), jnp.float32)
  lse = jnp.asarray(rng.standard_normal((3, 1, 2, 2)), jnp.float32)
  out = jax.jit(fa3_jax.flash_attn_combine)(o, lse)
  np.testing.assert_allclose(np.asarray(out), np.asarray(fa3_jax.flash_attn_combine(o, lse)), rtol=1e-6)
  g = jax.grad(lambda o: fa3_jax.flash_attn_combine(o, lse).sum())(o)
  # d out / d out_s is the split's weight; the weights of a row sum to 1.
  np.testing.assert_allclose(np.asarray(g.sum(0)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(out_partial=np.zeros((2, 1, 3, 4))), "out_partial must have shape"),
    (dict(lse_partial=np.zeros((2, 1, 3, 4))), "lse_partial must have shape"),
    (dict(out_partial=np.zeros((2, 1, 3, 4, 8), np.int32)), "out_partial must be a float array"),
    (dict(out_partial=np.zeros((0, 1, 3, 4, 8)), lse_partial=np.zeros((0, 1, 4, 3))), "at least one split"),
])
def test_combine_argument_errors(bad, match):
  args = dict(out_partial=np.zeros((2, 1, 3, 4, 8), np.float32), lse_partial=np.zeros((2, 1, 4, 3), np.float32))
  args.update(bad)
  with pytest.raises((TypeError, ValueError), match=match):
    fa3_jax.flash_attn_combine(**args)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotate_is_complex_multiplication(interleaved, rotary_dim):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  angles = rng.uniform(-4, 4, (2, 5, rotary_dim // 2))
  got = np.asarray(rotary.rotate(jnp.asarray(x), jnp.cos(angles), jnp.sin(angles), interleaved))
  half = rotary_dim // 2
  pairs = (x[..., 0:rotary_dim:2] + 1j * x[..., 1:rotary_dim:2]) if interleaved else (
      x[..., :half] + 1j * x[..., half:rotary_dim])
  turned = pairs * np.exp(1j * angles)[:, :, None, :]
  want = x.copy()
  if interleaved:
    want[..., 0:rotary_dim:2], want[..., 1:rotary_dim:2] = turned.real, turned.imag
  else:
    want[..., :half], want[..., half:rotary_dim] = turned.real, turned.imag
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])  # features past rotary_dim pass
