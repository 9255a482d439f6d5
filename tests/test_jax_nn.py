"""fa3_jax.dot_product_attention against jax.nn.dot_product_attention(implementation="xla") as the oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from fa3_jax import jax_nn
from fa3_jax.jax_nn import dot_product_attention


def _qkv(seed, b=2, t=7, s=9, n=4, kh=2, h=16, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, n, h), dtype), jax.random.normal(ks[1], (b, s, kh, h), dtype),
          jax.random.normal(ks[2], (b, s, kh, h), dtype))


def _oracle(q, k, v, **kw):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)


@pytest.fixture
def no_dense(monkeypatch):
  """Fail if the dense fallback runs: the call must map onto the fa3 custom_vjp."""
  def refuse(*a, **k):
    raise AssertionError("dense path taken")
  monkeypatch.setattr(jax_nn, "_dense_attention", refuse)


CASES = [dict(), dict(is_causal=True), dict(local_window_size=(2, 1)), dict(local_window_size=3, is_causal=True),
         dict(scale=0.3, is_causal=True)]


@pytest.mark.parametrize("kw,t,s", [(kw, 7, 9) for kw in CASES] + [(CASES[1], 9, 7), (CASES[2], 9, 7)])
def test_kernel_path_matches_jax_nn_top_left(kw, t, s, no_dense):
  q, k, v = _qkv(t * 10 + s, t=t, s=s)
  np.testing.assert_allclose(jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kw))(q, k, v),
                             _oracle(q, k, v, **kw), atol=2e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, **kw)))
  g = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(_oracle), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, atol=5e-5)


def test_bf16_uses_kernel_path_and_matches(no_dense):
  q, k, v = _qkv(1, dtype=jnp.bfloat16, t=16, s=16)
  out = dot_product_attention(q, k, v, is_causal=True)
  assert out.dtype == jnp.bfloat16
  ref = _oracle(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2)


def test_seq_lengths_match_jax_nn_including_zeroed_query_rows():
  q, k, v = _qkv(2)
  ql, kl = jnp.array([3, 7], jnp.int32), jnp.array([5, 9], jnp.int32)
  for causal in (False, True):
    kw = dict(query_seq_lengths=ql, key_value_seq_lengths=kl, is_causal=causal)
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kw))(q, k, v)
    np.testing.assert_allclose(out, _oracle(q, k, v, **kw), atol=2e-5)
    assert not np.asarray(out[0, 3:]).any()
    g = jax.grad(lambda k: jnp.sum(dot_product_attention(q, k, v, **kw) ** 2))(k)
    g_ref = jax.grad(lambda k: jnp.sum(_oracle(q, k, v, **kw) ** 2))(k)
    np.testing.assert_allclose(g, g_ref, atol=5e-5)


def _lengths_call(kw, same=False):
  """dot_product_attention under jit with traced lengths (one array for both when `same`), and jax.nn's."""
  if same:
    ours = jax.jit(lambda q, k, v, l: dot_product_attention(
        q, k, v, query_seq_lengths=l, key_value_seq_lengths=l, return_residual=True, **kw))
    theirs = lambda q, k, v, l: _oracle(q, k, v, query_seq_lengths=l, key_value_seq_lengths=l, return_residual=True,
                                        **kw)
  else:
    ours = jax.jit(lambda q, k, v, l: dot_product_attention(q, k, v, return_residual=True, **l, **kw))
    theirs = lambda q, k, v, l: _oracle(q, k, v, return_residual=True, **l, **kw)
  return ours, theirs


# (attention keywords, lengths, T, S, one array for both): every one provably aligned as jax.nn, so on the kernels.
KERNEL_LENGTHS = [
    (dict(), dict(query_seq_lengths=[3, 0, 9], key_value_seq_lengths=[5, 0, 7]), 9, 7, False),  # no window
    (dict(is_causal=True), dict(query_seq_lengths=[3, 0, 9]), 9, 7, False),  # queries only: all rows, then zeroed
    (dict(local_window_size=(2, 1)), dict(query_seq_lengths=[3, 0, 7]), 7, 9, False),
    (dict(is_causal=True), [4, 8, 1], 8, 8, True),  # self-attention padding: one array, T == S
    (dict(local_window_size=(3, 0)), [4, 8, 0], 8, 8, True),
]


@pytest.mark.parametrize("kw,lengths,t,s,same", KERNEL_LENGTHS)
def test_traced_seq_lengths_run_the_kernels_and_match_jax_nn(kw, lengths, t, s, same, no_dense):
  q, k, v = _qkv(20 + t, b=3, t=t, s=s)
  arg = (jnp.array(lengths, jnp.int32) if same
         else {name: jnp.array(x, jnp.int32) for name, x in lengths.items()})
  ours, theirs = _lengths_call(kw, same)
  (out, res), (want_out, want_res) = ours(q, k, v, arg), theirs(q, k, v, arg)
  q_lengths = np.asarray(arg if same else arg["query_seq_lengths"])
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(res, want_res, atol=2e-5, rtol=1e-6)
  for i, n in enumerate(q_lengths):  # padded rows: exactly jax.nn's 0 and masked-logits residual
    np.testing.assert_array_equal(out[i, n:], want_out[i, n:])
    np.testing.assert_array_equal(res[i, n:], want_res[i, n:])
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, arg)[0]))
  for g, w in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(theirs), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, w, atol=5e-5)


@pytest.mark.parametrize("t,s", [(8, 8), (7, 9)])
def test_lengths_known_at_trace_time_with_a_constant_shift_run_the_kernels(t, s, no_dense):
  # Concrete lengths whose difference kv - q is the same in every batch entry: one static shifted window.
  q, k, v = _qkv(30 + t, b=3, t=t, s=s)
  kw = dict(query_seq_lengths=jnp.array([2, 5, 6], jnp.int32),
            key_value_seq_lengths=jnp.array([2, 5, 6], jnp.int32) + (s - t), is_causal=True, local_window_size=(3, 1))
  np.testing.assert_allclose(dot_product_attention(q, k, v, **kw), _oracle(q, k, v, **kw), atol=2e-5)


def test_traced_lengths_whose_alignment_differs_run_the_dense_path_and_match(monkeypatch):
  # Causal with different traced query and key lengths: the kernels' per-sequence bottom-right alignment would
  # differ from jax.nn's top-left one, so the dense path runs.
  dense = []
  monkeypatch.setattr(jax_nn, "_dense_attention", lambda *a, f=jax_nn._dense_attention: dense.append(1) or f(*a))
  q, k, v = _qkv(40, b=3, t=8, s=8)
  lengths = dict(query_seq_lengths=jnp.array([3, 8, 5], jnp.int32),
                 key_value_seq_lengths=jnp.array([6, 8, 2], jnp.int32))
  ours, theirs = _lengths_call(dict(is_causal=True))
  (out, res), (want_out, want_res) = ours(q, k, v, lengths), theirs(q, k, v, lengths)
  assert dense
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(res, want_res, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_residual_of_rows_without_keys_is_jax_nns_in_every_dtype(dtype):
  # Padded query rows, and rows that see no key (batch entry 1 has no keys): jax.nn's masking value, in key's dtype.
  q, k, v = _qkv(41, b=2, t=8, s=8, dtype=dtype)
  kw = dict(query_seq_lengths=jnp.array([5, 8], jnp.int32), key_value_seq_lengths=jnp.array([8, 0], jnp.int32),
            return_residual=True)
  (out, res), (want_out, want_res) = dot_product_attention(q, k, v, **kw), _oracle(q, k, v, **kw)
  assert res.dtype == want_res.dtype == dtype
  np.testing.assert_array_equal(res[0, 5:], want_res[0, 5:])
  np.testing.assert_array_equal(res[1], want_res[1])
  np.testing.assert_array_equal(out[0, 5:], want_out[0, 5:])
  assert not np.asarray(out[1]).any()  # rows within query_seq_lengths that see no key: 0 (jax.nn averages v)


def test_causal_mask_built_inside_jit_is_read_at_trace_time(no_dense):
  q, k, v = _qkv(3, t=8, s=8)
  f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=nn.make_causal_mask(q[..., 0, 0], dtype=bool)))
  np.testing.assert_allclose(f(q, k, v), _oracle(q, k, v, is_causal=True), atol=2e-5)


def test_constant_padding_mask_runs_dense_path_and_matches():
  q, k, v = _qkv(4, t=8, s=8)
  valid = jnp.arange(8)[None] < jnp.array([[5], [8]])
  mask = nn.make_attention_mask(valid, valid, dtype=bool) & nn.make_causal_mask(valid, dtype=bool)
  out = dot_product_attention(q, k, v, mask=mask)
  ref = _oracle(q, k, v, mask=mask)
  np.testing.assert_allclose(out[0, :5], ref[0, :5], atol=2e-5)
  np.testing.assert_allclose(out[1], ref[1], atol=2e-5)
  assert not np.asarray(out[0, 5:]).any()  # rows with no visible key: 0 (jax.nn averages v there)


def test_data_dependent_mask_and_bias_run_dense_and_match():
  q, k, v = _qkv(5)
  mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 4, 7, 9)).at[..., 0].set(True)
  bias = jax.random.normal(jax.random.key(10), (1, 4, 7, 9))
  f = jax.jit(lambda q, k, v, m, b: dot_product_attention(q, k, v, b, m))
  np.testing.assert_allclose(f(q, k, v, mask, bias), _oracle(q, k, v, bias=bias, mask=mask), atol=2e-5)


def test_analyse_mask_recognises_bands_and_padding_and_rejects_others():
  causal = np.tril(np.ones((6, 6), bool))[None, None]
  st = jax_nn.analyse_mask(causal)
  assert (st.left, st.right, st.q_valid, st.kv_valid) == (None, 0, None, None)
  band = np.asarray(jnp.ones((1, 1, 6, 6), bool) & (np.abs(np.arange(6)[:, None] - np.arange(6)) <= 2))
  assert (jax_nn.analyse_mask(band).left, jax_nn.analyse_mask(band).right) == (2, 2)
  checker = (np.add.outer(np.arange(6), np.arange(6)) % 2 == 0)[None, None]
  assert jax_nn.analyse_mask(checker) is None
  per_head = np.concatenate([causal, ~causal | np.eye(6, dtype=bool)], axis=1)
  assert jax_nn.analyse_mask(per_head) is None


def test_residual_layout_dtype_and_unbatched_inputs():
  q, k, v = _qkv(6, dtype=jnp.bfloat16, t=8, s=8)
  out, res = dot_product_attention(q, k, v, is_causal=True, return_residual=True)
  ref_out, ref_res = _oracle(q, k, v, is_causal=True, return_residual=True)
  assert res.shape == ref_res.shape == (2, 8, 4) and res.dtype == ref_res.dtype
  np.testing.assert_allclose(res.astype(jnp.float32), ref_res.astype(jnp.float32), atol=3e-2)
  out3 = dot_product_attention(q[0], k[0], v[0], is_causal=True)
  np.testing.assert_array_equal(out3, out[0])


def test_bad_arguments_raise_clear_errors():
  q, k, v = _qkv(7)
  with pytest.raises(ValueError, match="local_window_size"):
    dot_product_attention(q, k, v, local_window_size=(-1, 2))
  with pytest.raises(TypeError, match="mask must be a bool"):
    dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 7, 9)))
  with pytest.raises(ValueError, match="key_value_seq_lengths"):
    dot_product_attention(q, k, v, key_value_seq_lengths=jnp.array([1, 2, 3], jnp.int32))
  with pytest.raises(ValueError, match="implementation"):
    dot_product_attention(q, k, v, implementation="triton")


@pytest.mark.parametrize("h,hv,error", [(16, 8, NotImplementedError), (64, 32, NotImplementedError),
                                        (128, 192, NotImplementedError), (192, 128, None)])
def test_head_dim_v_pairs_follow_the_docstring(h, hv, error):
  q, k, _ = _qkv(8, h=h)
  v = jnp.ones((2, 9, 2, hv))
  if error is None:
    assert dot_product_attention(q, k, v).shape == (2, 7, 4, hv)
  else:
    with pytest.raises(error, match=rf"value's H_v must equal H, .* got H={h}, value's H_v={hv}"):
      dot_product_attention(q, k, v)


@pytest.mark.parametrize("kw,error,match", [
    (dict(local_window_size=1.5), TypeError, "local_window_size must be None, an int or a pair"),
    (dict(local_window_size=True), TypeError, "local_window_size must be None, an int or a pair"),
    (dict(local_window_size=-1), ValueError, "local_window_size must be None, an int >= 0"),
    (dict(scale=1e38), ValueError, r"scale must be a number in \[1.18e-38, "),
    (dict(scale=0.0), ValueError, "scale must be a number in"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool, got int"),
    (dict(implementation=["fa3"]), ValueError, "implementation must be one of"),
    (dict(mask=jnp.ones((1, 1, 1, 7, 9), bool)), ValueError, "mask must be broadcastable"),
    (dict(mask="causal"), TypeError, "mask must be an array"),
    (dict(bias=object()), TypeError, "bias must be an array"),
    (dict(query_seq_lengths=jnp.array([3.0, 4.0])), ValueError, "query_seq_lengths must be an int32 array"),
    (dict(query_seq_lengths="3"), TypeError, "query_seq_lengths must be an array"),
])
def test_more_bad_arguments_name_the_argument(kw, error, match):
  with pytest.raises(error, match=match):
    dot_product_attention(*_qkv(11), **kw)


def test_traced_scale_is_rejected_by_name():
  q, k, v = _qkv(12)
  with pytest.raises(TypeError, match="scale must be a Python float or None .* got a traced value"):
    jax.jit(lambda s: dot_product_attention(q, k, v, scale=s))(0.5)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_arrays_are_rejected_and_lists_accepted_like_jax_nn(name):
  args = dict(zip(("query", "key", "value"), _qkv(13, b=1, t=3, s=3, n=1, kh=1, h=8)))
  with pytest.raises(TypeError, match=f"{name} must be an array"):
    dot_product_attention(**{**args, name: None})
  lists = {n: np.asarray(x).tolist() for n, x in args.items()}
  np.testing.assert_allclose(dot_product_attention(**lists), _oracle(*args.values()), atol=2e-5)


def test_zero_head_dim_is_rejected_and_zero_heads_are_empty():
  q, k, v = _qkv(14, n=2, kh=2, h=0)
  with pytest.raises(ValueError, match="query and key must have a head dim H >= 1"):
    dot_product_attention(q, k, v)
  q, k, v = _qkv(14, n=0, kh=0)
  assert dot_product_attention(q, k, v).shape == (2, 7, 0, 16)


def test_sequence_lengths_above_max_are_rejected():
  q = jax.ShapeDtypeStruct((1, 2**29 + 1, 1, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 8, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"T \(query's sequence length\) must be at most MAX_SEQLEN = 2\*\*29"):
    jax.eval_shape(dot_product_attention, q, k, k)
  with pytest.raises(ValueError, match=r"S \(key's sequence length\) must be at most MAX_SEQLEN"):
    jax.eval_shape(dot_product_attention, k, q, q)


@pytest.mark.parametrize("window", [2**40, (2**62, 0)])
def test_windows_larger_than_any_sequence_are_unbounded(window, no_dense):
  q, k, v = _qkv(15, dtype=jnp.bfloat16)
  want = dot_product_attention(q, k, v, is_causal=isinstance(window, tuple))
  got = dot_product_attention(q, k, v, local_window_size=window)
  np.testing.assert_array_equal(got, want)


def test_second_order_derivatives_on_the_kernel_path_raise_not_implemented(no_dense):
  q, k, v = _qkv(16)
  loss = lambda q: jnp.sum(dot_product_attention(q, k, v, is_causal=True))
  with pytest.raises(NotImplementedError, match="second-order derivatives"):
    jax.grad(lambda q: jnp.sum(jax.grad(loss)(q)))(q)


def test_vmap_of_sequence_lengths_equals_each_copy():
  """vmap folds the copies into one batch; each copy's lengths must keep bounding its own rows (a BSHD side's
  seqused was once clipped to the batch size instead of the seqlen)."""
  rng = np.random.default_rng(11)
  q = jnp.asarray(rng.standard_normal((2, 2, 5, 4, 16)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((2, 2, 32, 2, 16)), jnp.bfloat16)
  lens = jnp.asarray([[3, 31], [1, 9]], jnp.int32)
  f = lambda q, k, n: dot_product_attention(q, k, k, key_value_seq_lengths=n)
  loss = lambda q, k, n: f(q, k, n).astype(jnp.float32).sum()
  got, got_grad = jax.vmap(f)(q, k, lens), jax.vmap(jax.grad(loss, argnums=(0, 1)))(q, k, lens)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(got[i], np.float32), np.asarray(f(q[i], k[i], lens[i]), np.float32))
    for g, w in zip(got_grad, jax.grad(loss, argnums=(0, 1))(q[i], k[i], lens[i])):
      np.testing.assert_array_equal(np.asarray(g[i], np.float32), np.asarray(w, np.float32))
