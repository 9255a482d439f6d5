"""The Flax modules' decode path (kv_cache=fa3_jax.KVCache) against the oracle of a full recompute: the same module
without a cache over each sequence's whole token history, whose last rows must equal what prefill and the decode
steps produced. On CPU both run the reference path; bfloat16 compute, so the bar is bfloat16 rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fa3_jax
from fa3_jax.flax import linen as fa3_linen
from fa3_jax.flax import nnx as fa3_nnx

FEATURES, HEADS, KV_HEADS = 32, 4, 2
HEAD_DIM = FEATURES // HEADS
ATOL = 3e-2


def _nnx_module(**kwargs):
  return fa3_nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=KV_HEADS, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                    **{"causal": True, "rope_theta": 10000.0, **kwargs})


def _tokens(batch, length, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, length, FEATURES)), jnp.float32)


def _decode(step, prompts, prompt_lengths, steps, cache):
  """Prefill right-padded prompts, then `steps` one-token steps; returns the real rows of every call per sequence
  (list of (tokens, features) arrays) and the final cache."""
  out, cache = step(prompts, cache, jnp.asarray(prompt_lengths, jnp.int32))
  rows = [np.asarray(out[i, :n], np.float32) for i, n in enumerate(prompt_lengths)]
  extra = _tokens(prompts.shape[0], steps, seed=1)
  for s in range(steps):
    out, cache = step(extra[:, s:s + 1], cache, None)
    rows = [np.concatenate([r, np.asarray(out[i], np.float32)]) for i, r in enumerate(rows)]
  histories = [jnp.concatenate([prompts[i, :n], extra[i]]) for i, n in enumerate(prompt_lengths)]
  return rows, histories, cache


VARIANTS = {"causal": {}, "window": dict(local_window_size=(6, 0)),
            "sinks_chunks": dict(use_sinks=True, attention_chunk=4)}


@pytest.mark.parametrize("page_size", [None, 16, 5], ids=["contiguous", "paged16", "paged5"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nnx_prefill_and_decode_match_a_full_recompute(page_size, variant):
  module = _nnx_module(**VARIANTS[variant])
  if module.sinks is not None:
    module.sinks[...] = jnp.asarray([1.0, -2.0, 0.5, 3.0])
  lengths = [3, 11, 1]
  prompts = _tokens(3, 11)
  cache = fa3_jax.KVCache.create(3, 40, KV_HEADS, HEAD_DIM, page_size=page_size)

  @jax.jit
  def step(x, cache, lengths):
    return module(x, kv_cache=cache, query_seq_lengths=lengths)

  rows, histories, cache = _decode(step, prompts, lengths, 4, cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [n + 4 for n in lengths])
  for got, history in zip(rows, histories):
    want = module(history[None])[0]
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=ATOL)


def test_nnx_padded_prompt_rows_are_zero_before_the_output_projection():
  module = _nnx_module(use_bias=False)
  cache = fa3_jax.KVCache.create(2, 16, KV_HEADS, HEAD_DIM)
  out, _ = module(_tokens(2, 5), kv_cache=cache, query_seq_lengths=jnp.asarray([2, 5]))
  np.testing.assert_array_equal(np.asarray(out[0, 2:], np.float32), 0)
  assert np.abs(np.asarray(out[1], np.float32)).min(axis=-1).max() > 0


def test_linen_prefill_and_decode_match_a_full_recompute():
  module = fa3_linen.MultiHeadAttention(HEADS, num_kv_heads=KV_HEADS, causal=True, rope_theta=500.0,
                                        dtype=jnp.bfloat16)
  prompts = _tokens(2, 7)
  params = module.init(jax.random.key(0), prompts)
  lengths = [7, 4]
  cache = fa3_jax.KVCache.create(2, 32, KV_HEADS, HEAD_DIM, page_size=8)
  step = jax.jit(lambda x, cache, n: module.apply(params, x, kv_cache=cache, query_seq_lengths=n))
  rows, histories, _ = _decode(step, prompts, lengths, 3, cache)
  for got, history in zip(rows, histories):
    want = module.apply(params, history[None])[0]
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=ATOL)


def test_decode_step_donates_the_cache():
  module = _nnx_module()
  cache = fa3_jax.KVCache.create(2, 64, KV_HEADS, HEAD_DIM)
  graph, state = nnx.split(module)

  @jax.jit
  def step(state, x, cache):
    return nnx.merge(graph, state)(x, kv_cache=cache)

  donated = jax.jit(step.__wrapped__, donate_argnums=(2,))
  text = donated.lower(state, _tokens(2, 1), cache).compile().as_text()
  assert "input_output_alias" in text or "must-alias" in text or "may-alias" in text
  out, cache = donated(state, _tokens(2, 1), cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [1, 1])


def test_cache_call_argument_errors():
  module = _nnx_module()
  x = _tokens(2, 3)
  cache = fa3_jax.KVCache.create(2, 16, KV_HEADS, HEAD_DIM)
  with pytest.raises(TypeError, match="kv_cache must be a fa3_jax.KVCache"):
    module(x, kv_cache=(cache.k, cache.v))
  with pytest.raises(ValueError, match="pass inputs_q only"):
    module(x, x + 1, kv_cache=cache)
  with pytest.raises(ValueError, match="cannot be combined with mask, positions"):
    module(x, mask=jnp.ones((2, 1, 3, 3), bool), positions=jnp.arange(3), kv_cache=cache)
  with pytest.raises(ValueError, match=r"\(num_kv_heads, head_dim, head_dim_v\) = \(2, 8, 8\), got \(1, 8, 8\)"):
    module(x, kv_cache=fa3_jax.KVCache.create(2, 16, 1, HEAD_DIM))
  with pytest.raises(ValueError, match="batch of inputs_q"):
    module(x, kv_cache=fa3_jax.KVCache.create(3, 16, KV_HEADS, HEAD_DIM))
  with pytest.raises(NotImplementedError, match="needs a causal module"):
    _nnx_module(causal=False)(x, kv_cache=cache, query_seq_lengths=jnp.asarray([1, 3]))
  with pytest.raises(ValueError, match="page_size must be"):
    fa3_jax.KVCache.create(2, 16, KV_HEADS, HEAD_DIM, page_size=0)


def test_kvcache_attend_counts_only_the_real_new_rows():
  cache = fa3_jax.KVCache.create(2, 8, 1, 16, page_size=4)
  assert cache.capacity == 8 and cache.k.shape == (4, 4, 1, 16)
  q = jnp.ones((2, 3, 2, 16), jnp.bfloat16)
  out, cache = cache.attend(q, q[:, :, :1], q[:, :, :1], num_new=jnp.asarray([1, 3]), causal=True)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [1, 3])
  _, cache = cache.attend(q[:, :1], q[:, :1, :1], q[:, :1, :1])
  np.testing.assert_array_equal(np.asarray(cache.lengths), [2, 4])
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 4  # k, v, lengths, page_table: one pytree to carry and donate
