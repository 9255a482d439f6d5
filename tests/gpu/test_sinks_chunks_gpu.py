"""Sinks and attention_chunk on our CUDA kernels against the float32 reference with the FA3 tolerance rule
(fa3_jax.testing, outputs poisoned first): out, lse, dq, dk, dv and d(sinks); a fully masked row with a sink;
chunks as packed sequences (fa3_jax/_chunks.py) over dense, packed and segmented calls; the deterministic backward
with sinks bit for bit; decoding with a chunk and sinks.

The grids rotate MHA / GQA / MQA and awkward lengths through the cases. Each case is one compiled program."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _extension, _validate, reference, testing
from fa3_jax._config import SequenceLayout
from fa3_jax.testing import Packing

pytestmark = pytest.mark.gpu

MASKS = {"none": {}, "causal": dict(causal=True), "local": dict(window_size=(97, 31)),
         "softcap": dict(causal=True, softcap=15.0)}
LAYOUTS = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}
HEAD_DIMS = [(64, 64), (128, 128), (256, 256)]
LENGTHS = [(1, 239), (113, 113), (1023, 1023), (239, 17)]


def compiled(direction, dtype, dims):
  return (dtype, *dims) in _extension.compiled_kernels(direction)


def needs(dtype, dims):
  if not compiled("fwd", dtype, dims):
    pytest.skip(f"fwd kernel {dtype} {dims} not in this build (FA3_JAX_HEAD_DIMS / FA3_JAX_DTYPES)")


def assert_passed(results):
  failures = [msg for ok, msg in results if not ok]
  assert not failures, failures


def sink_cases():
  for i, (dims, mask, scale) in enumerate(itertools.product(HEAD_DIMS, MASKS, (1.0, 10.0))):
    layout = list(LAYOUTS)[i % 3]
    lengths = LENGTHS[(i + i // 3) % len(LENGTHS)]
    yield pytest.param(dims, mask, scale, layout, lengths,
                       id=f"{dims[0]}-{mask}-x{scale:g}-{layout}-{lengths[0]}x{lengths[1]}")


@pytest.mark.parametrize("dims,mask,scale,layout,lengths", list(sink_cases()))
def test_sinks_match_the_reference(dims, mask, scale, layout, lengths):
  needs("bfloat16", dims)
  heads, kv_heads = LAYOUTS[layout]
  results = testing.check_kernel(jnp.bfloat16, *dims, *lengths, heads=heads, kv_heads=kv_heads,
                                 backward=compiled("bwd", "bfloat16", dims), sinks_scale=scale, **MASKS[mask])
  names = [msg.split(":")[0] for _, msg in results]
  assert ("dsinks" in names) == compiled("bwd", "bfloat16", dims)
  assert_passed(results)


def test_a_fully_masked_row_gets_zero_and_its_sink():
  dims = (128, 128)
  needs("bfloat16", dims)
  # causal, 239 queries over 113 keys: the first 126 rows see no key.
  assert_passed(testing.check_kernel(jnp.bfloat16, *dims, 239, 113, heads=4, kv_heads=2, causal=True,
                                     sinks_scale=10.0, backward=compiled("bwd", "bfloat16", dims)))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 239, 4, 128)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((1, 113, 2, 128)), jnp.bfloat16) for _ in range(2))
  sinks = jnp.asarray([0.5, -2.0, 3.0, 8.0], jnp.float32)
  out, lse = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True,
                                                             sinks=sinks))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[:, :126], np.float32), 0.0)
  np.testing.assert_array_equal(np.asarray(lse[0, :, :126]), np.broadcast_to(np.asarray(sinks)[:, None], (4, 126)))


@pytest.mark.parametrize("chunk", [64, 129, 1024])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", HEAD_DIMS)
def test_chunks_match_the_reference(chunk, causal, dims):
  needs("bfloat16", dims)
  lengths = LENGTHS[(chunk + dims[0] + causal) % len(LENGTHS)] if chunk != 1024 else (4097, 4097)
  assert_passed(testing.check_kernel(jnp.bfloat16, *dims, *lengths, heads=6, kv_heads=2, causal=causal,
                                     attention_chunk=chunk, backward=compiled("bwd", "bfloat16", dims)))


def test_chunks_and_sinks_over_a_packing():
  dims = (128, 128)
  needs("bfloat16", dims)
  packing = Packing((1, 113, 0, 1023, 17), (239, 113, 5, 1023, 17), used_q=(1, 100, 0, 1023, 9), extra_q=3,
                    extra_k=7)
  assert_passed(testing.check_kernel(jnp.bfloat16, *dims, 1023, 1023, heads=6, kv_heads=3, causal=True,
                                     packing=packing, attention_chunk=129, sinks_scale=1.0,
                                     backward=compiled("bwd", "bfloat16", dims)))


def test_chunks_within_segments():
  dims = (128, 128)
  needs("bfloat16", dims)
  rng = np.random.default_rng(1)
  ids = np.concatenate([np.zeros(300), np.ones(500), np.full(200, 2), np.full(24, -1)]).astype(np.int32)[None]
  q, k, v = (jnp.asarray(rng.standard_normal((1, 1024, 4, 128)), jnp.bfloat16) for _ in range(3))
  ours = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, max_segments=3,
                                                         attention_chunk=128, return_lse=True))(q, k, v)
  cfg = _validate.attention_config(128, None, True, (-1, -1), 0.0, False, 128)
  sequences = SequenceLayout(segment_ids_q=jnp.asarray(ids), max_segments=3)
  with jax.default_matmul_precision("highest"):
    want = reference.varlen_forward(*(x.astype(jnp.float32) for x in (q, k, v)), cfg, sequences)
  np.testing.assert_allclose(np.asarray(ours[0], np.float32), np.asarray(want[0]), atol=2e-2)
  np.testing.assert_array_equal(np.isneginf(np.asarray(ours[1])), np.isneginf(np.asarray(want[1])))


def test_deterministic_backward_with_sinks_is_bitwise_reproducible():
  dims = (128, 128)
  if not compiled("bwd", "bfloat16", dims):
    pytest.skip("needs the bfloat16 head dim 128 backward")
  rng = np.random.default_rng(2)
  q, dout = (jnp.asarray(rng.standard_normal((2, 2048, 8, 128)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((2, 2048, 2, 128)), jnp.bfloat16) for _ in range(2))
  sinks = jnp.asarray(rng.standard_normal(8), jnp.float32)
  attention = lambda q, k, v, s: fa3_jax.flash_attn_func(q, k, v, causal=True, deterministic=True, sinks=s)
  grads = jax.jit(lambda q, k, v, s, dout: jax.vjp(attention, q, k, v, s)[1](dout))
  first = [np.asarray(g) for g in grads(q, k, v, sinks, dout)]
  for _ in range(19):
    for a, b in zip(first, grads(q, k, v, sinks, dout)):
      np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_decoding_with_a_chunk_and_sinks(seqlen_q):
  dims = (128, 128)
  needs("bfloat16", dims)
  rng = np.random.default_rng(3)
  b, capacity = 3, 4097
  q = jnp.asarray(rng.standard_normal((b, seqlen_q, 32, 128)), jnp.bfloat16)
  k_cache, v_cache = (jnp.asarray(rng.standard_normal((b, capacity, 8, 128)), jnp.bfloat16) for _ in range(2))
  lengths = np.asarray([4097, 1, 2050], np.int32)
  sinks = jnp.asarray(rng.standard_normal(32), jnp.float32)
  out, lse = jax.jit(lambda q, k, v: fa3_jax.flash_attn_with_kvcache(
      q, k, v, cache_seqlens=lengths, causal=True, attention_chunk=1024, sinks=sinks, return_lse=True))(
          q, k_cache, v_cache)
  for i, n in enumerate(lengths):
    # The same attention by the other kernel path: the dense call's chunks as packed sequences.
    want = fa3_jax.flash_attn_func(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], causal=True,
                                   attention_chunk=1024, sinks=sinks, return_lse=True)
    np.testing.assert_allclose(np.asarray(out[i:i + 1], np.float32), np.asarray(want[0], np.float32), atol=2e-2)
    np.testing.assert_allclose(np.asarray(lse[i:i + 1]), np.asarray(want[1]), atol=1e-2)
