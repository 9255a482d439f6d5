"""flash_attn_func under plain jax.jit with NamedSharding inputs (Auto and Explicit mesh axes) on 8 fake CPU devices:
batch/head sharding runs on local shards with no gathering, results and gradients equal the unsharded ones, GQA/MQA
under head sharding (kv_heads smaller than the head shards included), and a sharded sequence uses ring attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import _extension
from fa3_jax import sharding
from fa3_jax.testing import collectives
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout
from oracle import dense_attention, numpy_attention, random_qkv

MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def mesh_of(mode, shape=(2, 4), names=("dp", "tp")):
  return jax.make_mesh(shape, names, axis_types=(MODES[mode],) * len(names))


def assert_close(got, want, rel=2e-3):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, atol=rel * max(1.0, float(np.abs(want).max())), rtol=0)


def loss(q, k, v, **kwargs):
  return jnp.sum(fa3_jax.flash_attn_func(q, k, v, **kwargs).astype(jnp.float32) ** 2)


def oracle_grads(q, k, v, causal=False):
  f = lambda q, k, v: jnp.sum(dense_attention(q, k, v, causal=causal) ** 2)
  return jax.grad(f, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))


def run_sharded(mesh, q_spec, kv_spec, q, k, v, **kwargs):
  """Compile forward and gradient once on sharded inputs; returns (fwd hlo, grad hlo, out, grads)."""
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(q, q_spec), put(k, kv_spec), put(v, kv_spec))
  fwd = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, **kwargs))
  grad = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, **kwargs), argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    fwd_c, grad_c = fwd.lower(*args).compile(), grad.lower(*args).compile()
    return fwd_c.as_text(), grad_c.as_text(), fwd_c(*args), grad_c(*args)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 4)])
def test_batch_and_head_sharding_has_no_collectives_and_matches_unsharded(mode, heads, kv_heads):
  q, k, v = random_qkv(0, 4, 24, 40, heads, kv_heads, 16)
  spec = P("dp", None, "tp", None)
  fwd_hlo, grad_hlo, out, grads = run_sharded(mesh_of(mode), spec, spec, q, k, v, causal=True)
  assert sum(collectives(fwd_hlo).values()) == 0, collectives(fwd_hlo)
  assert sum(collectives(grad_hlo).values()) == 0, collectives(grad_hlo)
  assert out.sharding.spec == spec
  assert_close(out, numpy_attention(q, k, v, causal=True)[0])
  for g, w, x in zip(grads, oracle_grads(q, k, v, causal=True), (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, w)


def test_replicated_kv_is_sliced_locally_not_trusted():
  # q head-sharded, GQA K/V replicated: partition shards K/V like q (a local slice), so still no collective.
  q, k, v = random_qkv(1, 2, 16, 16, 8, 4, 16)
  fwd_hlo, grad_hlo, out, grads = run_sharded(mesh_of("auto"), P("dp", None, "tp"), P(), q, k, v)
  assert sum(collectives(fwd_hlo).values()) == 0, collectives(fwd_hlo)
  assert_close(out, numpy_attention(q, k, v)[0])
  for g, w in zip(grads, oracle_grads(q, k, v)):
    assert_close(g, w)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (8, 1), (12, 3)])
def test_gqa_with_fewer_kv_heads_than_head_shards(mode, heads, kv_heads):
  # kv_heads does not divide over the 4 head shards: each shard picks the kv heads its q heads read (12/3: the
  # groups straddle shards). dK/dV are summed over the head shards, the only collective (an all-reduce).
  q, k, v = random_qkv(2, 2, 16, 16, heads, kv_heads, 16)
  fwd_hlo, grad_hlo, out, grads = run_sharded(mesh_of(mode), P("dp", None, "tp"), P("dp"), q, k, v, causal=True)
  assert sum(collectives(fwd_hlo).values()) == 0, collectives(fwd_hlo)
  counts = collectives(grad_hlo)
  assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
  assert_close(out, numpy_attention(q, k, v, causal=True)[0])
  for g, w in zip(grads, oracle_grads(q, k, v, causal=True)):
    assert_close(g, w)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_sharded_sequence_uses_ring_attention(mode):
  q, k, v = random_qkv(3, 2, 32, 32, 4, 2, 16)
  spec = P("dp", "tp")
  fwd_hlo, grad_hlo, out, grads = run_sharded(mesh_of(mode), spec, spec, q, k, v, causal=True)
  for hlo in (fwd_hlo, grad_hlo):
    counts = collectives(hlo)
    assert counts["collective-permute"] > 0 and counts["all-gather"] == counts["all-to-all"] == 0, counts
  assert_close(out, numpy_attention(q, k, v, causal=True)[0])
  for g, w in zip(grads, oracle_grads(q, k, v, causal=True)):
    assert_close(g, w)


def test_lse_cotangent_vmap_and_sharding_compose():
  # lse used in the loss (the dlse backward), under vmap, with batch x heads sharded inputs.
  mesh = mesh_of("auto")
  q, k, v = random_qkv(4, 4, 16, 16, 8, 4, 16)
  stack = lambda x: jnp.stack([x, -x])

  def f(q, k, v):
    out, lse = fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(lse))

  def oracle(q, k, v):
    out, lse = numpy_attention(q, k, v, causal=True)
    return out, lse

  spec = NamedSharding(mesh, P(None, "dp", None, "tp"))
  args = [jax.device_put(stack(x), spec) for x in (q, k, v)]
  with jax.set_mesh(mesh):
    got = jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1, 2))))(*args)
  for i, sign in enumerate((1, -1)):
    xs = [jnp.asarray(sign * x, jnp.float32) for x in (q, k, v)]

    def dense(q, k, v):
      qf, kf, vf = q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
      s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) / 4.0
      s = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), s, -jnp.inf)
      lse = jax.nn.logsumexp(s, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), vf)
      return jnp.sum(out ** 2) + jnp.sum(jnp.sin(lse))

    want = jax.grad(dense, argnums=(0, 1, 2))(*xs)
    for g, w in zip(got, want):
      assert_close(g[i], w)


# ---- the kernel path (CUDA lowering on a CPU host, kernels pretended compiled) --------------------------------

ALL_KERNELS = frozenset((t, d, d) for t in ("bfloat16", "float16") for d in (64, 128))


@pytest.fixture
def kernels_compiled(monkeypatch):
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: ALL_KERNELS)


def kernel_calls(text):
  return re.findall(r"stablehlo.custom_call @(fa3_jax_\w+)\((.*)", text)


def test_kernels_inside_user_shard_map_lower_on_local_shards(kernels_compiled):
  mesh = mesh_of("auto")
  spec = P("dp", None, "tp", None)
  avals = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((4, 32, 8, 64), (4, 32, 4, 64), (4, 32, 4, 64))]
  body = lambda q, k, v: jax.lax.psum(loss(q, k, v, causal=True), ("dp", "tp"))
  f = jax.grad(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=P()), argnums=(0, 1, 2))
  calls = kernel_calls(jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text())
  assert sorted(c[0] for c in calls) == ["fa3_jax_bwd", "fa3_jax_fwd"]
  for _, call in calls:  # local shards: batch 4/2, heads 8/4 and kv heads 4/4
    assert "tensor<2x32x2x64xbf16>" in call and "tensor<2x32x1x64xbf16>" in call


def test_kernels_under_explicit_sharding_lower_on_local_shards(kernels_compiled):
  mesh = mesh_of("explicit")
  spec = P("dp", None, "tp", None)
  avals = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
           for s in ((4, 32, 8, 64), (4, 32, 4, 64), (4, 32, 4, 64))]
  f = jax.grad(lambda q, k, v: loss(q, k, v, causal=True), argnums=(0, 1, 2))
  with jax.set_mesh(mesh):
    calls = kernel_calls(jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text())
  assert sorted(c[0] for c in calls) == ["fa3_jax_bwd", "fa3_jax_fwd"]
  for _, call in calls:
    assert "tensor<2x32x2x64xbf16>" in call and "tensor<2x32x1x64xbf16>" in call


def test_auto_partition_callback_derives_kv_sharding_from_q_and_lowers_kernels(kernels_compiled):
  # Under Auto axes the kernels are placed by custom_partitioning at compile time (not visible in the StableHLO);
  # check the callback itself: K/V arrive replicated, it asks for them head-sharded like q, and its local
  # computation lowers to our kernel on local shapes.
  mesh = mesh_of("auto")
  cfg = AttentionConfig(softmax_scale=0.125, window_right=0)
  shape = lambda s, spec: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  args = [shape((4, 32, 8, 64), P("dp", None, "tp")), shape((4, 32, 4, 64), P()), shape((4, 32, 4, 64), P())]
  _, lower, results, arg_shardings = sharding._fwd_partition(cfg, jax.tree.structure(SequenceLayout()), mesh, args,
                                                             None)
  assert [s.spec for s in arg_shardings] == [P("dp", None, "tp", None)] * 3
  assert [s.spec for s in results] == [P("dp", None, "tp", None), P("dp", "tp", None)]
  local = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, 32, 2, 64), (2, 32, 1, 64), (2, 32, 1, 64))]
  (call,) = kernel_calls(jax.jit(lower).trace(*local).lower(lowering_platforms=("cuda",)).as_text())
  assert call[0] == "fa3_jax_fwd" and "window_right = 0 : i64" in call[1]
