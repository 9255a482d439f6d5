"""The split-KV count chosen at trace time (fa3_jax/_split_kv.py), and split counts that do not change results."""

import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _split_kv


@pytest.mark.parametrize("batch,heads,seqlen_q,seqlen_k,want", [
    (1, 32, 1, 131072, 4),    # 32 tiles: four splits fill 128 of 132 SMs in one wave
    (1, 8, 1, 131072, 15),    # 8 tiles: 120 SMs busy, the first count within 85 % of the best
    (8, 32, 1, 32768, 1),     # 256 tiles already fill the GPU
    (1, 32, 1, 256, 1),       # two key blocks: nothing to split
    (2, 8, 1, 65537, 8),      # 16 tiles: 128 CTAs
])
def test_heuristic_fills_the_sms(batch, heads, seqlen_q, seqlen_k, want):
  got = _split_kv.heuristic(batch, heads, seqlen_q, seqlen_k, 128, 128, sms=132)
  assert got == want
  tiles = batch * heads
  if got > 1:  # every choice keeps the GPU at least 85 % as busy as the best count would
    eff = lambda s: (tiles * s / 132) / np.ceil(tiles * s / 132)
    assert eff(got) >= 0.85 * max(eff(s) for s in range(1, 129))


def test_split_counts_agree_on_the_reference_path():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 64)), jnp.bfloat16)
  cache = jnp.asarray(rng.standard_normal((2, 300, 2, 64)), jnp.bfloat16)
  lens = jnp.asarray([17, 300], jnp.int32)
  outs = [fa3_jax.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, num_splits=n) for n in (0, 1, 3, 256)]
  for out in outs[1:]:
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(outs[0], np.float32))


def test_num_splits_above_the_kernels_limit_is_an_error():
  q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
  cache = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="num_splits must be at most 256"):
    fa3_jax.flash_attn_with_kvcache(q, cache, cache, num_splits=257)
