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
from fa3_jax import jax_nn

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


def test_padding_lengths_and_known_padding_masks_run_the_kernels(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("dense path taken")
  monkeypatch.setattr(jax_nn, "_dense_attention", refuse)
  stock, ours = _nnx_pair(causal=True)
  x = _x(18)
  lengths = jnp.array([5, 8], jnp.int32)
  valid = jnp.arange(T)[None] < lengths[:, None]
  mask = nnx.make_attention_mask(valid, valid) * nnx.make_causal_mask(valid)
  # One (traced) lengths array for queries and keys: causal alignment provably as jax.nn's.
  out = nnx.jit(lambda m, x, n: m(x, query_seq_lengths=n, key_value_seq_lengths=n))(ours, x, lengths)
  ref = stock(x, mask=mask)
  _close(out[0, :5], ref[0, :5])
  _close(out[1], ref[1])
  # A padding mask known at trace time, through attention_fn: its lengths are read from it.
  drop_in = nnx.MultiHeadAttention(N, F, num_kv_heads=2, decode=False, attention_fn=fx.attention_fn,
                                   rngs=nnx.Rngs(0))
  nnx.update(drop_in, nnx.state(stock, nnx.Param))
  out = drop_in(x, mask=mask)
  _close(out[0, :5], ref[0, :5])
  _close(out[1], ref[1])


# Two rows of packed documents (id, length); -1 is padding.
DOCS = [[(0, 3), (1, 5)], [(4, 2), (-1, 6)]]


def _packed_docs():
  ids = np.full((B, T), -1, np.int32)
  positions = np.zeros((B, T), np.int32)
  for b, docs in enumerate(DOCS):
    start = 0
    for x, n in docs:
      ids[b, start:start + n], positions[b, start:start + n] = x, np.arange(n)
      start += n
  return ids, positions


@pytest.mark.parametrize("make", ["linen", "nnx", "nnx_dense_head_dim"])
def test_modules_with_segment_ids_equal_each_document_alone(make):
  # Packed causal rotary self-attention: every document as if it were run on its own, positions from 0.
  ids, positions = _packed_docs()
  x = _x(19)
  if make == "linen":
    module = fl.MultiHeadAttention(num_heads=N, causal=True, rope_theta=1e4)
    params = module.init(jax.random.key(0), x)
    run = lambda x, **kw: module.apply(params, x, **kw)
  else:  # head dim 16 runs the kernel path; qkv_features 40 (head dim 10) the dense float32 path
    module = fx.MultiHeadAttention(N, F, qkv_features=40 if make == "nnx_dense_head_dim" else None, causal=True,
                                   rope_theta=1e4, rngs=nnx.Rngs(0))
    run = lambda x, **kw: module(x, **kw)
  packed = jax.jit(lambda x, i, p: run(x, segment_ids=i, positions=p, max_segments=2))(x, ids, positions)
  for b, docs in enumerate(DOCS):
    start = 0
    for doc, n in docs:
      rows = slice(start, start + n)
      if doc >= 0:
        _close(packed[b, rows], run(x[b:b + 1, rows])[0], atol=1e-5)
      else:  # padding: no attention output, so only the (zero-initialised) output bias remains
        assert not np.asarray(packed[b, rows]).any()
      start += n


@pytest.mark.parametrize("kw,match", [
    (dict(mask=jnp.ones((B, 1, T, T), bool)), "segment_ids cannot be combined with mask"),
    (dict(query_seq_lengths=jnp.array([3, 8], jnp.int32)), "mark padding tokens with a negative segment id"),
    (dict(max_segments=0), "max_segments must be an int >= 1"),
])
def test_segment_ids_argument_errors(kw, match):
  ids, _ = _packed_docs()
  with pytest.raises(ValueError, match=match):
    _nnx_module()(_x(20), segment_ids=ids, **kw)


def test_segment_ids_need_self_attention_lengths():
  ids, _ = _packed_docs()
  with pytest.raises(ValueError, match="q_len and kv_len must be equal, got q_len=8, kv_len=10"):
    _nnx_module()(_x(20), _x(21, (B, T + 2, F)), segment_ids=ids)


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


# ---- argument checks: a clear exception naming the argument, at construction or trace time ----------------------

def _linen_module(**kw):
  return fl.MultiHeadAttention(**{"num_heads": N, **kw})


def _nnx_module(**kw):
  kw = {"num_heads": N, "in_features": F, **kw}
  return fx.MultiHeadAttention(kw.pop("num_heads"), kw.pop("in_features"), rngs=nnx.Rngs(0), **kw)


BAD_MODULE_ARGS = [
    (dict(causal="no"), TypeError, "causal"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
    (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap="30"), TypeError, "softcap"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    (dict(rope_theta=-1.0), ValueError, "rope_theta"),
    (dict(local_window_size="3"), TypeError, "local_window_size"),
    (dict(local_window_size=(-1, 0)), ValueError, "local_window_size"),
    (dict(qkv_features=30), ValueError, "qkv_features"),
    (dict(qkv_features=36, rope_theta=1e4), ValueError, "even head_dim"),
    (dict(out_features=0), ValueError, "out_features"),
    (dict(dense_mask_fallback="no"), TypeError, "dense_mask_fallback"),
    (dict(dtype=jnp.int32), TypeError, "dtype"),
]


@pytest.mark.parametrize("make", [_linen_module, _nnx_module], ids=["linen", "nnx"])
@pytest.mark.parametrize("kw, error, name", BAD_MODULE_ARGS, ids=[str(a[0]) for a in BAD_MODULE_ARGS])
def test_bad_module_arguments_raise_at_construction(make, kw, error, name):
  with pytest.raises(error, match=name):
    make(**kw)


def test_linen_odd_rotary_head_dim_from_the_inputs_raises_at_init():
  module = fl.MultiHeadAttention(num_heads=4, rope_theta=1e4)  # head_dim = 36 // 4 is only known from the inputs
  with pytest.raises(ValueError, match="even head_dim"):
    module.init(jax.random.key(0), jnp.ones((B, T, 36)))


BAD_ATTENTION_FN_ARGS = [
    (dict(is_causal="no"), TypeError, "is_causal"), (dict(scale=0.0), ValueError, "scale"),
    (dict(scale="0.1"), TypeError, "scale"), (dict(softcap=-2.0), ValueError, "softcap"),
    (dict(local_window_size=1.5), TypeError, "local_window_size"),
    (dict(dense_mask_fallback=1), TypeError, "dense_mask_fallback"),
]


@pytest.mark.parametrize("kw, error, name", BAD_ATTENTION_FN_ARGS, ids=[str(a[0]) for a in BAD_ATTENTION_FN_ARGS])
def test_bad_make_attention_fn_arguments_raise_at_construction(kw, error, name):
  with pytest.raises(error, match=name):
    fx.make_attention_fn(**kw)


_Q, _KV = (B, T, N, 16), (B, T, 2, 16)


BAD_QKV = [
    ((_Q, (1, T, 2, 16), (1, T, 2, 16)), "same batch dims"),  # a batch of 1 is not broadcast
    ((_Q, _KV[1:], _KV[1:]), "same batch dims"),
    ((_Q, (B, T, 3, 16), (B, T, 3, 16)), "multiple of key's and value's kv_heads"),
    ((_Q, _KV, (B, T, 1, 16)), "key and value must have the same kv_len and kv_heads"),
    ((_Q, _KV, (B, T + 1, 2, 16)), "key and value must have the same kv_len and kv_heads"),
    ((_Q, (B, T, 2, 8), (B, T, 2, 8)), "query and key must have the same head_dim"),
    (((B, T, 0, 16), (B, T, 0, 16), (B, T, 0, 16)), "kv_heads, both > 0"),
    ((_Q[2:], _KV[2:], _KV[2:]), "query must have shape"),
]


@pytest.mark.parametrize("shapes, match", BAD_QKV, ids=["x".join(map(str, s)) for s, _ in BAD_QKV])
def test_attention_fn_rejects_mismatched_qkv(shapes, match):
  q, k, v = (jnp.ones(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    fx.attention_fn(q, k, v)


def test_attention_fn_rejects_bad_types_masks_and_bias():
  q, k = jnp.ones(_Q), jnp.ones(_KV)
  with pytest.raises(TypeError, match="query must be a floating-point array"):
    fx.attention_fn(q.astype(jnp.int32), k, k)
  with pytest.raises(TypeError, match="dtype"):
    fx.attention_fn(q, k, k, dtype=jnp.int32)
  with pytest.raises(TypeError, match="is_causal"):
    fx.attention_fn(q, k, k, is_causal="yes")
  with pytest.raises(ValueError, match="mask must be broadcastable"):
    fx.attention_fn(q, k, k, mask=jnp.ones((B + 1, 1, T, T), bool))
  with pytest.raises(ValueError, match="bias must be broadcastable"):
    fx.attention_fn(q, k, k, bias=jnp.ones((1, 1, T + 1, T)))


def test_attention_fn_empty_batch_and_keys_give_zeros_of_the_right_shape():
  q, k = jnp.ones((0, 3, T, N, 16)), jnp.ones((0, 3, 0, 2, 16))  # reshape(-1, ...) cannot infer these batches
  assert fx.attention_fn(q, k, k).shape == q.shape
  q, k = jnp.ones(_Q), jnp.ones((B, 0, 2, 16))
  np.testing.assert_array_equal(fx.attention_fn(q, k, k), np.zeros(_Q))


def _linen_call(*args, rope=True, **kw):
  module = fl.MultiHeadAttention(num_heads=N, rope_theta=1e4 if rope else None)
  return module.init(jax.random.key(0), *args, **kw)


def _nnx_call(*args, rope=True, **kw):
  return fx.MultiHeadAttention(N, F, rope_theta=1e4 if rope else None, rngs=nnx.Rngs(0))(*args, **kw)


BAD_CALLS = [
    ((), dict(mask=jnp.ones((B + 1, 1, T, T), bool)), ValueError, "mask"),
    ((), dict(mask=jnp.ones((1, T, T), bool)), ValueError, "mask"),
    ((), dict(query_seq_lengths=jnp.array([5.0, 8.0])), TypeError, "query_seq_lengths"),
    ((), dict(query_seq_lengths=5), ValueError, "query_seq_lengths"),
    ((), dict(key_value_seq_lengths=jnp.ones((B, 1), jnp.int32)), ValueError, "key_value_seq_lengths"),
    ((), dict(positions=jnp.arange(T + 1)), ValueError, "positions"),
    ((), dict(positions=jnp.zeros((B + 1, T), jnp.int32)), ValueError, "positions"),
    ((), dict(positions=jnp.arange(T) * 1.0), TypeError, "positions"),
    ((jnp.ones((B, T + 2, F)),), dict(kv_positions=jnp.arange(T)), ValueError, "kv_positions"),
    ((), dict(positions=jnp.arange(T), rope=False), ValueError, "rope_theta=None"),
    ((jnp.ones((1, T, F)),), {}, ValueError, "same batch size"),
    ((jnp.ones((B, T, F)), jnp.ones((B, T + 1, F))), {}, ValueError, "inputs_k and inputs_v must have the same kv_len"),
    ((jnp.ones((B, T, 2, F)),), {}, ValueError, "inputs_k must have shape"),
]


@pytest.mark.parametrize("call", [_linen_call, _nnx_call], ids=["linen", "nnx"])
@pytest.mark.parametrize("args, kw, error, match", BAD_CALLS, ids=[f"{a[3]}-{i}" for i, a in enumerate(BAD_CALLS)])
def test_bad_module_call_arguments_raise(call, args, kw, error, match):
  with pytest.raises(error, match=match):
    call(_x(13), *args, **kw)


@pytest.mark.parametrize("call", [_linen_call, _nnx_call], ids=["linen", "nnx"])
def test_module_rejects_inputs_q_without_a_batch(call):
  with pytest.raises(ValueError, match="inputs_q must have shape"):
    call(_x(14, (T, F)))


def test_nnx_module_rejects_inputs_with_other_features():
  with pytest.raises(ValueError, match="in_features = 64"):
    _nnx_call(_x(15, (B, T, F // 2)))
  with pytest.raises(ValueError, match="in_kv_features = 64"):
    _nnx_call(_x(15), _x(16, (B, T, F + 8)))


def test_module_accepts_broadcast_positions_and_lengths_as_lists():
  model = _nnx_module(rope_theta=1e4)
  x = _x(17)
  _close(model(x, positions=jnp.arange(T)[None], query_seq_lengths=[5, 8]),
         model(x, query_seq_lengths=jnp.array([5, 8], jnp.int32)))


def test_apply_rotary_checks_head_dim_and_positions():
  with pytest.raises(ValueError, match="even head_dim"):
    fx.apply_rotary(jnp.ones((B, T, N, 9)), jnp.arange(T))
  with pytest.raises(TypeError, match="positions must be an integer array"):
    fx.apply_rotary(jnp.ones((B, T, N, 8)), jnp.arange(T) * 0.5)
