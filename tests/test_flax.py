"""fa3_jax.flax drop-ins and modules against Flax's stock attention (same params, equivalent masks)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import fa3_jax.flax.linen as fl
import fa3_jax.flax.nnx as fx

B, T, F, N = 2, 8, 64, 4


def _x(seed, shape=(B, T, F)):
  return jax.random.normal(jax.random.key(seed), shape)


def _close(a, b, atol=5e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol)


# ---- linen -----------------------------------------------------------------------------------------------------

def _linen_pair(attention_fn, mask_fn):
  stock = nn.MultiHeadDotProductAttention(num_heads=N)
  ours = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=attention_fn)
  x = _x(0)
  params = stock.init(jax.random.key(1), x)

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x, mask=mask_fn(x))))

  return stock, ours, params, x, loss


@pytest.mark.parametrize("mask_fn", [lambda x: nn.make_causal_mask(x[..., 0]), lambda x: None])
def test_linen_attention_fn_matches_stock_under_jit_and_grad(mask_fn):
  stock, ours, params, x, loss = _linen_pair(fl.attention_fn, mask_fn)
  for f in (lambda m: jax.jit(functools.partial(loss, m)), lambda m: jax.jit(jax.grad(functools.partial(loss, m)))):
    _close(f(ours)(params, x), f(stock)(params, x))


def test_linen_attention_fn_under_remat_and_padding_mask():
  valid = jnp.arange(T)[None] < jnp.array([[5], [8]])
  mask = nn.combine_masks(nn.make_attention_mask(valid, valid), nn.make_causal_mask(valid))

  class Block(nn.Module):
    fn: object

    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=self.fn)(x, mask=mask)

  x = _x(2)
  params = Block(nn.dot_product_attention).init(jax.random.key(3), x)
  run = lambda fn: jax.jit(jax.grad(lambda p: jnp.sum(nn.remat(Block)(fn).apply(p, x)[0, :5] ** 2)
                                     + jnp.sum(nn.remat(Block)(fn).apply(p, x)[1] ** 2)))(params)
  _close(run(fl.attention_fn), run(nn.dot_product_attention))


def test_linen_module_params_load_and_match_stock():
  stock = nn.MultiHeadDotProductAttention(num_heads=N)
  ours = fl.MultiHeadAttention(num_heads=N, causal=True)
  x = _x(4)
  params = stock.init(jax.random.key(5), x)
  ours_params = ours.init(jax.random.key(6), x)
  assert jax.tree.map(jnp.shape, nn.unbox(ours_params)) == jax.tree.map(jnp.shape, params)
  mask = nn.make_causal_mask(x[..., 0])
  f = lambda p: jnp.sum(jnp.cos(ours.apply(p, x)))
  g = lambda p: jnp.sum(jnp.cos(stock.apply(p, x, mask=mask)))
  _close(jax.jit(f)(params), g(params))
  _close(jax.jit(jax.grad(f))(params), jax.grad(g)(params))


# ---- nnx -------------------------------------------------------------------------------------------------------

def _nnx_pair(num_kv_heads=2, stock_fn=nnx.dot_product_attention, **ours_kw):
  stock = nnx.MultiHeadAttention(N, F, num_kv_heads=num_kv_heads, decode=False, attention_fn=stock_fn,
                                 rngs=nnx.Rngs(0))
  ours = fx.MultiHeadAttention(N, F, num_kv_heads=num_kv_heads, rngs=nnx.Rngs(1), **ours_kw)
  nnx.update(ours, nnx.state(stock, nnx.Param))
  return stock, ours


def _grads(model, x, **call_kw):
  return nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x, **call_kw)))))(model, x)


def test_nnx_attention_fn_gqa_is_causal_matches_stock():
  stock = nnx.MultiHeadAttention(N, F, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
  ours = nnx.MultiHeadAttention(N, F, num_kv_heads=2, decode=False, attention_fn=fx.attention_fn,
                                rngs=nnx.Rngs(0))
  x = _x(7)
  for kw in (dict(is_causal=True), dict(mask=nnx.make_causal_mask(x[..., 0])), dict()):
    _close(nnx.jit(lambda m, x: m(x, **kw))(ours, x), stock(x, **kw))
    _close(_grads(ours, x, **kw), _grads(stock, x, **kw))


def test_nnx_module_gqa_rotary_matches_stock_with_rope_under_remat():
  rope_fn = functools.partial(nnx.dot_product_attention_with_rope, rope=nnx.RoPE())
  stock, ours = _nnx_pair(stock_fn=rope_fn, causal=True, rope_theta=10000.0)
  x = _x(8)
  _close(ours(x), stock(x, is_causal=True))
  remat_loss = lambda m, x, **kw: jnp.sum(jnp.sin(nnx.remat(lambda m, x: m(x, **kw))(m, x)))
  g = nnx.jit(nnx.grad(remat_loss))(ours, x)
  g_ref = nnx.grad(lambda m, x: remat_loss(m, x, is_causal=True))(stock, x)
  _close(g, g_ref)


def test_nnx_module_window_and_seq_lengths_match_stock_masks():
  stock, ours = _nnx_pair(local_window_size=(3, 0))
  x = _x(9)
  lengths = jnp.array([5, 8], jnp.int32)
  valid = jnp.arange(T)[None] < lengths[:, None]
  band = (jnp.arange(T)[:, None] - jnp.arange(T)[None] <= 3) & (jnp.arange(T)[:, None] >= jnp.arange(T)[None])
  mask = nnx.make_attention_mask(valid, valid) * band
  out = nnx.jit(lambda m, x: m(x, query_seq_lengths=lengths, key_value_seq_lengths=lengths))(ours, x)
  ref = stock(x, mask=mask)
  _close(out[0, :5], ref[0, :5])
  _close(out[1], ref[1])


def test_bf16_module_close_to_float32_stock():
  stock, ours = _nnx_pair(dtype=jnp.bfloat16, causal=True)
  x = _x(10)
  np.testing.assert_allclose(ours(x).astype(jnp.float32), stock(x, is_causal=True), atol=5e-2)


def test_unexpressible_masks_and_dropout_raise_with_guidance():
  ours = nnx.MultiHeadAttention(N, F, decode=False, attention_fn=fx.attention_fn, rngs=nnx.Rngs(0))
  x = _x(11)
  checker = (jnp.add.outer(jnp.arange(T), jnp.arange(T)) % 2 == 0)[None, None]
  with pytest.raises(ValueError, match="is_causal=True"):
    ours(x, mask=checker)
  with pytest.raises(ValueError, match="traced data"):
    nnx.jit(lambda m, x: m(x, mask=nnx.make_attention_mask(x[..., 0] > 0, x[..., 0] > 0)))(ours, x)
  dropping = nnx.MultiHeadAttention(N, F, decode=False, dropout_rate=0.1, attention_fn=fx.attention_fn,
                                    rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="no dropout"):
    dropping(x, deterministic=False)
  fallback = nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(0),
                                    attention_fn=fx.make_attention_fn(dense_mask_fallback=True))
  stock = nnx.MultiHeadAttention(N, F, decode=False, rngs=nnx.Rngs(0))
  valid = x[..., 0] > -0.5
  data_mask = nnx.make_attention_mask(valid, valid)
  out = nnx.jit(lambda m, x, k: m(x, mask=k))(fallback, x, data_mask)
  _close(out[valid], stock(x, mask=data_mask)[valid], atol=1e-4)  # rows with no visible key differ by design


# ---- 8 fake devices, sharded params ----------------------------------------------------------------------------

def test_nnx_module_with_sharded_params_on_8_devices_matches_stock():
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("heads", "model"), ("embed", None), ("kv", None), ("length", None))
  stock, ours = _nnx_pair(num_kv_heads=4, causal=True)
  x = _x(12, (4, T, F))
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(nnx.state(fx.MultiHeadAttention(N, F, num_kv_heads=4, rngs=nnx.Rngs(2)),
                                             nnx.Param))
  assert specs["query"]["kernel"].get_value() == P(None, "model", None)
  shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), nnx.to_pure_dict(specs))
  state = nnx.state(ours, nnx.Param)
  placed = jax.device_put(nnx.to_pure_dict(state), shardings)
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(ours, state)
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
  out = nnx.jit(lambda m, x: m(x))(ours, xs)
  _close(out, stock(x, is_causal=True))
  _close(_grads(ours, xs), _grads(stock, x, is_causal=True))
  assert placed["query"]["kernel"].sharding.spec == P(None, "model", None)
  assert len(placed["query"]["kernel"].sharding.device_set) == 8
