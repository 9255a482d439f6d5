"""flash_attn_func with q_segment_ids / kv_segment_ids on the reference path (CPU): against the independent
per-segment oracle and flash_attn_varlen_func on the same documents, forward, lse and gradients; max_segments and
its overflow; jit / vmap / remat; batch and head sharding on 8 fake CPU devices; argument errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import testing
from oracle import assert_close, assert_out_and_lse_close, dense_segment_attention, numpy_segment_attention, \
    out_and_lse_loss, segment_rows


def ids_of(*rows, length):
  """(len(rows), length) int32 ids from rows of (id, run length) pairs, padded with -1."""
  out = np.full((len(rows), length), -1, np.int32)
  for b, runs in enumerate(rows):
    pos = 0
    for x, n in runs:
      out[b, pos:pos + n] = x
      pos += n
  return out


def qkv(seed, batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim=32, dtype=jnp.float16):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((batch, seqlen_q, heads, head_dim), (batch, seqlen_k, kv_heads, head_dim),
                             (batch, seqlen_k, kv_heads, head_dim)))


# name: (seqlen_q, seqlen_k, heads, kv_heads, q runs per row, kv runs per row or None (self-attention), options)
CASES = {
    "self_causal_padding_awkward": (113, 113, 4, 4, [[(0, 1), (1, 17), (2, 95)], [(5, 113)], [(3, 17), (-1, 96)]],
                                    None, dict(causal=True)),
    "self_gqa_window": (64, 64, 4, 2, [[(0, 30), (1, 1), (2, 20), (-1, 13)], [(9, 64)]], None,
                        dict(window_size=(5, 2))),
    "self_mqa_softcap": (17, 17, 4, 1, [[(0, 1)] + [(i, 1) for i in range(1, 17)], [(-1, 3), (7, 14)]], None,
                         dict(softcap=5.0, causal=True)),
    "cross_different_runs": (40, 57, 4, 2, [[(0, 10), (1, 1), (2, 29)], [(4, 17), (6, 3), (-1, 20)]],
                             [[(0, 20), (1, 5), (9, 2), (2, 30)], [(4, 1), (-1, 7), (8, 9), (6, 40)]],
                             dict(causal=True)),
    "cross_window_missing_keys": (33, 20, 2, 2, [[(3, 13), (4, 20)], [(1, 33)]], [[(4, 19), (-1, 1)], [(2, 20)]],
                                  dict(window_size=(3, 1))),
}


def case(name, seed=0):
  sq, sk, h, hk, q_runs, kv_runs, options = CASES[name]
  q, k, v = qkv(seed, len(q_runs), sq, sk, h, hk)
  if options.get("softcap"):
    q = q * 2
  q_ids = ids_of(*q_runs, length=sq)
  kv_ids = q_ids if kv_runs is None else ids_of(*kv_runs, length=sk)
  return q, k, v, q_ids, kv_ids, options


def segments(q_ids, kv_ids):
  return dict(q_segment_ids=q_ids) if kv_ids is q_ids else dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids)


def oracle_kwargs(kwargs):
  return dict(causal=kwargs.get("causal", False), window=kwargs.get("window_size", (-1, -1)),
              softcap=kwargs.get("softcap", 0.0))


@pytest.mark.parametrize("max_segments", [None, "tight"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_per_segment_oracle(name, max_segments):
  q, k, v, q_ids, kv_ids, kwargs = case(name)
  if max_segments == "tight":  # the real bound: the fast path, the same results
    kwargs = dict(kwargs, max_segments=max(len(np.unique(x[x >= 0])) for x in (*q_ids, *kv_ids)))
  ids = segments(q_ids, kv_ids)
  f = jax.jit(lambda q, k, v, ids: fa3_jax.flash_attn_func(q, k, v, return_lse=True, **ids, **kwargs))
  out, lse = f(q, k, v, ids)
  want_out, want_lse = numpy_segment_attention(q, k, v, q_ids, kv_ids, **oracle_kwargs(kwargs))
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
  assert_out_and_lse_close(out, lse, want_out, want_lse)
  loss = out_and_lse_loss(out.shape, lse.shape)
  grads = jax.jit(jax.grad(loss(lambda q, k, v: f(q, k, v, ids)), argnums=(0, 1, 2)))(q, k, v)
  oracle = lambda q, k, v: dense_segment_attention(q, k, v, q_ids, kv_ids, **oracle_kwargs(kwargs))
  want = jax.grad(loss(oracle), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w, x in zip(grads, want, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, w)
  # Padding: exactly 0 and -inf, and no gradient.
  pad_q, pad_k = q_ids < 0, kv_ids < 0
  assert not np.asarray(out)[pad_q].any() and np.isneginf(np.asarray(lse).transpose(0, 2, 1)[pad_q]).all()
  assert not np.asarray(grads[0])[pad_q].any()
  assert not np.asarray(grads[1])[pad_k].any() and not np.asarray(grads[2])[pad_k].any()


@pytest.mark.parametrize("name", ["self_causal_padding_awkward", "cross_different_runs", "cross_window_missing_keys"])
def test_equals_flash_attn_varlen_func_on_the_same_documents(name):
  q, k, v, q_ids, kv_ids, kwargs = case(name, seed=2)
  out, lse = fa3_jax.flash_attn_func(q, k, v, return_lse=True, **segments(q_ids, kv_ids), **kwargs)
  # The documents with keys, packed back to back for the varlen interface.
  docs = [(b, pq, pk) for b, pq, pk in segment_rows(q_ids, kv_ids) if len(pk)]
  cu = lambda n: np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
  pack = lambda x, side: jnp.concatenate([x[b, pos] for b, *positions in docs for pos in [positions[side]]])
  lengths_q, lengths_k = [len(pq) for _, pq, _ in docs], [len(pk) for *_, pk in docs]
  got = fa3_jax.flash_attn_varlen_func(pack(q, 0), pack(k, 1), pack(v, 1), cu(lengths_q), cu(lengths_k),
                                       max(lengths_q), max(lengths_k), return_lse=True, **kwargs)
  # The same computation up to the reference's summation order (its padded batch differs in size).
  np.testing.assert_allclose(pack(out, 0), got[0], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([lse[b][:, pq] for b, pq, _ in docs], axis=1), got[1], rtol=1e-6)


def test_one_ids_array_serves_both_sides():
  q, k, v, q_ids, _, kwargs = case("self_gqa_window")
  want = fa3_jax.flash_attn_func(q, k, v, q_segment_ids=q_ids, kv_segment_ids=q_ids.copy(), **kwargs)
  np.testing.assert_array_equal(fa3_jax.flash_attn_func(q, k, v, kv_segment_ids=q_ids, **kwargs), want)
  np.testing.assert_array_equal(fa3_jax.flash_attn_func(q, k, v, q_segment_ids=q_ids, **kwargs), want)


# ---- max_segments ------------------------------------------------------------------------------------------------

def test_rows_with_more_segments_than_max_segments_are_nan_when_traced():
  q, k, v, q_ids, kv_ids, kwargs = case("cross_different_runs")  # row 0: 3 / 4 runs, row 1: 2 / 3 runs
  f = jax.jit(lambda q, k, v, a, b: fa3_jax.flash_attn_func(q, k, v, q_segment_ids=a, kv_segment_ids=b,
                                                            max_segments=3, return_lse=True, **kwargs))
  out, lse = f(q, k, v, q_ids, kv_ids)
  assert np.isnan(np.asarray(out[0], np.float32)).all() and np.isnan(np.asarray(lse[0])).all()
  want_out, _ = numpy_segment_attention(q, k, v, q_ids, kv_ids, **oracle_kwargs(kwargs))
  assert_close(out[1], want_out[1])  # the other rows are unaffected


def test_known_ids_with_more_segments_than_max_segments_raise():
  q, k, v, q_ids, kv_ids, _ = case("cross_different_runs")
  with pytest.raises(ValueError, match=r"max_segments = 3 must bound the segments of every batch row, got 4 "
                                       r"segments in row 0 of kv_segment_ids"):
    fa3_jax.flash_attn_func(q, k, v, q_segment_ids=q_ids, kv_segment_ids=kv_ids, max_segments=3)


# ---- transformations ---------------------------------------------------------------------------------------------

def causal_segments(q, k, v, ids, **kwargs):
  return fa3_jax.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, max_segments=4, **kwargs)


def sum_sq(q, k, v, ids):
  return jnp.sum(causal_segments(q, k, v, ids).astype(jnp.float32) ** 2)


def stacked(n=3):
  """n problems of the same shapes and different segmentations, stacked."""
  runs = [[[(0, 10), (1, 30)], [(2, 7), (3, 7), (-1, 26)]], [[(5, 40)], [(1, 1), (2, 39)]],
          [[(0, 20), (-1, 20)], [(8, 4), (9, 4), (10, 4), (11, 28)]]]
  problems = [(*qkv(10 + i, 2, 40, 40, 4, 2), ids_of(*runs[i], length=40)) for i in range(n)]
  return [jnp.stack(x) for x in zip(*problems)]


def test_vmap_over_everything_equals_a_loop():
  args = stacked()
  out = jax.jit(jax.vmap(causal_segments))(*args)
  grads = jax.jit(jax.vmap(jax.grad(sum_sq, argnums=(0, 1, 2))))(*args)
  for i in range(3):
    one = [x[i] for x in args]
    assert_close(out[i], causal_segments(*one), atol=1e-3)
    for g, w in zip(grads, jax.grad(sum_sq, argnums=(0, 1, 2))(*one)):
      assert_close(g[i], w, atol=1e-3)


def test_vmap_over_q_only_equals_a_loop():
  q, k, v, ids = stacked()
  out = jax.jit(jax.vmap(causal_segments, in_axes=(0, None, None, None)))(q, k[0], v[0], ids[0])
  for i in range(3):
    assert_close(out[i], causal_segments(q[i], k[0], v[0], ids[0]), atol=1e-3)


def test_remat_with_saved_residuals_gives_the_same_gradients():
  q, k, v, ids = (x[0] for x in stacked(1))
  policy = jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")
  want = jax.jit(jax.grad(sum_sq, argnums=(0, 1, 2)))(q, k, v, ids)
  for remat in (jax.checkpoint(sum_sq), jax.checkpoint(sum_sq, policy=policy)):
    for g, w in zip(jax.jit(jax.grad(remat, argnums=(0, 1, 2)))(q, k, v, ids), want):
      np.testing.assert_array_equal(g, w)


def test_jit_reuses_one_compilation_for_every_segmentation():
  traces = []

  @jax.jit
  def f(q, k, v, ids):
    traces.append(1)
    return causal_segments(q, k, v, ids)

  q, k, v, ids = stacked()
  for i in range(3):
    want, _ = numpy_segment_attention(q[i], k[i], v[i], ids[i], ids[i], causal=True)
    assert_close(f(q[i], k[i], v[i], ids[i]), want)
  assert len(traces) == 1


# ---- multiple devices --------------------------------------------------------------------------------------------

def collectives(hlo: str) -> int:
  return sum(testing.collectives(hlo).values())


def sharding_inputs(kv_heads):
  """Batch 4 (over dp = 2), 8 heads (over tp = 4), kv_heads of 8 (sharded with q's) or 2 (replicated K/V)."""
  runs = [[(0, 10), (1, 30)], [(2, 7), (3, 7), (-1, 26)], [(5, 40)], [(1, 1), (2, 30), (-1, 9)]]
  return (*qkv(20, 4, 40, 40, 8, kv_heads, head_dim=16), ids_of(*runs, length=40))


def test_the_kernels_packing_puts_the_segments_first_and_the_empty_slots_at_the_end():
  # The kernels' walks stop at the first sequence starting at the tensor's end (docs/kernels.md §10.2): the packing
  # holds each row's segments in order, rows back to back, then every empty slot, starting at the end.
  from fa3_jax._config import SequenceLayout
  from fa3_jax._segments import packing, run_counts
  ids = jnp.asarray(ids_of([(0, 3), (1, 2)], [(-1, 8)], [(-1, 2), (7, 6)], length=8))
  packed = packing(SequenceLayout(segment_ids_q=ids, max_segments=4))
  assert isinstance(packed, SequenceLayout)
  np.testing.assert_array_equal(run_counts(ids), [2, 0, 1])
  for side in ("q", "k"):
    cu, used = (np.asarray(getattr(packed, f"{name}_{side}")) for name in ("cu_seqlens", "seqused"))
    np.testing.assert_array_equal(cu, [0, 3, 18] + [24] * 10)
    np.testing.assert_array_equal(used, [3, 2, 6] + [0] * 9)
  assert packed.max_seqlen_q == packed.max_seqlen_k == 8


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_batch_and_head_sharding_has_no_collectives_and_matches(mode, kv_heads):
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(mode,) * 2)
  q, k, v, ids = sharding_inputs(kv_heads)
  want = causal_segments(q, k, v, ids)
  want_grads = jax.grad(sum_sq, argnums=(0, 1, 2))(q, k, v, ids)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  spec = P("dp", None, "tp", None)
  kv_spec = spec if kv_heads == 8 else P("dp")
  args = (put(q, spec), put(k, kv_spec), put(v, kv_spec), put(ids, P("dp", None)))
  with jax.set_mesh(mesh):
    fwd = jax.jit(causal_segments).lower(*args).compile()
    grad = jax.jit(jax.grad(sum_sq, argnums=(0, 1, 2))).lower(*args).compile()
    out, grads = fwd(*args), grad(*args)
  assert collectives(fwd.as_text()) == 0
  if kv_heads == 8:  # else several head shards read one kv head: its gradient is summed over them (sharding.py)
    assert collectives(grad.as_text()) == 0
  assert out.sharding.spec == spec
  assert_close(out, want, atol=1e-3)
  for g, w in zip(grads, want_grads):
    assert_close(g, w, atol=1e-3)


def test_inside_shard_map_over_batch_and_heads():
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
  q, k, v, ids = sharding_inputs(8)
  spec = P("dp", None, "tp", None)
  sharded = jax.shard_map(causal_segments, mesh=mesh, in_specs=(spec, spec, spec, P("dp", None)), out_specs=spec)
  assert_close(jax.jit(sharded)(q, k, v, ids), causal_segments(q, k, v, ids), atol=1e-3)


# ---- argument errors ---------------------------------------------------------------------------------------------

def call(**changes):
  a = dict(q=jnp.zeros((2, 8, 4, 32), jnp.float16), k=jnp.zeros((2, 8, 2, 32), jnp.float16),
           v=jnp.zeros((2, 8, 2, 32), jnp.float16), q_segment_ids=np.zeros((2, 8), np.int32))
  a.update(changes)
  return jax.eval_shape(lambda: fa3_jax.flash_attn_func(**a))


@pytest.mark.parametrize("changes,error,match", [
    (dict(q_segment_ids=np.zeros((2, 8))), TypeError, r"q_segment_ids must be an int32 array, got float64"),
    (dict(q_segment_ids=np.zeros((2, 9), np.int32)), ValueError,
     r"q_segment_ids must have shape \(batch, seqlen_q\) = \(2, 8\), got shape \(2, 9\)"),
    (dict(q_segment_ids=None, kv_segment_ids=np.zeros((8,), np.int32)), ValueError,
     r"kv_segment_ids must have shape \(batch, seqlen_k\) = \(2, 8\), got shape \(8,\)"),
    (dict(q_segment_ids="ids"), TypeError, r"q_segment_ids must be an array"),
    (dict(q_segment_ids=np.array([[0, 0, 1, 1, 0, 0, 2, 2]] * 2, np.int32)), ValueError,
     r"q_segment_ids must hold each segment's id in one contiguous run per batch row, got id 0 in 2 runs in row 0"),
    (dict(q_segment_ids=np.full((2, 8), 2**33, np.int64)), ValueError, r"q_segment_ids must hold int32 values"),
    (dict(max_segments=0), ValueError, r"max_segments must be an int >= 1, got 0"),
    (dict(max_segments=2.0), TypeError, r"max_segments must be an int, got float"),
    (dict(q_segment_ids=None, max_segments=4), ValueError, r"max_segments bounds the segments of q_segment_ids"),
    (dict(k=jnp.zeros((2, 9, 2, 32), jnp.float16), v=jnp.zeros((2, 9, 2, 32), jnp.float16)), ValueError,
     r"q_segment_ids alone serves queries and keys only when seqlen_q == seqlen_k; pass both"),
    (dict(kv_segment_ids=np.array([[1] * 4 + [0] * 4] * 2, np.int32),
          q_segment_ids=np.array([[0] * 4 + [1] * 4] * 2, np.int32)), ValueError,
     r"kv_segment_ids must list the segments it shares with q_segment_ids in the same order, got ids \[1, 0\] in "
     r"row 0 where q_segment_ids has \[0, 1\]"),
])
def test_argument_errors_name_the_argument(changes, error, match):
  with pytest.raises(error, match=match):
    call(**changes)


def test_reference_memory_grows_with_the_tokens_not_with_max_segments():
  # The reference masks by segment in BSHD; a packing of batch * max_segments slots padded to seqlen (the default
  # max_segments is seqlen) would grow with seqlen**2.
  ratios = []
  for s in (512, 4096):
    q, ids = jax.ShapeDtypeStruct((2, s, 2, 32), jnp.float16), jax.ShapeDtypeStruct((2, s), jnp.int32)
    loss = lambda q, ids: fa3_jax.flash_attn_func(q, q, q, q_segment_ids=ids).astype(jnp.float32).sum()
    memory = jax.jit(jax.grad(loss)).lower(q, ids).compile().memory_analysis()
    ratios.append(memory.temp_size_in_bytes / (2 * s * 2 * 32 * 4))  # per float32 element of q
  assert ratios[1] < 1.25 * ratios[0], ratios  # 8 times the tokens: the same bytes per token


def test_more_than_int32_packed_rows_are_rejected():
  b, s = 2**12, 2**19  # b * s = 2**31 rows once packed
  q = jax.ShapeDtypeStruct((b, s, 1, 32), jnp.float16)
  ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
  with pytest.raises(ValueError, match=r"q_segment_ids: batch \* seqlen must be below 2\*\*31 - 1"):
    jax.eval_shape(lambda q, ids: fa3_jax.flash_attn_func(q, q, q, q_segment_ids=ids), q, ids)


def test_traced_malformed_ids_stay_finite_and_in_bounds():
  # A traced id in two runs cannot be checked: unspecified results, but no out-of-bounds reads.
  q, k, v = qkv(3, 2, 8, 8, 4, 2)
  ids = np.array([[0, 0, 1, 1, 0, 0, 2, 2], [3, 3, 3, 3, 3, 3, 3, 3]], np.int32)
  out = jax.jit(lambda ids: fa3_jax.flash_attn_func(q, k, v, q_segment_ids=ids, causal=True))(ids)
  assert np.isfinite(np.asarray(out, np.float32)).all()
