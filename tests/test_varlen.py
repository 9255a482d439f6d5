"""flash_attn_varlen_func on the reference path (CPU): against the independent per-sequence oracle and per-sequence
flash_attn_func, the dense reference with per-batch lengths, composition with jit / vmap / remat / shard_map /
sharding, and argument errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import reference
from fa3_jax import testing
from fa3_jax._config import AttentionConfig
from oracle import assert_close, assert_out_and_lse_close, dense_attention, dense_varlen_attention, numpy_attention, \
    numpy_varlen_attention, out_and_lse_loss, sequence_rows


def cu(lengths):
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed(seed, lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v=None, extra_q=0, extra_k=0,
           dtype=jnp.float16):
  """Random packed q (total_q, heads, head_dim), k, v (total_k, kv_heads, ...) with `extra` rows after the
  sequences' allotments, and cu_seqlens_q / cu_seqlens_k."""
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  rng = np.random.default_rng(seed)
  total_q, total_k = sum(lengths_q) + extra_q, sum(lengths_k) + extra_k
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
             for shape in ((total_q, heads, head_dim), (total_k, kv_heads, head_dim), (total_k, kv_heads, head_dim_v)))
  return q, k, v, cu(lengths_q), cu(lengths_k)


def uncovered(cu_seqlens, seqused, max_seqlen, total):
  """(total,) bool: rows that belong to no sequence."""
  rows = np.ones(total, bool)
  for offset, length in sequence_rows(cu_seqlens, seqused, max_seqlen, total):
    rows[offset:offset + length] = False
  return rows


def oracle_kwargs(kwargs):
  return dict(scale=kwargs.get("softmax_scale"), causal=kwargs.get("causal", False),
              window=kwargs.get("window_size", (-1, -1)), softcap=kwargs.get("softcap", 0.0))


# name: (lengths_q, lengths_k, heads, kv_heads, head_dim, options); options: seqused, extra rows, max_seqlen, mask.
CASES = {
    "mha_no_mask": ((0, 1, 17, 113, 128), (0, 1, 17, 113, 128), 4, 4, 64, {}),
    "gqa_causal_cross": ((1, 17, 113, 0, 5), (128, 17, 1, 9, 0), 4, 2, 32, dict(causal=True)),
    "mqa_local": ((113, 17, 128), (113, 40, 128), 4, 1, 32, dict(window_size=(31, 7))),
    "softcap_causal": ((17, 113, 1), (17, 113, 64), 2, 2, 32, dict(causal=True, softcap=5.0)),
    "seqused_gaps_long_bounds": ((40, 17, 113), (50, 20, 128), 4, 2, 32,
                                 dict(seqused_q=(33, 0, 100), seqused_k=(50, 3, 77), extra_q=11, extra_k=5,
                                      max_seqlen=(200, 250), causal=True, window_size=(20, -1))),
    "head_dims_192x128": ((17, 1), (17, 30), 2, 1, 192, dict(head_dim_v=128, causal=True)),
    "long_1023": ((1023, 17), (1023, 17), 2, 1, 32, dict(causal=True)),
}


def case_inputs(name, seed=0):
  """(q, k, v, varlen keyword arguments, attention keyword arguments, oracle arguments) of CASES[name]."""
  lq, lk, h, hk, d, options = CASES[name]
  options = dict(options)
  used_q, used_k = options.pop("seqused_q", None), options.pop("seqused_k", None)
  extra_q, extra_k = options.pop("extra_q", 0), options.pop("extra_k", 0)
  dv = options.pop("head_dim_v", None)
  max_q, max_k = options.pop("max_seqlen", (max(lq), max(lk)))
  q, k, v, cu_q, cu_k = packed(seed, lq, lk, h, hk, d, dv, extra_q, extra_k)
  if options.get("softcap"):
    q = q * 2
  used = lambda x: None if x is None else np.asarray(x, np.int32)
  layout = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                seqused_q=used(used_q), seqused_k=used(used_k))
  oracle_args = (cu_q, cu_k, max_q, max_k, used(used_q), used(used_k))
  return q, k, v, layout, options, oracle_args


def varlen(q, k, v, layout, **kwargs):
  return fa3_jax.flash_attn_varlen_func(q, k, v, **layout, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_per_sequence_oracle(name):
  q, k, v, layout, kwargs, oracle_args = case_inputs(name)
  out, lse = varlen(q, k, v, layout, return_lse=True, **kwargs)
  want_out, want_lse = numpy_varlen_attention(q, k, v, *oracle_args, **oracle_kwargs(kwargs))
  assert out.shape == (q.shape[0], q.shape[1], v.shape[-1]) and out.dtype == q.dtype
  assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == jnp.float32
  assert_out_and_lse_close(out, lse, want_out, want_lse)
  loss = out_and_lse_loss(out.shape, lse.shape)
  grads = jax.grad(loss(lambda q, k, v: varlen(q, k, v, layout, return_lse=True, **kwargs)), argnums=(0, 1, 2))(
      q, k, v)
  oracle = lambda q, k, v: dense_varlen_attention(q, k, v, *oracle_args, **oracle_kwargs(kwargs))
  want = jax.grad(loss(oracle), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w, x in zip(grads, want, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, w)

  # Rows of no sequence: exactly 0 / -inf, and no gradient.
  rows_q = uncovered(layout["cu_seqlens_q"], layout["seqused_q"], layout["max_seqlen_q"], q.shape[0])
  rows_k = uncovered(layout["cu_seqlens_k"], layout["seqused_k"], layout["max_seqlen_k"], k.shape[0])
  assert np.all(np.asarray(out)[rows_q] == 0) and np.all(np.isneginf(np.asarray(lse)[:, rows_q]))
  assert np.all(np.asarray(grads[0])[rows_q] == 0)
  assert np.all(np.asarray(grads[1])[rows_k] == 0) and np.all(np.asarray(grads[2])[rows_k] == 0)


def test_gap_rows_are_uncovered():
  # The case with seqused below the allotments and rows after cu_seqlens[-1] really has uncovered rows.
  q, k, _, layout, _, _ = case_inputs("seqused_gaps_long_bounds")
  assert uncovered(layout["cu_seqlens_q"], layout["seqused_q"], 200, q.shape[0]).sum() == 7 + 17 + 13 + 11
  assert uncovered(layout["cu_seqlens_k"], layout["seqused_k"], 250, k.shape[0]).sum() == 17 + 51 + 5


@pytest.mark.parametrize("name", ["gqa_causal_cross", "mqa_local", "seqused_gaps_long_bounds"])
def test_each_sequence_equals_flash_attn_func_on_it(name):
  q, k, v, layout, kwargs, oracle_args = case_inputs(name, seed=3)
  out, lse = varlen(q, k, v, layout, return_lse=True, **kwargs)
  rows_q = sequence_rows(layout["cu_seqlens_q"], layout["seqused_q"], layout["max_seqlen_q"], q.shape[0])
  rows_k = sequence_rows(layout["cu_seqlens_k"], layout["seqused_k"], layout["max_seqlen_k"], k.shape[0])
  for (oq, lq), (ok, lk) in zip(rows_q, rows_k):
    if lq == 0 or lk == 0:
      continue
    want_out, want_lse = fa3_jax.flash_attn_func(q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk],
                                                 return_lse=True, **kwargs)
    assert_close(out[oq:oq + lq], want_out[0], atol=1e-3)
    np.testing.assert_allclose(lse[:, oq:oq + lq], want_lse[0], atol=1e-5, rtol=1e-6)


# ---- the dense reference with per-batch lengths ----------------------------------------------------------------

@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (9, 3)])
def test_dense_reference_with_lengths_matches_the_oracle(window):
  rng = np.random.default_rng(4)
  b, sq, sk, h, hk, d = 4, 40, 50, 4, 2, 32
  q, k, v, dout = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in
                   ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d)))
  lengths_q, lengths_k = np.array([40, 0, 13, 25], np.int32), np.array([50, 7, 0, 9], np.int32)
  left, right = window
  cfg = AttentionConfig(softmax_scale=d**-0.5, window_left=None if left < 0 else left,
                        window_right=None if right < 0 else right)
  out, lse = reference.attention_forward(q, k, v, cfg, seqlen_q=lengths_q, seqlen_k=lengths_k)
  grads = reference.attention_backward(q, k, v, out, lse, dout, cfg, seqlen_q=lengths_q, seqlen_k=lengths_k)
  for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
    assert np.all(np.asarray(out[i, lq:]) == 0) and np.all(np.isneginf(np.asarray(lse[i, :, lq:])))
    assert np.all(np.asarray(grads[0][i, lq:]) == 0)
    assert np.all(np.asarray(grads[1][i, lk:]) == 0) and np.all(np.asarray(grads[2][i, lk:]) == 0)
    if lq == 0 or lk == 0:
      assert np.all(np.asarray(out[i]) == 0) and all(np.all(np.asarray(g[i]) == 0) for g in grads)
      continue
    sl = lambda x, n: x[i:i + 1, :n]
    want_out, want_lse = numpy_attention(sl(q, lq), sl(k, lk), sl(v, lk), window=window)
    np.testing.assert_allclose(np.asarray(out[i, :lq]), want_out[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse[i, :, :lq]), want_lse[0], atol=1e-5)
    _, vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, window=window), sl(q, lq), sl(k, lk), sl(v, lk))
    for g, w, n in zip(grads, vjp(sl(dout, lq)), (lq, lk, lk)):
      np.testing.assert_allclose(np.asarray(g[i, :n]), np.asarray(w[0]), atol=1e-4)


# ---- transformations -------------------------------------------------------------------------------------------

PACKINGS = [((10, 0, 30), (12, 5, 30)), ((40, 0, 0), (20, 27, 0)), ((1, 1, 38), (1, 46, 0))]  # 40 / 47 rows


def stacked_packings(seed=5):
  """Three packings of the same shapes (40 query, 47 key rows, 3 sequences), stacked."""
  inputs = [packed(seed + i, lq, lk, 4, 2, 32) for i, (lq, lk) in enumerate(PACKINGS)]
  return [np.stack(x) if isinstance(x[0], np.ndarray) else jnp.stack(x) for x in zip(*inputs)]


def causal_varlen(q, k, v, cu_q, cu_k, **kwargs):
  return fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 46, causal=True, **kwargs)


def loss(q, k, v, cu_q, cu_k):
  return jnp.sum(causal_varlen(q, k, v, cu_q, cu_k).astype(jnp.float32) ** 2)


def test_vmap_over_everything_equals_a_loop():
  args = stacked_packings()
  out, lse = jax.jit(jax.vmap(lambda *a: causal_varlen(*a, return_lse=True)))(*args)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(*args)
  for i in range(len(PACKINGS)):
    one = [x[i] for x in args]
    want_out, want_lse = causal_varlen(*one, return_lse=True)
    assert_close(out[i], want_out, atol=1e-3)
    np.testing.assert_allclose(lse[i], want_lse, atol=1e-5)
    for g, w in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(*one)):
      assert_close(g[i], w, atol=1e-3)


@pytest.mark.parametrize("in_axes", [(0, None, None, None, None), (0, 0, 0, None, None)])
def test_vmap_over_q_or_qkv_with_one_packing_equals_a_loop(in_axes):
  args = stacked_packings()
  args = [x if axis == 0 else x[0] for x, axis in zip(args, in_axes)]
  out = jax.jit(jax.vmap(causal_varlen, in_axes=in_axes))(*args)
  grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=in_axes))(*args)
  for i in range(3):
    one = [x[i] if axis == 0 else x for x, axis in zip(args, in_axes)]
    assert_close(out[i], causal_varlen(*one), atol=1e-3)
    for g, w in zip(grads, jax.grad(loss, argnums=(0, 1, 2))(*one)):
      assert_close(g[i], w, atol=1e-3)


def test_jit_reuses_one_compilation_for_every_packing():
  traces = []

  @jax.jit
  def f(q, k, v, cu_q, cu_k):
    traces.append(1)
    return causal_varlen(q, k, v, cu_q, cu_k)

  q, k, v, cu_q, cu_k = stacked_packings()
  for i, (lq, lk) in enumerate(PACKINGS):
    want, _ = numpy_varlen_attention(q[i], k[i], v[i], cu_q[i], cu_k[i], 40, 46, causal=True)
    assert_close(f(q[i], k[i], v[i], cu_q[i], cu_k[i]), want)
  assert len(traces) == 1


def test_remat_with_saved_residuals_gives_the_same_gradients():
  q, k, v, cu_q, cu_k = (x[0] for x in stacked_packings())
  policy = jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")
  for remat in (jax.checkpoint(loss), jax.checkpoint(loss, policy=policy)):
    got = jax.jit(jax.grad(remat, argnums=(0, 1, 2)))(q, k, v, cu_q, cu_k)
    for g, w in zip(got, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, cu_q, cu_k)):
      np.testing.assert_array_equal(g, w)


def test_deterministic_passes_through():
  q, k, v, cu_q, cu_k = (x[1] for x in stacked_packings())
  grad = lambda **kw: jax.grad(lambda q: jnp.sum(causal_varlen(q, k, v, cu_q, cu_k, **kw).astype(jnp.float32)))(q)
  np.testing.assert_array_equal(grad(deterministic=True), grad(deterministic=False))


def test_second_order_derivatives_raise():
  q, k, v, cu_q, cu_k = (x[0] for x in stacked_packings())
  first = jax.grad(lambda q: jnp.sum(causal_varlen(q, k, v, cu_q, cu_k).astype(jnp.float32)))
  with pytest.raises(NotImplementedError, match="second-order derivatives"):
    jax.grad(lambda q: jnp.sum(first(q).astype(jnp.float32)))(q)


# ---- multiple devices ------------------------------------------------------------------------------------------

def collectives(hlo: str) -> int:
  return sum(testing.collectives(hlo).values())


def head_inputs(heads, kv_heads):
  lq, lk = (0, 17, 33, 1), (5, 17, 40, 1)
  return packed(6, lq, lk, heads, kv_heads, 16, extra_q=3, extra_k=2)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (16, 8)])
def test_shard_map_over_heads(heads, kv_heads):
  mesh = jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Auto,))
  q, k, v, cu_q, cu_k = head_inputs(heads, kv_heads)
  spec = P(None, "tp")
  body = lambda q, k, v, a, b: fa3_jax.flash_attn_varlen_func(q, k, v, a, b, 33, 40, causal=True, return_lse=True)
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=(spec, P("tp")))
  for got, want in zip(jax.jit(sharded)(q, k, v, cu_q, cu_k), body(q, k, v, cu_q, cu_k)):
    assert_close(got, want, atol=1e-3)

  def sharded_loss(q, k, v, a, b):
    local = lambda *x: jax.lax.psum(jnp.sum(body(*x)[0].astype(jnp.float32) ** 2), "tp")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=P())(q, k, v, a, b)

  plain_loss = lambda *x: jnp.sum(body(*x)[0].astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(q, k, v, cu_q, cu_k)
  for g, w in zip(got, jax.grad(plain_loss, argnums=(0, 1, 2))(q, k, v, cu_q, cu_k)):
    assert_close(g, w, atol=1e-3)


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_head_sharded_inputs_under_jit(mode, heads, kv_heads):
  # q's heads over tp; with 2 kv heads on 4 head shards K/V stay replicated and each shard picks its kv head.
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(mode,) * 2)
  q, k, v, cu_q, cu_k = head_inputs(heads, kv_heads)
  want = causal_fn(q, k, v, cu_q, cu_k)
  want_grads = jax.grad(sum_sq(causal_fn), argnums=(0, 1, 2))(q, k, v, cu_q, cu_k)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  spec = P(None, "tp", None)
  args = (put(q, spec), put(k, spec if kv_heads == heads else P()), put(v, spec if kv_heads == heads else P()),
          put(cu_q, P()), put(cu_k, P()))
  with jax.set_mesh(mesh):
    fwd = jax.jit(causal_fn).lower(*args).compile()
    out = fwd(*args)
    grads = jax.jit(jax.grad(sum_sq(causal_fn), argnums=(0, 1, 2)))(*args)
  assert collectives(fwd.as_text()) == 0
  assert out.sharding.spec == spec
  assert_close(out, want, atol=1e-3)
  for g, w in zip(grads, want_grads):
    assert_close(g, w, atol=1e-3)


def causal_fn(q, k, v, cu_q, cu_k):
  return fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, causal=True)


def sum_sq(fn):
  return lambda *args: jnp.sum(fn(*args).astype(jnp.float32) ** 2)


# ---- empty problems and argument errors ------------------------------------------------------------------------

@pytest.mark.parametrize("total_q,heads,total_k,batch", [(0, 2, 5, 2), (5, 0, 5, 2), (5, 2, 5, 0), (5, 2, 0, 2)])
def test_empty_problems_give_zeros_and_minus_inf(total_q, heads, total_k, batch):
  q = jnp.ones((total_q, heads, 32), jnp.bfloat16)
  k = jnp.ones((total_k, heads, 32), jnp.bfloat16)
  cu_q = np.minimum(np.arange(batch + 1), total_q).astype(np.int32)
  cu_k = np.minimum(np.arange(batch + 1), total_k).astype(np.int32)
  f = lambda q, k: fa3_jax.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 4, 4, return_lse=True)
  out, lse = f(q, k)
  assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (heads, total_q)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  grads = jax.grad(lambda q, k: jnp.sum(f(q, k)[0].astype(jnp.float32)), argnums=(0, 1))(q, k)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def args(**changes):
  """Valid arguments (2 sequences of 3 + 5 rows, 2 extra query rows), with changes."""
  a = dict(q=jnp.zeros((10, 4, 64), jnp.float16), k=jnp.zeros((8, 2, 64), jnp.float16),
           v=jnp.zeros((8, 2, 64), jnp.float16), cu_seqlens_q=np.array([0, 3, 8], np.int32),
           cu_seqlens_k=np.array([0, 3, 8], np.int32), max_seqlen_q=5, max_seqlen_k=5)
  a.update(changes)
  return a


def trace(**kwargs):
  return jax.eval_shape(lambda: fa3_jax.flash_attn_varlen_func(**kwargs))


@pytest.mark.parametrize("changes,error,match", [
    (dict(q=jnp.zeros((1, 10, 4, 64), jnp.float16)), ValueError, r"q must have shape \(total_q, heads, head_dim\)"),
    (dict(k=jnp.zeros((8, 64), jnp.float16)), ValueError, r"k must have shape \(total_k, kv_heads, head_dim\)"),
    (dict(v=jnp.zeros((7, 2, 64), jnp.float16)), ValueError, r"k and v must have the same total_k, got k=8, v=7"),
    (dict(q=jnp.zeros((10, 4, 64), jnp.float32)), TypeError, r"q must be float16 or bfloat16, got float32"),
    (dict(k=jnp.zeros((8, 3, 64), jnp.float16), v=jnp.zeros((8, 3, 64), jnp.float16)), ValueError,
     r"heads of q must be a multiple of kv_heads"),
    (dict(cu_seqlens_q=np.array([[0, 3, 8]], np.int32)), ValueError,
     r"cu_seqlens_q must have shape \(batch \+ 1,\), got shape \(1, 3\)"),
    (dict(cu_seqlens_q=np.array([0.0, 3, 8])), TypeError, r"cu_seqlens_q must be an int32 array, got float64"),
    (dict(cu_seqlens_k=np.array([0, 8], np.int32)), ValueError,
     r"cu_seqlens_k must have shape \(batch \+ 1,\) = \(3,\) like cu_seqlens_q .*, got shape \(2,\)"),
    (dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)), ValueError, r"cu_seqlens_q must start at 0, got "
                                                                    r"cu_seqlens_q\[0\] = 1"),
    (dict(cu_seqlens_k=np.array([0, 5, 3], np.int32)), ValueError,
     r"cu_seqlens_k must be nondecreasing, got cu_seqlens_k\[1\] = 5 > cu_seqlens_k\[2\] = 3"),
    (dict(cu_seqlens_q=np.array([0, 3, 11], np.int32), max_seqlen_q=8), ValueError,
     r"cu_seqlens_q\[-1\] must be at most total_q = 10, the rows of q, got 11"),
    (dict(cu_seqlens_q=np.array([0, 2**32, 8], np.int64)), ValueError, r"cu_seqlens_q must hold int32 values"),
    (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q = 4 must bound every sequence's length, got sequence 1 with 5"),
    (dict(max_seqlen_k=0), ValueError, r"max_seqlen_k must be an int >= 1, got 0"),
    (dict(max_seqlen_k=5.0), TypeError, r"max_seqlen_k must be an int, got float"),
    (dict(max_seqlen_q=2**30), ValueError, r"max_seqlen_q must be at most MAX_SEQLEN"),
    (dict(seqused_q=np.array([1, 2, 3], np.int32)), ValueError,
     r"seqused_q must have shape \(batch,\) = \(2,\), the batch of cu_seqlens_q, got shape \(3,\)"),
    (dict(seqused_k=np.array([1.0, 2.0])), TypeError, r"seqused_k must be an int32 array, got float64"),
    (dict(seqused_k=np.array([4, 2], np.int32)), ValueError,
     r"seqused_k\[0\] = 4 exceeds sequence 0's allotment cu_seqlens_k\[1\] - cu_seqlens_k\[0\] = 3"),
    (dict(seqused_q=np.array([-1, 2], np.int32)), ValueError, r"seqused_q must be >= 0, got seqused_q\[0\] = -1"),
    (dict(cu_seqlens_q=None), TypeError, r"cu_seqlens_q must be an array \(or a nested list of numbers\)"),
])
def test_argument_errors_name_the_argument(changes, error, match):
  with pytest.raises(error, match=match):
    trace(**args(**changes))


def test_an_allotment_may_exceed_max_seqlen_when_seqused_does_not():
  # A long allotment is fine when seqused keeps the used length within max_seqlen.
  out = fa3_jax.flash_attn_varlen_func(**args(max_seqlen_q=3, seqused_q=np.array([3, 2], np.int32)))
  assert out.shape == (10, 4, 64)


def test_traced_layouts_are_not_checked_and_stay_in_bounds():
  # Malformed traced values give unspecified results, but never out-of-bounds reads: here a decreasing cu_seqlens
  # and an end past the rows, under jit.
  a = args()
  f = jax.jit(lambda cu_q: fa3_jax.flash_attn_varlen_func(a["q"], a["k"], a["v"], cu_q, a["cu_seqlens_k"], 5, 5))
  out = f(np.array([0, 9, 4], np.int32))
  assert out.shape == (10, 4, 64) and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_lists_and_other_integer_dtypes_are_converted():
  ref = fa3_jax.flash_attn_varlen_func(**args())
  np.testing.assert_array_equal(fa3_jax.flash_attn_varlen_func(**args(cu_seqlens_q=[0, 3, 8],
                                                                     cu_seqlens_k=np.array([0, 3, 8], np.int64))), ref)
