"""Every argument check raises at trace time, naming the argument, the expectation and the received value."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _validate


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


@pytest.mark.parametrize("bad,got", [([1.0], "list"), (1.0, "float"), (None, "NoneType"),
                                     (jax.ShapeDtypeStruct((1, 8, 2, 64), jnp.float16), "ShapeDtypeStruct")])
def test_not_an_array(bad, got):
  with pytest.raises(TypeError, match=rf"q must be an array \(jax.Array or numpy.ndarray\), got {got}"):
    fa3_jax.flash_attn_func(bad, *qkv()[1:])


def test_numpy_arrays_are_accepted():
  q, k, v = (np.asarray(x) for x in qkv())
  assert fa3_jax.flash_attn_func(q, k, v).shape == (1, 8, 2, 64)


# float8_e4m3fn takes flash_attn_func's FP8 path (tests/test_fp8.py); the other entry points reject it.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int8])
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


@pytest.mark.parametrize("d", [0, 4, 60, 264, 512])
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
    ((True, 0), TypeError, r"window_size must be a pair of ints \(left, right\), got \(True, 0\)"),
    ((None, 0), TypeError, "window_size must be a pair of ints"),
    (np.array([1, 0]), TypeError, "window_size must be a pair of ints"),
    (3, TypeError, "window_size must be a pair of ints"),
])
def test_window_size(window, error, match):
  with pytest.raises(error, match=match):
    call(*qkv(), window_size=window)


@pytest.mark.parametrize("kwargs", [dict(window_size=(2**40, 2**29)), dict(window_size=(2**70, 0), causal=True)])
def test_windows_beyond_any_sequence_are_unbounded(kwargs):
  # Windows reaching past MAX_SEQLEN exclude nothing; they must not overflow the int32 mask arithmetic.
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), x.shape, x.dtype) for i, x in enumerate(qkv(sq=5, sk=9)))
  want = fa3_jax.flash_attn_func(q, k, v, causal=kwargs.get("causal", False))
  np.testing.assert_array_equal(fa3_jax.flash_attn_func(q, k, v, **kwargs), want)


@pytest.mark.parametrize("name,make", [("window_size", lambda x: (x, 0)), ("causal", lambda x: x > 0),
                                       ("softmax_scale", lambda x: x * 0.5), ("softcap", lambda x: x * 1.0)])
def test_traced_static_arguments_are_named(name, make):
  f = jax.jit(lambda x: fa3_jax.flash_attn_func(*qkv(), **{name: make(x)}))
  with pytest.raises(TypeError, match=f"{name} must be .* got a traced value"):
    f(1)


def test_causal_with_right_window_is_contradictory():
  with pytest.raises(ValueError, match="causal=True allows no keys to the right"):
    call(*qkv(), causal=True, window_size=(-1, 4))


def test_causal_must_be_bool():
  with pytest.raises(TypeError, match="causal must be a bool, got str"):
    call(*qkv(), causal="yes")


# 1e39 and 1e-46 are finite Python floats that are inf and 0 in float32, as the kernels take them.
@pytest.mark.parametrize("softcap,error", [(-1.0, ValueError), (float("inf"), ValueError), (1e39, ValueError),
                                           (1e-46, ValueError), (10**400, ValueError), (float("nan"), ValueError),
                                           ("1", TypeError), (jnp.float32(2.0), TypeError), (True, TypeError)])
def test_softcap(softcap, error):
  with pytest.raises(error, match="softcap must be"):
    call(*qkv(), softcap=softcap)


@pytest.mark.parametrize("scale,error", [(0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                         (1e-300, ValueError), (1e38, ValueError), (10**400, ValueError),
                                         (jnp.float32(0.1), TypeError), (True, TypeError), ("0.1", TypeError)])
def test_softmax_scale(scale, error):
  with pytest.raises(error, match="softmax_scale must be"):
    call(*qkv(), softmax_scale=scale)


def test_softmax_scale_bound_keeps_worst_case_scores_finite():
  # The bound: float32_max / (head_dim * 65504**2 * log2(e)). At it, the largest float16 inputs still give finite
  # results; just above it the call is refused, naming the bound.
  bound = _validate.max_softmax_scale(64)
  big = jnp.finfo(jnp.float16).max
  signs = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (1, 8, 2, 64)), big, -big).astype(jnp.float16)
  q, k, v = jnp.full((1, 8, 2, 64), big, jnp.float16), signs, signs
  out, lse = fa3_jax.flash_attn_func(q, k, v, softmax_scale=bound, return_lse=True)
  assert np.isfinite(np.asarray(out, np.float32)).all() and np.isfinite(np.asarray(lse)).all()
  match = re.escape(f"softmax_scale must be a number in [1.18e-38, {bound:.3g}] for head_dim=64")
  with pytest.raises(ValueError, match=match):
    call(q, k, v, softmax_scale=bound * 1.01)


def test_softmax_scale_over_softcap_must_be_finite_in_float32():
  with pytest.raises(ValueError, match=r"softmax_scale / softcap must be at most"):
    call(*qkv(), softmax_scale=1e20, softcap=1e-20)


@pytest.mark.parametrize("name", ["deterministic", "return_lse"])
def test_bool_flags(name):
  with pytest.raises(TypeError, match=f"{name} must be a bool, got int"):
    call(*qkv(), **{name: 1})


def test_qkvpacked_shape():
  with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, heads, head_dim\), got dim 2 = 2"):
    fa3_jax.flash_attn_qkvpacked_func(jnp.zeros((1, 8, 2, 2, 64), jnp.float16))
  with pytest.raises(ValueError, match="qkv must have shape"):
    fa3_jax.flash_attn_qkvpacked_func(jnp.zeros((1, 8, 3, 64), jnp.float16))


@pytest.mark.parametrize("qkv_,error,match", [
    (jnp.zeros((1, 8, 3, 2, 64), jnp.float32), TypeError, "qkv must be float16 or bfloat16, got float32"),
    (jnp.zeros((1, 8, 3, 2, 60), jnp.float16), ValueError, r"head_dim of qkv must be a multiple of 8 in \[8, 256\]"),
    (jnp.zeros((1, 8, 3, 2, 512), jnp.float16), ValueError, "head_dim of qkv must be"),
    (jax.ShapeDtypeStruct((1, 2**29 + 8, 3, 1, 64), jnp.float16), ValueError, "seqlen of qkv must be at most"),
    ([[1.0]], TypeError, "qkv must be an array"),
])
def test_qkvpacked_errors_name_qkv(qkv_, error, match):
  with pytest.raises(error, match=match):
    if isinstance(qkv_, jax.ShapeDtypeStruct):
      jax.eval_shape(fa3_jax.flash_attn_qkvpacked_func, qkv_)
    else:
      fa3_jax.flash_attn_qkvpacked_func(qkv_)


# ---- sequence length limit (the kernels' mask arithmetic is int32) ----------------------------------------------

def abstract_qkv(sq, sk):
  return [jax.ShapeDtypeStruct((1, s, 1, 64), jnp.float16) for s in (sq, sk, sk)]


TOO_LONG = 2**29 + 1


@pytest.mark.parametrize("sq,sk,name", [(TOO_LONG, 8, "seqlen_q"), (8, TOO_LONG, "seqlen_k")])
def test_seqlen_above_max_is_rejected(sq, sk, name):
  assert _validate.MAX_SEQLEN == 2**29
  with pytest.raises(ValueError, match=rf"{name} must be at most MAX_SEQLEN = 2\*\*29 = 536870912 .* got {TOO_LONG}"):
    call(*abstract_qkv(sq, sk))


def test_seqlen_at_max_is_accepted():
  assert call(*abstract_qkv(_validate.MAX_SEQLEN, 8)).shape == (1, _validate.MAX_SEQLEN, 1, 64)


# ---- zero sizes are legal ---------------------------------------------------------------------------------------

def test_zero_heads_and_kv_heads_give_empty_results():
  out, lse = fa3_jax.flash_attn_func(*qkv(h=0, hk=0), return_lse=True)
  assert out.shape == (1, 8, 0, 64) and lse.shape == (1, 0, 8)
  with pytest.raises(ValueError, match="heads=2, kv_heads=0"):
    call(*qkv(h=2, hk=0))


# ---- kernel_available -----------------------------------------------------------------------------------------

def test_kernel_available_direction():
  with pytest.raises(ValueError, match=r"direction must be one of \('fwd', 'bwd'\), got 'up'"):
    fa3_jax.kernel_available(jnp.bfloat16, 128, direction="up")


@pytest.mark.parametrize("dtype,got", [("foo", "'foo'"), (None, "None"), (jnp.int32, "int32"), (bool, "bool")])
def test_kernel_available_rejects_unknown_or_non_floating_dtypes(dtype, got):
  with pytest.raises(TypeError, match=f"dtype must be a floating dtype .* got {got}"):
    fa3_jax.kernel_available(dtype, 128)


@pytest.mark.parametrize("head_dim,head_dim_v,error,match", [
    (128.0, None, TypeError, "head_dim must be an int, got float"),
    (True, None, TypeError, "head_dim must be an int, got bool"),
    ("128", None, TypeError, "head_dim must be an int, got str"),
    (-8, None, ValueError, "head_dim must be an int >= 0, got -8"),
    (128, -8, ValueError, "head_dim_v must be an int >= 0, got -8"),
    (60, None, ValueError, r"head_dim must be a multiple of 8 in \[8, 256\], got 60"),
    (512, None, ValueError, "head_dim must be a multiple of 8"),
    (128, 64, NotImplementedError, "head_dim=128, head_dim_v=64"),
])
def test_kernel_available_raises_for_head_dims_flash_attn_rejects(head_dim, head_dim_v, error, match):
  with pytest.raises(error, match=match):
    fa3_jax.kernel_available(jnp.bfloat16, head_dim, head_dim_v)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, "float16", np.dtype(np.float16)])
def test_kernel_available_answers_a_bool_for_valid_inputs(dtype):
  assert isinstance(fa3_jax.kernel_available(dtype, 64, 64, direction="bwd"), bool)


def test_float32_never_has_a_kernel():
  assert fa3_jax.kernel_available(jnp.float32, 64) is False  # dot_product_attention runs it on the reference


def test_numpy_scalars_are_accepted():
  out = call(*qkv(), softmax_scale=np.float32(0.5), softcap=np.float64(3.0), window_size=(np.int64(2), 0))
  assert out.shape == (1, 8, 2, 64)
