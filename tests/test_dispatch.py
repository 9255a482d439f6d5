"""Kernel-or-reference dispatch and vmap folding in _ops.py: which GPUs take the kernels, size-0 vmaps."""

import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3_jax
from fa3_jax import _extension
from fa3_jax import _ops
from fa3_jax import reference
from fa3_jax._config import AttentionConfig

KERNELS = frozenset((t, d, d) for t in ("bfloat16", "float16") for d in (64, 128))


def _gpu(kind, capability):
  return types.SimpleNamespace(platform="gpu", device_kind=kind, compute_capability=capability)


@pytest.fixture
def fake_gpus(monkeypatch):
  """Pretend kernels were built and set which GPUs JAX sees (the lowering itself is for cuda on this CPU machine)."""
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: KERNELS)
  _ops._warn_reference_on_gpu.cache_clear()

  def use(*devices):
    monkeypatch.setattr(_ops, "_gpus", lambda: list(devices))
  yield use
  _ops._warn_reference_on_gpu.cache_clear()


def _cuda_text(f, *args):
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  return jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def _qkv(b=1, s=64, h=2, d=64, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return tuple(jax.random.normal(key, (b, s, h, d), jnp.float32).astype(dtype) for key in keys)


def _grad_text():
  loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()
  return _cuda_text(jax.grad(loss, argnums=(0, 1, 2)), *_qkv())


def test_hopper_gpu_takes_the_kernels(fake_gpus):
  fake_gpus(_gpu("NVIDIA H200", "9.0"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    text = _grad_text()
  assert "@fa3_jax_fwd" in text and "@fa3_jax_bwd" in text


@pytest.mark.parametrize("kind, capability", [("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA B200", "10.0"),
                                              ("NVIDIA L40S", "8.9")])
def test_non_hopper_gpu_runs_the_reference_with_one_warning(fake_gpus, kind, capability):
  fake_gpus(_gpu(kind, capability))
  with pytest.warns(UserWarning, match=rf"need a Hopper GPU .*{kind} \(compute capability {capability}\)"):
    text = _grad_text()
  assert "fa3_jax_fwd" not in text and "fa3_jax_bwd" not in text
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once per direction, not per call
    _grad_text()


def test_mixed_gpus_run_the_reference(fake_gpus):
  fake_gpus(_gpu("NVIDIA H100 80GB HBM3", "9.0"), _gpu("NVIDIA A100-SXM4-80GB", "8.0"))
  with pytest.warns(UserWarning, match="A100"):
    text = _grad_text()
  assert "fa3_jax_fwd" not in text


def test_no_gpu_lowering_for_cuda_emits_the_kernels(fake_gpus):
  fake_gpus()
  assert "@fa3_jax_fwd" in _grad_text()


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, None), (None, 0, 0)])
def test_vmap_over_a_size_zero_axis_returns_empty_results(in_axes):
  q, k, v = _qkv(s=17)
  q, k, v = (x if a is None else jnp.zeros((0, *x.shape), x.dtype) for x, a in zip((q, k, v), in_axes))
  f = jax.vmap(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True), in_axes=in_axes)
  out, lse = jax.jit(f)(q, k, v)
  assert out.shape == (0, 1, 17, 2, 64) and out.dtype == jnp.bfloat16
  assert lse.shape == (0, 1, 2, 17) and lse.dtype == jnp.float32
  want = jax.vmap(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), in_axes=in_axes)(q, k, v)
  assert want.shape == out.shape


def test_grad_of_vmap_over_a_size_zero_axis_is_empty():
  q, k, v = (jnp.zeros((0, *x.shape), x.dtype) for x in _qkv(s=17))
  loss = lambda q, k, v: jax.vmap(fa3_jax.flash_attn_func)(q, k, v).astype(jnp.float32).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_lse_cotangent_reaches_the_backward_kernel_as_an_optional_operand(fake_gpus):
  fake_gpus()
  q, k, v = _qkv()

  def loss(q, k, v):
    out, lse = fa3_jax.flash_attn_func(q, k, v, return_lse=True)
    return out.astype(jnp.float32).sum() + (lse * lse).sum()

  text = _cuda_text(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  (call,) = [line for line in text.splitlines() if "@fa3_jax_bwd" in line]
  assert "with_dlse = true" in call
  bf16 = "tensor<1x64x2x64xbf16>"
  operands = ", ".join([bf16] * 5 + ["tensor<1x2x64xf32>"] * 2)  # dout, q, k, v, out; lse, dlse
  assert f": ({operands}) -> ({bf16}, {bf16}, {bf16}, " in call


def test_plain_backward_announces_no_lse_cotangent(fake_gpus):
  fake_gpus()
  (call,) = [line for line in _grad_text().splitlines() if "@fa3_jax_bwd" in line]
  assert "with_dlse = false" in call


def test_ffi_op_rejects_unknown_or_missing_operands():
  with pytest.raises(TypeError, match="fa3_jax_bwd takes operands"):
    _ops.BWD((), dict(q=1))
  with pytest.raises(TypeError, match="fa3_jax_fwd takes operands"):
    _ops.FWD((), dict(q=1, k=2, v=3, dlse=4))


def test_reference_lse_cotangent_matches_autodiff_of_dense_attention():
  """The dlse term (D - dlse in the backward) against jax.grad of a dense float32 softmax attention."""
  q, k, v = (x.astype(jnp.float32) for x in _qkv(s=33, d=64))
  cfg = AttentionConfig(softmax_scale=0.125, window_right=0)
  w = jax.random.normal(jax.random.PRNGKey(5), (1, 2, 33), jnp.float32)

  def dense(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.125
    s = jnp.where(jnp.tril(jnp.ones((33, 33), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v)
    return out, lse

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v)[0] ** 2).sum() + (w * fn(q, k, v)[1]).sum()

  want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: reference_attention(q, k, v, cfg)), argnums=(0, 1, 2))(q, k, v)
  for g, w_ in zip(got, want):
    np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)


def reference_attention(q, k, v, cfg):
  """The reference forward with the reference backward (dlse included) as its vjp."""
  @jax.custom_vjp
  def f(q, k, v):
    return reference.attention_forward(q, k, v, cfg)

  def fwd(q, k, v):
    out, lse = reference.attention_forward(q, k, v, cfg)
    return (out, lse), (q, k, v, out, lse)

  def bwd(res, cts):
    q, k, v, out, lse = res
    dout, dlse = cts
    return reference.attention_backward(q, k, v, out, lse, dout, cfg, dlse=dlse)

  f.defvjp(fwd, bwd)
  return f(q, k, v)
