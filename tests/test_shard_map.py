"""flash_attn_func inside jax.shard_map (default check_vma=True) over batch and heads on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import fa3_jax
from oracle import random_qkv


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py sets 8 CPU devices"
  return jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)


def assert_close(got, want):
  # jit and eager may round float16 differently by an ulp.
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-3, atol=2e-3)


def loss(q, k, v, **kwargs):
  return jnp.sum(fa3_jax.flash_attn_func(q, k, v, **kwargs).astype(jnp.float32) ** 2)


@pytest.mark.parametrize("kv_heads", [8, 4])
def test_forward_and_grad_over_batch_and_heads(mesh, kv_heads):
  q, k, v = random_qkv(0, 4, 40, 56, 8, kv_heads, 32)
  spec = P("dp", None, "tp", None)
  sharded = jax.shard_map(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True), mesh=mesh,
                          in_specs=(spec,) * 3, out_specs=spec)
  assert_close(jax.jit(sharded)(q, k, v), fa3_jax.flash_attn_func(q, k, v, causal=True))

  def sharded_loss(q, k, v):
    local = jax.shard_map(lambda q, k, v: jax.lax.psum(loss(q, k, v, causal=True), ("dp", "tp")), mesh=mesh,
                          in_specs=(spec,) * 3, out_specs=P())
    return local(q, k, v)

  got = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(lambda q, k, v: loss(q, k, v, causal=True), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert_close(g, w)


def test_lse_and_replicated_mqa_kv_inside_shard_map(mesh):
  # q sharded over heads, MQA K/V replicated (invariant): the result varies over tp and dK/dV arrive summed.
  q, k, v = random_qkv(1, 2, 16, 24, 4, 1, 32)
  body = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, return_lse=True)
  q_spec = P(None, None, "tp")
  out, lse = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(q_spec, P(), P()),
                                   out_specs=(q_spec, P(None, "tp"))))(q, k, v)
  ref_out, ref_lse = body(q, k, v)
  assert_close(out, ref_out)
  assert_close(lse, ref_lse)

  def sharded_loss(q, k, v):
    f = jax.shard_map(lambda q, k, v: jax.lax.psum(loss(q, k, v), "tp"), mesh=mesh,
                      in_specs=(q_spec, P(), P()), out_specs=P())
    return f(q, k, v)

  got = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert_close(g, w)
