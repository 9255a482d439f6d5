"""fa3_jax.fp8 and flash_attn_func's FP8 path on the reference: the Hadamard rotation against dense algebra, the
quantization against e4m3's rounding bound, the FP8 call against attention on the dequantized values, the accuracy
ordering of the scalings on FlashAttention-3's outlier distribution (float64 oracle), and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import fp8


def _normal(rng, *shape, dtype=jnp.bfloat16):
  return jnp.asarray(rng.standard_normal(shape), dtype)


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
def test_hadamard_rotation_is_orthogonal_and_spreads_outliers(d):
  rng = np.random.default_rng(d)
  x, y = _normal(rng, 2, 7, 3, d, dtype=jnp.float32), _normal(rng, 2, 5, 3, d, dtype=jnp.float32)
  key = jax.random.PRNGKey(4)
  rx, ry = fp8.hadamard_rotate(x, key), fp8.hadamard_rotate(y, key)
  np.testing.assert_allclose(np.einsum("bshd,bthd->bhst", rx, ry), np.einsum("bshd,bthd->bhst", x, y), atol=1e-4)
  n = fp8.hadamard_block(d)
  assert n == {64: 64, 96: 32, 128: 128, 192: 64, 256: 256}[d]
  one_hot = jnp.zeros((1, 1, 1, d)).at[..., 0].set(1.0)
  spread = np.abs(np.asarray(fp8.hadamard_rotate(one_hot, key)))[0, 0, 0]
  np.testing.assert_allclose(spread[:n], 1 / np.sqrt(n), rtol=1e-6)  # over its whole block
  np.testing.assert_array_equal(spread[n:], 0)


@pytest.mark.parametrize("kwargs, descale_shape", [
    (dict(), (2, 4)), (dict(groups=2), (2, 2)), (dict(block_size=fp8.BLOCK_SIZE), (2, 3, 4)),
    (dict(per_tensor=True), (2, 4)), (dict(block_size=fp8.BLOCK_SIZE, hadamard=True, key=jax.random.PRNGKey(1)),
                                      (2, 3, 4))])
def test_quantize_rounds_within_e4m3_precision(kwargs, descale_shape):
  rng = np.random.default_rng(0)
  x = _normal(rng, 2, 300, 4, 64, dtype=jnp.float32) * jnp.asarray(rng.uniform(0.1, 30, (2, 1, 4, 1)), jnp.float32)
  x8, descale = fp8.quantize(x, **kwargs)
  assert x8.dtype == jnp.float8_e4m3fn and descale.dtype == jnp.float32 and descale.shape == descale_shape
  real = fp8.hadamard_rotate(x, kwargs["key"]) if kwargs.get("hadamard") else x
  back = np.asarray(fp8.dequantize(x8, descale))
  scale = np.asarray(fp8.expand_descale(descale, 300, 4))
  # e4m3: 3 mantissa bits (half an ulp = 2^-4 relative), subnormals spaced 2^-9 in units of the descale.
  assert np.all(np.abs(back - np.asarray(real)) <= 2.0**-4 * np.abs(np.asarray(real)) + 2.0**-10 * scale)
  # Each descale entry maps the largest magnitude it covers onto E4M3_MAX.
  assert float(jnp.max(jnp.abs(x8.astype(jnp.float32)))) == fp8.E4M3_MAX
  if kwargs.get("per_tensor"):
    assert np.unique(np.asarray(descale)).size == 1


def test_quantize_gives_all_zero_groups_descale_one():
  x = jnp.zeros((1, 4, 2, 16)).at[:, :, 1].set(3.0)
  x8, descale = fp8.quantize(x)
  np.testing.assert_array_equal(np.asarray(descale), np.float32([[1.0, 3.0 / fp8.E4M3_MAX]]))
  np.testing.assert_array_equal(np.asarray(x8[:, :, 0], np.float32), 0)


@pytest.mark.parametrize("block_size", [None, fp8.BLOCK_SIZE])
def test_fp8_call_is_attention_on_the_dequantized_values(block_size):
  rng = np.random.default_rng(1)
  q, k, v = _normal(rng, 2, 200, 8, 64), _normal(rng, 2, 150, 2, 64), _normal(rng, 2, 150, 2, 64)
  q8, qs = fp8.quantize(q, groups=2, block_size=block_size)
  k8, ks = fp8.quantize(k, block_size=block_size)
  v8, vs = fp8.quantize(v, block_size=block_size)
  for out_dtype in (None, jnp.float16):
    got, lse = jax.jit(lambda *a: fa3_jax.flash_attn_func(*a[:3], q_descale=a[3], k_descale=a[4], v_descale=a[5],
                                                          causal=True, return_lse=True, out_dtype=out_dtype))(
        q8, k8, v8, qs, ks, vs)
    dtype = jnp.bfloat16 if out_dtype is None else out_dtype
    real = [fp8.dequantize(x, s).astype(dtype) for x, s in ((q8, qs), (k8, ks), (v8, vs))]
    want, want_lse = fa3_jax.flash_attn_func(*real, causal=True, return_lse=True)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


def test_block_scaling_with_hadamard_beats_per_tensor_on_outliers():
  # FlashAttention-3's test distribution: N(0, 1) plus N(0, 100) on 0.1 % of the entries. Errors against float64.
  rng = np.random.default_rng(0)
  b, s, h, d = 1, 1024, 2, 128
  q, k, v = (rng.standard_normal((b, s, h, d)) + 10 * rng.standard_normal((b, s, h, d)) *
             (rng.random((b, s, h, d)) < 1e-3) for _ in range(3))
  scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(d)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  want = np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))

  def rmse(**kwargs):
    qk_args = dict(kwargs)
    v_args = {n: x for n, x in kwargs.items() if n not in ("hadamard", "key")}
    (q8, qs), (k8, ks), (v8, vs) = fp8.quantize(q, **qk_args), fp8.quantize(k, **qk_args), fp8.quantize(v, **v_args)
    out = fa3_jax.flash_attn_func(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)
    return float(np.sqrt(np.mean((np.asarray(out, np.float64) - want) ** 2)))

  per_tensor = rmse(per_tensor=True)
  blocked = rmse(block_size=fp8.BLOCK_SIZE)
  rotated = rmse(block_size=fp8.BLOCK_SIZE, hadamard=True, key=jax.random.PRNGKey(3))
  # (benchmarks/RESULTS.md records the 4k cell; the ratio there also depends on the draw.)
  assert rotated < blocked < per_tensor and per_tensor > 1.5 * rotated, (per_tensor, blocked, rotated)
  # The one-call helper is that best configuration.
  helper = float(np.sqrt(np.mean((np.asarray(fp8.attention(q, k, v, key=jax.random.PRNGKey(3)), np.float64) -
                                  want) ** 2)))
  assert helper == pytest.approx(rotated, rel=1e-6)


def test_fp8_path_is_forward_only_and_checks_arguments():
  rng = np.random.default_rng(2)
  q = _normal(rng, 1, 16, 4, 32)
  q8, qs = fp8.quantize(q, groups=2)
  k8, ks = fp8.quantize(_normal(rng, 1, 16, 2, 32))
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda q8: fa3_jax.flash_attn_func(q8, k8, k8, q_descale=qs).astype(jnp.float32).sum())(q8)
  with pytest.raises(TypeError, match="must all be float8_e4m3fn on the FP8 path, got k bfloat16"):
    fa3_jax.flash_attn_func(q8, q[:, :, :2], k8)
  with pytest.raises(ValueError, match=r"k_descale must have shape \(batch, kv_heads\) = \(1, 2\)"):
    fa3_jax.flash_attn_func(q8, k8, k8, k_descale=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="belong to the FP8 path"):
    fa3_jax.flash_attn_func(q, q, q, q_descale=qs)
  with pytest.raises(TypeError, match="out_dtype must be bfloat16 or float16"):
    fa3_jax.flash_attn_func(q8, k8, k8, out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="heads of q must be a multiple of kv_heads"):
    fa3_jax.flash_attn_func(k8, q8, q8)
  with pytest.raises(TypeError, match="q must be float16 or bfloat16, got float8_e4m3fn"):  # no FP8 varlen yet
    cu = jnp.asarray([0, 16], jnp.int32)
    fa3_jax.flash_attn_varlen_func(q8[0], k8[0], k8[0], cu, cu, 16, 16)
  with pytest.raises(NotImplementedError, match="block_size must be fa3_jax.fp8.BLOCK_SIZE = 128"):
    fp8.quantize(q, block_size=64)
  with pytest.raises(ValueError, match="hadamard=True needs key"):
    fp8.quantize(q, hadamard=True)
  with pytest.raises(ValueError, match="groups must divide"):
    fp8.quantize(q, groups=3)
  with pytest.raises(ValueError, match="exclusive"):
    fp8.quantize(q, per_tensor=True, block_size=fp8.BLOCK_SIZE)
