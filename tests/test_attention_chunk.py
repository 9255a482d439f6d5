"""attention_chunk (Llama 4's chunked local attention) against the dense oracle: the reference path of every entry
point, and the kernels' rewriting of chunks as sequences of a packing (fa3_jax._ops.PackedRun, fa3_jax/_chunks.py),
checked on CPU by running that packing on the reference's varlen path; plus sharding, the cuda lowering and errors."""

import dataclasses
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
from fa3_jax import _ops
from fa3_jax import _segments
from fa3_jax import _validate
from fa3_jax import reference
from fa3_jax._config import SequenceLayout
from fa3_jax.testing import collectives
from oracle import assert_close, assert_out_and_lse_close, dense_attention, mask_arguments
from oracle import numpy_attention, numpy_segment_attention, numpy_varlen_attention, random_qkv

MASKS = {"none": {}, "causal": dict(causal=True), "local": dict(window_size=(20, 5)),
         "softcap": dict(causal=True, softcap=5.0)}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("chunk", [16, 33, 64, 1024])
@pytest.mark.parametrize("sq,sk", [(113, 113), (17, 100), (90, 41)])
def test_forward_matches_the_oracle(mask, chunk, sq, sk):
  q, k, v = random_qkv(0, 2, sq, sk, 4, 2, 16)
  out, lse = fa3_jax.flash_attn_func(q, k, v, return_lse=True, attention_chunk=chunk, **MASKS[mask])
  assert_out_and_lse_close(out, lse, *numpy_attention(q, k, v, chunk=chunk, **mask_arguments(MASKS[mask])))


@pytest.mark.parametrize("mask", ["none", "causal"])
def test_gradients_match_the_oracle(mask):
  q, k, v = random_qkv(1, 2, 70, 70, 4, 2, 16)
  f = lambda q, k, v: jnp.sum(fa3_jax.flash_attn_func(q, k, v, attention_chunk=29, **MASKS[mask]).astype(
      jnp.float32) ** 2)
  g = lambda q, k, v: jnp.sum(dense_attention(q, k, v, chunk=29, **mask_arguments(MASKS[mask])).astype(jnp.float32) ** 2)
  got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(got, jax.grad(g, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))):
    assert_close(a, b, atol=4e-3)


def test_varlen_chunks_count_from_each_sequence_start():
  cu_q, cu_k = np.asarray([0, 50, 51, 90], np.int32), np.asarray([0, 50, 120, 150], np.int32)
  q, k, v = random_qkv(2, 1, 95, 160, 4, 4, 16)
  q, k, v = q[0], k[0], v[0]
  out, lse = fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 50, 70, causal=True, return_lse=True,
                                            attention_chunk=32)
  assert_out_and_lse_close(out, lse, *numpy_varlen_attention(q, k, v, cu_q, cu_k, 50, 70, causal=True, chunk=32))


def test_segment_ids_chunks_count_from_each_segment_start():
  q, k, v = random_qkv(3, 2, 60, 60, 2, 2, 16)
  ids = np.asarray([[0] * 25 + [1] * 30 + [-1] * 5, [0] * 60], np.int32)
  out, lse = fa3_jax.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, max_segments=3, return_lse=True,
                                     attention_chunk=16)
  assert_out_and_lse_close(out, lse, *numpy_segment_attention(q, k, v, ids, ids, causal=True, chunk=16))


# ---- the kernels' packing, run on the reference ---------------------------------------------------------------

def packed_run_forward(q, k, v, cfg, sequences):
  """What the kernel path computes for (cfg, sequences): PackedRun's packing, run on the reference's varlen path."""
  run = _ops.PackedRun.of(q, k, cfg, sequences)
  assert run.cfg.attention_chunk == 0
  out, lse = reference.varlen_forward(run.pack_q(q), run.pack_k(k), run.pack_k(v), run.cfg, run.sequences)
  return run.unpack_q(out), run.unpack_lse(lse)


def packed_run_backward(dout, q, k, v, out, lse, cfg, sequences):
  run = _ops.PackedRun.of(q, k, cfg, sequences)
  dq, dk, dv = reference.varlen_backward(run.pack_q(q), run.pack_k(k), run.pack_k(v), run.pack_q(out),
                                         run.pack_lse(lse), run.pack_q(dout), run.cfg, run.sequences)
  return run.unpack_q(dq), run.unpack_k(dk), run.unpack_k(dv)


LAYOUTS = {
    "dense": (SequenceLayout(), (2, 77, 77)),
    "dense_cross": (SequenceLayout(), (2, 30, 95)),
    "dense_more_queries": (SequenceLayout(), (2, 60, 35)),
    "seqused": (SequenceLayout(seqused_q=np.asarray([77, 40], np.int32), seqused_k=np.asarray([60, 77], np.int32)),
                (2, 77, 77)),
    "packed": (SequenceLayout(np.asarray([0, 40, 40, 75, 80], np.int32), np.asarray([0, 50, 61, 61, 95], np.int32),
                              max_seqlen_q=40, max_seqlen_k=50), (80, 99)),
    "packed_seqused_gaps": (SequenceLayout(np.asarray([0, 30, 70], np.int32), np.asarray([0, 45, 90], np.int32),
                                           np.asarray([20, 33], np.int32), np.asarray([45, 10], np.int32),
                                           max_seqlen_q=40, max_seqlen_k=45), (72, 90)),
    "packed_keys_only": (SequenceLayout(cu_seqlens_k=np.asarray([3, 70, 140], np.int32),
                                        seqused_k=np.asarray([60, 33], np.int32), max_seqlen_k=70), (2, 5, 140)),
    "segmented": (SequenceLayout(segment_ids_q=np.asarray([[0] * 20 + [1] * 50 + [-1] * 7, [2] * 77], np.int32),
                                 max_segments=3), (2, 77, 77)),
}


def layout_inputs(name, seed):
  sequences, shape = LAYOUTS[name]
  heads, kv_heads, d = 4, 2, 16
  rng = np.random.default_rng(seed)
  if sequences.packed_q:
    q = rng.standard_normal((shape[0], heads, d))
  else:
    q = rng.standard_normal((shape[0], shape[1], heads, d))
  if sequences.packed_k:
    k_shape = (shape[-1], kv_heads, d)
  else:
    k_shape = (shape[0], shape[-1], kv_heads, d)
  k, v = rng.standard_normal(k_shape), rng.standard_normal(k_shape)
  return (*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), sequences)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("chunk", [16, 50])
@pytest.mark.parametrize("mask", ["none", "causal", "local"])
def test_packed_run_computes_what_the_reference_does(name, chunk, mask, monkeypatch):
  # Shared segment ids pack by a CUDA op on the kernel path; its XLA twin, equal bit for bit, serves here.
  monkeypatch.setattr(_ops, "segment_packing", _segments.packing)
  q, k, v, sequences = layout_inputs(name, seed=chunk)
  cfg = _validate.attention_config(16, None, MASKS[mask].get("causal", False), MASKS[mask].get("window_size", (-1, -1)),
                                   0.0, False, chunk)
  out, lse = packed_run_forward(q, k, v, cfg, sequences)
  want_out, want_lse = reference.varlen_forward(q, k, v, cfg, sequences)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  assert_close(out, want_out, atol=1e-5)
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite], atol=1e-5)
  dout = jnp.asarray(np.random.default_rng(7).standard_normal(out.shape), jnp.float32)
  got = packed_run_backward(dout, q, k, v, want_out, want_lse, cfg, sequences)
  for a, b in zip(got, reference.varlen_backward(q, k, v, want_out, want_lse, dout, cfg, sequences)):
    assert_close(a, b, atol=1e-5)


def test_the_reference_chunk_rule_is_the_oracle_one():
  # The packed-run test above trusts reference.varlen_forward with chunks; pin it to the oracle on a packing.
  q, k, v, sequences = layout_inputs("packed", seed=3)
  cfg = _validate.attention_config(16, None, True, (-1, -1), 0.0, False, 16)
  out, lse = reference.varlen_forward(q, k, v, cfg, sequences)
  want = numpy_varlen_attention(q, k, v, sequences.cu_seqlens_q, sequences.cu_seqlens_k, 40, 50, causal=True,
                                chunk=16)
  assert_out_and_lse_close(out, lse, *want)


def test_chunk_layout_size_is_bounded_by_the_keys():
  # B + total_k // C sequences at most, whatever the packing.
  q, k, v, sequences = layout_inputs("packed", seed=4)
  cfg = _validate.attention_config(16, None, False, (-1, -1), 0.0, False, 16)
  run = _ops.PackedRun.of(q, k, cfg, sequences)
  assert run.sequences.cu_seqlens_k.shape[0] - 1 <= 4 + 99 // 16
  assert run.sequences.max_seqlen_q == 16 and run.sequences.max_seqlen_k == 16


# ---- kvcache -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seqlen_q", [1, 5])
@pytest.mark.parametrize("leftpad", [False, True])
def test_kvcache_chunks(seqlen_q, leftpad):
  # GQA 8 / 2: a single decoding row stays packed and BSHD (its chunk becomes the keys' start).
  q, k_cache, v_cache = random_qkv(5, 3, seqlen_q, 90, 8, 2, 16)
  lengths = np.asarray([90, 33, 64], np.int32)
  pad = np.asarray([0, 5, 17], np.int32) if leftpad else None
  out, lse = fa3_jax.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, cache_leftpad=pad,
                                             causal=True, return_lse=True, attention_chunk=32)
  for b, n in enumerate(lengths):
    lo = 0 if pad is None else pad[b]
    want = numpy_attention(q[b:b + 1], k_cache[b:b + 1, lo:n], v_cache[b:b + 1, lo:n], causal=True, chunk=32)
    assert_out_and_lse_close(out[b:b + 1], lse[b:b + 1], *want)


# ---- jax.nn's drop-in and sharding ----------------------------------------------------------------------------

@pytest.mark.parametrize("t,s", [(40, 40), (20, 50)])
def test_dot_product_attention_chunks_are_top_left(t, s):
  q, k, v = random_qkv(6, 2, t, s, 4, 2, 16)
  out = fa3_jax.dot_product_attention(q, k, v, is_causal=True, attention_chunk=16)
  i, j = np.arange(t)[:, None], np.arange(s)[None, :]
  mask = (j <= i) & (i // 16 == j // 16)
  want = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask=jnp.asarray(mask))
  assert_close(out, want)


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
def test_a_sharded_sequence_is_gathered_not_ring_attended(mode):
  mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(mode, mode))
  q, k, v = random_qkv(7, 2, 64, 64, 4, 2, 16)
  spec = P("dp", "sp")
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  f = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, attention_chunk=16)
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(put(q), put(k), put(v)).compile()
    out = compiled(put(q), put(k), put(v))
  assert collectives(compiled.as_text())["collective-permute"] == 0
  assert_close(out, numpy_attention(q, k, v, causal=True, chunk=16)[0])


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit])
def test_batch_and_head_sharding_needs_no_collectives(mode):
  mesh = jax.make_mesh((2, 4), ("dp", "tp"), axis_types=(mode, mode))
  q, k, v = random_qkv(8, 4, 48, 48, 8, 8, 16)
  spec = P("dp", None, "tp")
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  f = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, attention_chunk=16)
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(put(q), put(k), put(v)).compile()
    out = compiled(put(q), put(k), put(v))
  assert sum(collectives(compiled.as_text()).values()) == 0, collectives(compiled.as_text())
  assert_close(out, numpy_attention(q, k, v, causal=True, chunk=16)[0])


def test_vmap_equals_a_loop():
  q, k, v = random_qkv(9, 3, 40, 40, 2, 2, 16)
  f = lambda q, k, v: fa3_jax.flash_attn_func(q[None], k[None], v[None], causal=True, attention_chunk=16)[0]
  got = jax.vmap(f)(q, k, v)
  for i in range(3):
    assert_close(got[i], f(q[i], k[i], v[i]))


# ---- the cuda lowering ----------------------------------------------------------------------------------------

ALL_KERNELS = frozenset((t, d, d) for t in ("bfloat16", "float16") for d in (64, 128))


def test_chunked_calls_lower_to_the_varlen_kernels(monkeypatch):
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: ALL_KERNELS)
  q, k, v = (jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16) for _ in range(3))
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, attention_chunk=128).astype(
      jnp.float32).sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  for target in ("fa3_jax_fwd", "fa3_jax_bwd"):
    (call,) = [line for line in text.splitlines() if f"@{target}(" in line]
    # Both sides packed: (b * seqlen, heads, d); b + (b * seqlen) // chunk = 6 chunk sequences (7 cu_seqlens).
    assert "tensor<600x4x64xbf16>" in call and "tensor<7xi32>" in call
    assert "with_cu_seqlens_q = true" in call and "with_seqused_k = true" in call
    assert "max_seqlen_q = 128 : i64" in call and "window_right = 0 : i64" in call


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,error", [(-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_attention_chunk_names_the_argument(value, error):
  q, k, v = random_qkv(10, 1, 8, 8, 2, 2, 16)
  with pytest.raises(error, match="attention_chunk must be an int"):
    fa3_jax.flash_attn_func(q, k, v, attention_chunk=value)


def test_pack_gqa_with_chunks_and_several_rows_is_refused():
  q, k_cache, v_cache = random_qkv(11, 1, 4, 40, 4, 1, 16)
  with pytest.raises(NotImplementedError, match="attention_chunk only with seqlen_q == 1"):
    fa3_jax.flash_attn_with_kvcache(q, k_cache, v_cache, attention_chunk=16, pack_gqa=True)


def test_chunks_longer_than_any_sequence_clamp_to_the_same_rule():
  cfg = _validate.attention_config(16, None, False, (-1, -1), 0.0, False, 2**40)
  assert cfg.attention_chunk == _validate.MAX_SEQLEN
  assert dataclasses.replace(cfg, attention_chunk=0) != cfg


def test_vmapped_varlen_and_kvcache_chunks_lower_for_cuda(monkeypatch):
  # The chunk packing is computed from traced layouts under vmap, then folded like any packing.
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: ALL_KERNELS)
  q, k = jax.ShapeDtypeStruct((3, 200, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((3, 260, 2, 64), jnp.bfloat16)
  cu = jax.ShapeDtypeStruct((3, 3), jnp.int32)
  varlen = lambda q, k, v, cu_q, cu_k: fa3_jax.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 150, 200, causal=True,
                                                                     attention_chunk=64)
  text = jax.jit(jax.vmap(varlen)).trace(q, k, k, cu, cu).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("@fa3_jax_fwd(") == 1
  cache = jax.ShapeDtypeStruct((3, 300, 2, 64), jnp.bfloat16)
  one_row = jax.ShapeDtypeStruct((3, 1, 4, 64), jnp.bfloat16)
  decode = lambda q, k, v: fa3_jax.flash_attn_with_kvcache(q, k, v, cache_seqlens=250, attention_chunk=64,
                                                           sinks=jnp.zeros((4,)))
  text = jax.jit(decode).trace(one_row, cache, cache).lower(lowering_platforms=("cuda",)).as_text()
  (call,) = [line for line in text.splitlines() if "@fa3_jax_fwd(" in line]
  # A single decoding row: packed GQA (2 kv heads of 2 rows), keys packed from each row's chunk start.
  assert "tensor<3x2x2x64xbf16>" in call and "with_cu_seqlens_k = true" in call
  assert "with_cu_seqlens_q = false" in call


def test_decoding_splits_follow_the_chunk_not_the_capacity(monkeypatch):
  # 1 x 8 heads over a 64k cache would split 64 ways; a 1024-key chunk leaves 8 key blocks, so at most 4 splits.
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: ALL_KERNELS)
  q = jax.ShapeDtypeStruct((1, 1, 8, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((1, 65536, 8, 128), jnp.bfloat16)
  splits = lambda **kw: int(re.search(r"num_splits = (\d+)", jax.jit(lambda q, k, v: fa3_jax.flash_attn_with_kvcache(
      q, k, v, pack_gqa=False, **kw)).trace(q, cache, cache).lower(lowering_platforms=("cuda",)).as_text()).group(1))
  assert splits() > 8 and 1 < splits(attention_chunk=1024) <= 4
