"""custom_vjp gradients against jax.grad of the dense oracle, and composition with vmap, jit and remat."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from oracle import dense_attention, random_qkv

def assert_close_to_oracle(got, want, err_msg=""):
  """float16 results vs a float32 oracle: errors relative to the largest gradient entry (float16 rounds that to
  ~5e-4 relative, and sums over long sequences make entries large)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
  np.testing.assert_allclose(got, want, atol=2e-3 * scale, rtol=0, err_msg=err_msg)


def loss_grads(attention, q, k, v, dout, **kwargs):
  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, **kwargs).astype(jnp.float32) * dout)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def oracle_kwargs(kwargs):
  return dict(scale=kwargs.get("softmax_scale"), causal=kwargs.get("causal", False),
              window=kwargs.get("window_size", (-1, -1)), softcap=kwargs.get("softcap", 0.0))


def check_grads(seed, b, sq, sk, h, hk, d, dv=None, **kwargs):
  q, k, v = random_qkv(seed, b, sq, sk, h, hk, d, dv)
  dout = jax.random.normal(jax.random.PRNGKey(seed + 100), (b, sq, h, v.shape[-1]), jnp.float32)
  got = loss_grads(fa3_jax.flash_attn_func, q, k, v, dout, **kwargs)
  # The oracle runs on float32 copies of the same inputs, so its gradients are not rounded to float16.
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  want = loss_grads(functools.partial(dense_attention, **oracle_kwargs(kwargs)), q32, k32, v32, dout)
  for name, g, w, x in zip("qkv", got, want, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    assert_close_to_oracle(g, w, err_msg=f"d{name}")


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (17, 33), (64, 64), (113, 67), (1, 239), (239, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_grads_match_dense_oracle(seqlen_q, seqlen_k, causal):
  check_grads(0, 2, seqlen_q, seqlen_k, 4, 2, 32, causal=causal)


@pytest.mark.parametrize("window", [(7, 0), (12, 5), (-1, 3)])
def test_grads_sliding_window(window):
  check_grads(1, 1, 90, 70, 2, 1, 64, window_size=window)


@pytest.mark.parametrize("causal", [False, True])
def test_grads_softcap(causal):
  check_grads(2, 2, 41, 59, 3, 3, 32, softcap=2.0, causal=causal)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_grads_gqa_mqa_sum_over_group(heads, kv_heads):
  check_grads(3, 2, 50, 40, heads, kv_heads, 32, causal=True)


def test_grads_asymmetric_head_dims_and_scale():
  check_grads(4, 1, 30, 30, 2, 2, 192, 128, softmax_scale=0.05)


def test_rows_without_visible_keys_have_zero_gradients():
  q, k, v = random_qkv(5, 1, 40, 10, 2, 2, 32)
  dq, dk, dv = loss_grads(fa3_jax.flash_attn_func, q, k, v, jnp.ones((1, 40, 2, 32)), causal=True)
  assert np.all(np.asarray(dq[:, :30]) == 0)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in (dq, dk, dv))


def test_grad_through_lse():
  q, k, v = random_qkv(6, 1, 21, 35, 2, 1, 32)
  weights = jax.random.normal(jax.random.PRNGKey(7), (1, 2, 21))

  def loss(attention_lse, q, k, v):
    out, lse = attention_lse(q, k, v)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse * weights)

  def dense_with_lse(q, k, v):
    kk = jnp.repeat(k, 2, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(32)
    mask = jnp.asarray(np.tril(np.ones((21, 35), bool), 35 - 21))
    return dense_attention(q, k, v, causal=True), jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)

  got = jax.grad(functools.partial(loss, lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True,
                                                                                  return_lse=True)),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(functools.partial(loss, dense_with_lse), argnums=(0, 1, 2))(
      *(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w in zip(got, want):
    assert_close_to_oracle(g, w)


def test_qkvpacked_gradient_is_packed():
  q, k, v = random_qkv(8, 1, 19, 19, 2, 2, 32)
  packed = jnp.stack([q, k, v], axis=2)
  g = jax.grad(lambda x: fa3_jax.flash_attn_qkvpacked_func(x, causal=True).astype(jnp.float32).sum())(packed)
  gq, gk, gv = loss_grads(fa3_jax.flash_attn_func, q, k, v, jnp.ones((1, 19, 2, 32)), causal=True)
  assert g.shape == packed.shape
  np.testing.assert_array_equal(g, jnp.stack([gq, gk, gv], axis=2))


# ---- transformations ---------------------------------------------------------------------------------------

def stacked_qkv(n, seed=9):
  qs, ks, vs = zip(*(random_qkv(seed + i, 2, 23, 31, 4, 2, 32) for i in range(n)))
  return jnp.stack(qs), jnp.stack(ks), jnp.stack(vs)


def test_vmap_matches_loop():
  q, k, v = stacked_qkv(3)
  got = jax.jit(jax.vmap(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True)))(q, k, v)
  for i in range(3):
    np.testing.assert_array_equal(got[i], fa3_jax.flash_attn_func(q[i], k[i], v[i], causal=True))


def test_vmap_over_q_only_and_nested():
  q, k, v = stacked_qkv(2)
  fn = lambda q: fa3_jax.flash_attn_func(q, k[0], v[0], causal=True)
  got = jax.vmap(fn)(q)
  for i in range(2):
    np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(fn(q[i]), np.float32), atol=1e-3)
  nested = jax.vmap(jax.vmap(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v)))(q[:, None], k[:, None], v[:, None])
  np.testing.assert_allclose(np.asarray(nested[:, 0], np.float32),
                             np.asarray(jax.vmap(fa3_jax.flash_attn_func)(q, k, v), np.float32), atol=1e-3)


def test_vmap_of_grad_and_grad_of_vmap():
  q, k, v = stacked_qkv(3)
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()
  per_example = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  of_sum = jax.grad(lambda q, k, v: jax.vmap(loss)(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v)
  for i in range(3):
    single = jax.grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i])
    for a, b_, c in zip(per_example, of_sum, single):
      np.testing.assert_allclose(np.asarray(a[i], np.float32), np.asarray(c, np.float32), atol=1e-3)
      np.testing.assert_allclose(np.asarray(b_[i], np.float32), np.asarray(c, np.float32), atol=1e-3)


def test_jit_and_checkpoint_give_same_gradients():
  q, k, v = random_qkv(10, 2, 37, 37, 2, 2, 32)
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()
  plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  policy = jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")
  for f in (jax.checkpoint(loss), jax.checkpoint(loss, policy=policy)):
    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(got, plain):
      np.testing.assert_array_equal(a, b_)


def test_residuals_are_named_for_remat_policies():
  q, k, v = random_qkv(11, 1, 16, 16, 2, 2, 32)
  loss = lambda q: fa3_jax.flash_attn_func(q, k, v).astype(jnp.float32).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(jax.checkpoint(loss)))(q))
  for name in ("fa3_out", "fa3_lse", "fa3_q"):
    assert f"name={name}" in jaxpr


def test_forward_mode_is_not_supported():
  q, k, v = random_qkv(12, 1, 8, 8, 1, 1, 32)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda q: fa3_jax.flash_attn_func(q, k, v), (q,), (q,))


# ---- second order ------------------------------------------------------------------------------------------

def _first_order_loss(q, k, v):
  return fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()


@pytest.mark.parametrize("second_order", [
    lambda f, x: jax.grad(lambda x: jax.grad(f)(x).astype(jnp.float32).sum())(x),
    lambda f, x: jax.jit(jax.grad(lambda x: jax.grad(f)(x).astype(jnp.float32).sum()))(x),
    lambda f, x: jax.jvp(jax.grad(f), (x,), (x,)),
    lambda f, x: jax.jit(lambda x: jax.jvp(jax.grad(f), (x,), (x,)))(x),
    lambda f, x: jax.hessian(f)(x),
], ids=["grad_grad", "jit_grad_grad", "jvp_grad", "jit_jvp_grad", "hessian"])
@pytest.mark.parametrize("wrt", ["q", "k"])
def test_second_order_derivatives_raise_not_implemented(second_order, wrt):
  q, k, v = random_qkv(13, 1, 8, 8, 1, 1, 8)
  f = (lambda q: _first_order_loss(q, k, v)) if wrt == "q" else (lambda k: _first_order_loss(q, k, v))
  with pytest.raises(NotImplementedError, match="second-order derivatives of fa3_jax attention .* are not supported"):
    second_order(f, q if wrt == "q" else k)


def test_differentiating_the_vjp_in_its_cotangent_raises_not_implemented():
  q, k, v = random_qkv(14, 1, 8, 8, 1, 1, 8)
  _, vjp = jax.vjp(lambda q: fa3_jax.flash_attn_func(q, k, v), q)
  with pytest.raises(NotImplementedError, match="second-order derivatives"):
    jax.grad(lambda c: vjp(c)[0].astype(jnp.float32).sum())(jnp.ones_like(q))
