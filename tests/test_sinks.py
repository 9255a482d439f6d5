"""Learnable attention sinks on the reference path against the dense oracle (an extra logit per head in the
softmax, written straight from the semantics): out, lse, a fully masked row, gradients in q, k, v and the sinks, every
entry point (flash_attn_func, varlen, segment ids, kvcache, dot_product_attention, the Flax modules), vmap, sharding
and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax.testing import collectives
from oracle import assert_close, assert_out_and_lse_close, dense_attention, dense_varlen_attention, mask_arguments
from oracle import numpy_attention, numpy_varlen_attention, random_qkv


def random_sinks(seed, heads, scale):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(heads) * scale, jnp.float32)


MASKS = {"none": {}, "causal": dict(causal=True), "local": dict(window_size=(9, 3)),
         "softcap": dict(causal=True, softcap=5.0)}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("sq,sk,heads,kv_heads", [(17, 17, 4, 4), (1, 113, 6, 2), (40, 23, 4, 1)])
def test_forward_matches_the_oracle(mask, scale, sq, sk, heads, kv_heads):
  q, k, v = random_qkv(0, 2, sq, sk, heads, kv_heads, 32)
  sinks = random_sinks(1, heads, scale)
  out, lse = fa3_jax.flash_attn_func(q, k, v, return_lse=True, sinks=sinks, **MASKS[mask])
  assert_out_and_lse_close(out, lse, *numpy_attention(q, k, v, sinks=sinks, **mask_arguments(MASKS[mask])))


def test_rows_that_see_no_key_give_zero_and_the_sink():
  # causal with seqlen_q > seqlen_k: the first 9 rows sit before every key.
  q, k, v = random_qkv(2, 1, 20, 11, 3, 3, 16)
  sinks = jnp.asarray([0.25, -3.0, 7.5], jnp.float32)
  out, lse = fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True, sinks=sinks)
  np.testing.assert_array_equal(np.asarray(out[:, :9], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(lse[:, :, :9]), np.broadcast_to(np.asarray(sinks)[None, :, None],
                                                                            (1, 3, 9)))


@pytest.mark.parametrize("mask", ["none", "causal", "softcap"])
def test_gradients_in_q_k_v_and_the_sinks_match_the_oracle(mask):
  q, k, v = random_qkv(3, 2, 19, 29, 4, 2, 16)
  sinks = random_sinks(4, 4, 3.0)
  w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 19, 4, 16)), jnp.float32)
  w_lse = jnp.asarray(np.random.default_rng(6).standard_normal((2, 4, 19)), jnp.float32)

  def loss(attention):
    def f(q, k, v, sinks):
      out, lse = attention(q, k, v, sinks)
      return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(lse * w_lse)
    return f

  ours = loss(lambda q, k, v, s: fa3_jax.flash_attn_func(q, k, v, return_lse=True, sinks=s, **MASKS[mask]))
  oracle = loss(lambda q, k, v, s: dense_attention(q, k, v, sinks=s, return_lse=True, **mask_arguments(MASKS[mask])))
  got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
  want = jax.grad(oracle, argnums=(0, 1, 2, 3))(*(x.astype(jnp.float32) for x in (q, k, v)), sinks)
  for g, x_want, x in zip(got, want, (q, k, v, sinks)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, x_want, atol=4e-3)
  assert np.abs(np.asarray(got[3])).min() > 0  # every head's sink takes part


def test_sinks_gradient_converts_to_their_dtype():
  q, k, v = random_qkv(7, 1, 8, 8, 2, 2, 16)
  sinks = jnp.asarray([0.5, -0.5], jnp.bfloat16)
  g = jax.grad(lambda s: fa3_jax.flash_attn_func(q, k, v, sinks=s).astype(jnp.float32).sum())(sinks)
  assert g.dtype == jnp.bfloat16 and g.shape == (2,)


def test_varlen_matches_the_per_sequence_oracle_and_uncovered_rows_get_the_sink():
  cu_q, cu_k = np.asarray([0, 5, 5, 22], np.int32), np.asarray([0, 9, 12, 12], np.int32)
  q, k, v = random_qkv(8, 1, 25, 14, 4, 2, 16)
  q, k, v = q[0], k[0], v[0]
  sinks = random_sinks(9, 4, 2.0)
  out, lse = fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 9, causal=True, return_lse=True, sinks=sinks)
  want = numpy_varlen_attention(q, k, v, cu_q, cu_k, 17, 9, causal=True, sinks=sinks)
  assert_out_and_lse_close(out, lse, *want)
  np.testing.assert_array_equal(np.asarray(lse[:, 22:]), np.broadcast_to(np.asarray(sinks)[:, None], (4, 3)))

  f = lambda q, k, v, s: jnp.sum(fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 9, causal=True,
                                                                sinks=s).astype(jnp.float32) ** 2)
  g = lambda q, k, v, s: jnp.sum(dense_varlen_attention(q, k, v, cu_q, cu_k, 17, 9, causal=True,
                                                        sinks=s)[0].astype(jnp.float32) ** 2)
  for got, want in zip(jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, sinks),
                       jax.grad(g, argnums=(0, 1, 2, 3))(*(x.astype(jnp.float32) for x in (q, k, v)), sinks)):
    assert_close(got, want, atol=4e-3)


def test_segment_ids_with_sinks_equal_each_segment_alone():
  q, k, v = random_qkv(10, 1, 24, 24, 2, 2, 16)
  ids = np.asarray([[0] * 10 + [1] * 14], np.int32)
  sinks = random_sinks(11, 2, 2.0)
  out = fa3_jax.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, max_segments=2, sinks=sinks)
  for lo, hi in ((0, 10), (10, 24)):
    want, _ = numpy_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], causal=True, sinks=sinks)
    assert_close(out[:, lo:hi], want)


@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_kvcache_with_sinks_matches_the_oracle(seqlen_q):
  # GQA 8 / 2 decoding runs packed (the sinks apply per query head after unpacking).
  q, k_cache, v_cache = random_qkv(12, 2, seqlen_q, 40, 8, 2, 32)
  sinks = random_sinks(13, 8, 3.0)
  lengths = np.asarray([40, 23], np.int32)
  out, lse = fa3_jax.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True,
                                             return_lse=True, sinks=sinks)
  for b, n in enumerate(lengths):
    want = numpy_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], causal=True, sinks=sinks)
    assert_out_and_lse_close(out[b:b + 1], lse[b:b + 1], *want)


def test_vmap_over_the_sinks_equals_a_loop():
  q, k, v = random_qkv(14, 1, 12, 12, 2, 2, 16)
  many = jnp.stack([random_sinks(s, 2, 2.0) for s in range(3)])
  got = jax.vmap(lambda s: fa3_jax.flash_attn_func(q, k, v, causal=True, sinks=s))(many)
  for i in range(3):
    assert_close(got[i], fa3_jax.flash_attn_func(q, k, v, causal=True, sinks=many[i]))


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
def test_head_sharded_sinks_match_unsharded_with_no_collectives_in_the_forward(mode):
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(mode, mode))
  q, k, v = random_qkv(15, 4, 16, 16, 8, 8, 16)
  sinks = random_sinks(16, 8, 2.0)
  spec = P("dp", None, "tp", None)
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
  args = (put(q, spec), put(k, spec), put(v, spec), put(sinks, P("tp")))
  f = lambda q, k, v, s: fa3_jax.flash_attn_func(q, k, v, causal=True, sinks=s)
  loss = lambda q, k, v, s: jnp.sum(f(q, k, v, s).astype(jnp.float32) ** 2)
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(*args).compile()
    out = compiled(*args)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
  assert sum(collectives(compiled.as_text()).values()) == 0, collectives(compiled.as_text())
  assert_close(out, numpy_attention(q, k, v, causal=True, sinks=sinks)[0])
  want = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
  for g, w in zip(grads, want):
    assert_close(g, w)


def test_shard_map_with_replicated_sinks_gives_the_summed_gradient():
  mesh = jax.make_mesh((8,), ("dp",), axis_types=(AxisType.Auto,))
  q, k, v = random_qkv(17, 8, 10, 10, 2, 2, 16)
  sinks = random_sinks(18, 2, 2.0)
  spec = P("dp")

  def loss(q, k, v, s):
    local = lambda q, k, v, s: jax.lax.psum(jnp.sum(fa3_jax.flash_attn_func(q, k, v, sinks=s).astype(jnp.float32)
                                                    ** 2), "dp")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=P())(q, k, v, s)

  dense = lambda q, k, v, s: jnp.sum(fa3_jax.flash_attn_func(q, k, v, sinks=s).astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(loss, argnums=3))(q, k, v, sinks)
  assert_close(got, jax.grad(dense, argnums=3)(q, k, v, sinks))


def test_dot_product_attention_takes_sinks():
  q, k, v = random_qkv(19, 2, 14, 14, 4, 2, 16)
  sinks = random_sinks(20, 4, 2.0)
  out = fa3_jax.dot_product_attention(q, k, v, is_causal=True, sinks=sinks)
  assert_close(out, numpy_attention(q, k, v, causal=True, sinks=sinks)[0])
  # The dense path (a bias) adds the sinks too.
  zero_bias = jnp.zeros((1, 1, 14, 14), jnp.float32)
  assert_close(fa3_jax.dot_product_attention(q, k, v, zero_bias, is_causal=True, sinks=sinks), out)


@pytest.mark.parametrize("sinks,error,match", [
    (np.zeros((3,), np.float32), ValueError, r"sinks must be a floating array of shape \(heads,\) = \(4,\)"),
    (np.zeros((4,), np.int32), ValueError, r"sinks must be a floating array.*got int32"),
    ([0.0] * 4, TypeError, "sinks must be an array"),
])
def test_bad_sinks_name_the_argument(sinks, error, match):
  q, k, v = random_qkv(21, 1, 8, 8, 4, 2, 16)
  with pytest.raises(error, match=match):
    fa3_jax.flash_attn_func(q, k, v, sinks=sinks)


def test_flax_modules_hold_sinks_as_a_parameter_and_take_attention_chunk():
  from flax import linen
  from flax import nnx
  from fa3_jax.flax import linen as fa3_linen
  from fa3_jax.flax import nnx as fa3_nnx

  x = jnp.asarray(np.random.default_rng(22).standard_normal((2, 20, 32)), jnp.float32)
  sinks = random_sinks(23, 4, 2.0)

  def want(project_q, project_k, project_v, project_out):
    q, k, v = project_q(x), project_k(x), project_v(x)
    return project_out(jnp.asarray(numpy_attention(q, k, v, causal=True, sinks=sinks, chunk=8)[0], jnp.float32))

  m = fa3_nnx.MultiHeadAttention(4, 32, causal=True, use_sinks=True, attention_chunk=8, rngs=nnx.Rngs(0))
  assert m.sinks.shape == (4,) and np.all(np.asarray(m.sinks[...]) == 0)
  m.sinks[...] = sinks
  assert_close(m(x), want(m.query, m.key, m.value, m.out), atol=1e-4)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  assert np.abs(np.asarray(grads.sinks[...])).min() > 0

  lm = fa3_linen.MultiHeadAttention(num_heads=4, causal=True, use_sinks=True, attention_chunk=8)
  params = linen.meta.unbox(lm.init(jax.random.PRNGKey(0), x)["params"])
  assert params["sinks"].shape == (4,)
  params = {**params, "sinks": sinks}
  dense = lambda name, axis=-1: (lambda y: linen.DenseGeneral(
      features=params[name]["kernel"].shape[-2:] if name != "out" else 32, axis=axis).apply(
          {"params": params[name]}, y))
  assert_close(lm.apply({"params": params}, x), want(dense("query"), dense("key"), dense("value"),
                                                     dense("out", axis=(-2, -1))), atol=1e-4)


def test_the_kernel_check_takes_sinks_and_chunks():
  # On CPU "ours" is the reference too: this runs the GPU tests' machinery (sinks' gradient, uncovered rows with
  # sinks) end to end.
  from fa3_jax import testing
  packing = testing.Packing((5, 0, 17), (9, 4, 17), extra_q=2)
  results = testing.check_kernel("float16", 32, 32, 17, 17, heads=4, kv_heads=2, causal=True, packing=packing,
                                 sinks_scale=3.0, attention_chunk=8)
  names = [msg.split(":")[0] for _, msg in results]
  assert names == ["out", "lse", "dq", "dk", "dv", "dsinks", "uncovered rows"]
  assert all(ok for ok, _ in results), results
