"""Every argument check raises at trace time, naming the argument, the expectation and the received value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax


def qkv(b=1, sq=8, sk=8, h=2, hk=2, d=64, dv=None, dtype=jnp.float16):
  dv = d if dv is None else dv
  return (jnp.zeros((b, sq, h, d), dtype), jnp.zeros((b, sk, hk, d), dtype), jnp.zeros((b, sk, hk, dv), dtype))


def call(*args, **kwargs):
  # Trace only: every error must surface before anything runs.
  return jax.eval_shape(lambda *a: fa3_jax.flash_attn_func(*a, **kwargs), *args)


@pytest.mark.parametrize("bad,match", [
    ((jnp.zeros((8, 2, 64), jnp.float16),) + qkv()[1:], r"q must have shape \(batch, seqlen_q, heads, head_dim\)"),
    (qkv()[:1] + (jnp.zeros((1, 8, 2), jnp.float16), qkv()[2]), r"k must have shape"),
    (qkv()[:2] + (jnp.zeros((1, 8, 2, 64, 1), jnp.float16),), r"v must have shape"),
])
def test_rank(bad, match):
  with pytest.raises(ValueError, match=match):
    call(*bad)


def test_not_an_array():
  with pytest.raises(TypeError, match="q must be an array, got list"):
    fa3_jax.flash_attn_func([1.0], *qkv()[1:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8, jnp.float8_e4m3fn])
def test_dtype_must_be_half(dtype):
  q, k, v = qkv()
  with pytest.raises(TypeError, match=f"q must be float16 or bfloat16, got {jnp.dtype(dtype).name}"):
    call(q.astype(dtype), k.astype(dtype), v.astype(dtype))


def test_dtypes_must_match():
  q, k, v = qkv()
  with pytest.raises(TypeError, match="q, k and v must share a dtype, got q=float16, k=bfloat16, v=float16"):
    call(q, k.astype(jnp.bfloat16), v)


def test_batch_mismatch():
  q, _, _ = qkv(b=2)
  _, k, v = qkv(b=3)
  with pytest.raises(ValueError, match="same batch size, got q=2, k=3, v=3"):
    call(q, k, v)


def test_seqlen_k_mismatch():
  q, k, _ = qkv(sk=8)
  _, _, v = qkv(sk=9)
  with pytest.raises(ValueError, match="k and v must have the same seqlen_k, got k=8, v=9"):
    call(q, k, v)


def test_kv_heads_mismatch():
  q, k, _ = qkv(h=4, hk=2)
  _, _, v = qkv(h=4, hk=4)
  with pytest.raises(ValueError, match="same number of kv_heads, got k=2, v=4"):
    call(q, k, v)


def test_heads_not_multiple_of_kv_heads():
  with pytest.raises(ValueError, match="heads=6, kv_heads=4"):
    call(*qkv(h=6, hk=4))


def test_k_head_dim_mismatch():
  q, _, _ = qkv(d=64)
  _, k, v = qkv(d=32)
  with pytest.raises(ValueError, match="q head_dim=64, k head_dim=32"):
    call(q, k, v)


@pytest.mark.parametrize("d", [4, 60, 264, 512])
def test_head_dim_multiple_of_8_at_most_256(d):
  with pytest.raises(ValueError, match=f"head_dim must be a multiple of 8 in \\[8, 256\\], got {d}"):
    call(*qkv(d=d))


def test_unsupported_head_dim_v_is_not_implemented():
  with pytest.raises(NotImplementedError, match=r"head_dim=128, head_dim_v=64"):
    call(*qkv(d=128, dv=64))


@pytest.mark.parametrize("window,error,match", [
    ((-2, 0), ValueError, r"window_size must be a pair of ints >= -1 \(-1 = unbounded\), got \(-2, 0\)"),
    ((1, 2, 3), TypeError, "window_size must be a pair of ints"),
    ((1.5, 0), TypeError, "window_size must be a pair of ints"),
    (3, TypeError, "window_size must be a pair of ints"),
])
def test_window_size(window, error, match):
  with pytest.raises(error, match=match):
    call(*qkv(), window_size=window)


def test_causal_with_right_window_is_contradictory():
  with pytest.raises(ValueError, match="causal=True allows no keys to the right"):
    call(*qkv(), causal=True, window_size=(-1, 4))


def test_causal_must_be_bool():
  with pytest.raises(TypeError, match="causal must be a bool, got str"):
    call(*qkv(), causal="yes")


@pytest.mark.parametrize("softcap,error", [(-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError),
                                           (jnp.float32(2.0), TypeError)])
def test_softcap(softcap, error):
  with pytest.raises(error, match="softcap must be"):
    call(*qkv(), softcap=softcap)


@pytest.mark.parametrize("scale,error", [(0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                         (jnp.float32(0.1), TypeError), (True, TypeError)])
def test_softmax_scale(scale, error):
  with pytest.raises(error, match="softmax_scale must be"):
    call(*qkv(), softmax_scale=scale)


@pytest.mark.parametrize("name", ["deterministic", "return_lse"])
def test_bool_flags(name):
  with pytest.raises(TypeError, match=f"{name} must be a bool, got int"):
    call(*qkv(), **{name: 1})


def test_qkvpacked_shape():
  with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, heads, head_dim\), got dim 2 = 2"):
    fa3_jax.flash_attn_qkvpacked_func(jnp.zeros((1, 8, 2, 2, 64), jnp.float16))
  with pytest.raises(ValueError, match="qkv must have shape"):
    fa3_jax.flash_attn_qkvpacked_func(jnp.zeros((1, 8, 3, 64), jnp.float16))


def test_kernel_available_direction():
  with pytest.raises(ValueError, match="direction must be 'fwd' or 'bwd', got 'up'"):
    fa3_jax.kernel_available(jnp.bfloat16, 128, direction="up")


def test_numpy_scalars_are_accepted():
  out = call(*qkv(), softmax_scale=np.float32(0.5), softcap=np.float64(3.0), window_size=(np.int64(2), 0))
  assert out.shape == (1, 8, 2, 64)
