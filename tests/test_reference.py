"""The reference path (what runs without a kernel) against the float64 NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import reference
from fa3_jax._config import AttentionConfig
from oracle import numpy_attention, random_qkv

# seqlen pairs: q shorter, equal and longer than k; lengths that are not multiples of any block; seqlen 1.
SEQLENS = [(1, 1), (1, 239), (17, 17), (113, 203), (239, 1), (128, 217), (300, 300), (799, 3)]


def check_against_oracle(q, k, v, atol=2e-3, **kwargs):
  out, lse = fa3_jax.flash_attn_func(q, k, v, return_lse=True, **kwargs)
  ref_out, ref_lse = numpy_attention(q, k, v, scale=kwargs.get("softmax_scale"), causal=kwargs.get("causal", False),
                                     window=kwargs.get("window_size", (-1, -1)), softcap=kwargs.get("softcap", 0.0))
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=atol, rtol=atol)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_non_causal(seqlen_q, seqlen_k):
  check_against_oracle(*random_qkv(0, 2, seqlen_q, seqlen_k, 4, 4, 64))


@pytest.mark.parametrize("seqlen_q,seqlen_k", SEQLENS)
def test_causal_is_bottom_right_aligned(seqlen_q, seqlen_k):
  check_against_oracle(*random_qkv(1, 2, seqlen_q, seqlen_k, 4, 2, 32), causal=True)


@pytest.mark.parametrize("window", [(16, -1), (-1, 8), (5, 3), (0, 0), (40, 0)])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(113, 203), (203, 113), (128, 128)])
def test_sliding_window(window, seqlen_q, seqlen_k):
  check_against_oracle(*random_qkv(2, 1, seqlen_q, seqlen_k, 2, 1, 64), window_size=window)


def test_causal_with_left_window():
  check_against_oracle(*random_qkv(3, 2, 150, 150, 4, 4, 64), causal=True, window_size=(31, -1))


@pytest.mark.parametrize("causal", [False, True])
def test_softcap(causal):
  q, k, v = random_qkv(4, 2, 97, 131, 4, 2, 64)
  check_against_oracle(q * 4, k, v, softcap=15.0, causal=causal)


@pytest.mark.parametrize("heads,kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_gqa_and_mqa(heads, kv_heads):
  check_against_oracle(*random_qkv(5, 2, 77, 91, heads, kv_heads, 64), causal=True)


def test_softmax_scale():
  check_against_oracle(*random_qkv(6, 1, 33, 65, 2, 2, 128), softmax_scale=0.3)


@pytest.mark.parametrize("head_dims", [(8, 8), (96, 96), (192, 128), (256, 256), (72, 72)])
def test_head_dims(head_dims):
  check_against_oracle(*random_qkv(7, 1, 40, 50, 2, 1, *head_dims))


def test_bfloat16():
  check_against_oracle(*random_qkv(8, 2, 65, 129, 4, 2, 64, dtype=jnp.bfloat16), atol=1e-2, causal=True)


def test_rows_without_visible_keys_give_zero_and_minus_inf():
  # seqlen_q > seqlen_k with causal: the first seqlen_q - seqlen_k rows see no key at all.
  q, k, v = random_qkv(9, 2, 50, 20, 2, 2, 64)
  out, lse = fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True)
  assert np.all(np.asarray(out[:, :30]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[:, :, :30])))
  assert np.all(np.isfinite(np.asarray(lse[:, :, 30:])))
  check_against_oracle(q, k, v, causal=True)


def test_window_that_hides_everything_from_some_rows():
  # right = 0, left = 0 with seqlen_k < seqlen_q: rows above the diagonal see nothing.
  check_against_oracle(*random_qkv(10, 1, 64, 16, 2, 2, 64), window_size=(0, 0))


def test_qkvpacked_matches_unpacked():
  q, k, v = random_qkv(11, 2, 57, 57, 4, 4, 64)
  packed = jnp.stack([q, k, v], axis=2)
  np.testing.assert_array_equal(fa3_jax.flash_attn_qkvpacked_func(packed, causal=True),
                                fa3_jax.flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("block_k", [1, 7, 64, 1024])
def test_result_does_not_depend_on_block_size(block_k):
  q, k, v = random_qkv(12, 1, 45, 130, 2, 1, 32)
  cfg = AttentionConfig(softmax_scale=0.2, window_left=20, window_right=3)
  out, lse = reference.attention_forward(q, k, v, cfg, block_k=block_k)
  ref_out, ref_lse = numpy_attention(q, k, v, scale=0.2, window=(20, 3))
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=2e-3)
  np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=1e-4)


@pytest.mark.parametrize("shape_q,shape_k", [((0, 5, 2, 64), (0, 7, 2, 64)), ((2, 0, 2, 64), (2, 7, 2, 64)),
                                             ((2, 5, 2, 64), (2, 0, 2, 64))])
def test_empty_shapes(shape_q, shape_k):
  q = jnp.ones(shape_q, jnp.float16)
  k = jnp.ones(shape_k, jnp.float16)
  out, lse = fa3_jax.flash_attn_func(q, k, k, return_lse=True)
  assert out.shape == shape_q and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  grads = jax.grad(lambda q, k: fa3_jax.flash_attn_func(q, k, k).astype(jnp.float32).sum(), argnums=(0, 1))(q, k)
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_memory_is_linear_in_seqlen():
  # The blockwise reference never materialises a (seqlen_q, seqlen_k) score matrix: at 8k x 8k a dense f32
  # score tensor would be 256 MiB per head; the compiled reference's temporaries stay far below that.
  q, k, v = random_qkv(13, 1, 8192, 8192, 1, 1, 64)
  compiled = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v)).lower(q, k, v).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 8192 * 8192 * 4 / 8, temp
