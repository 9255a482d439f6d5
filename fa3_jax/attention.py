"""flash_attn_func and flash_attn_qkvpacked_func: validation -> custom_vjp -> kernel or reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from fa3_jax import _ops
from fa3_jax import _validate
from fa3_jax import _vma
from fa3_jax import sharding
from fa3_jax._config import AttentionConfig

# Names of the saved residuals, for remat policies, e.g.
# jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")).
RESIDUAL_NAMES = ("fa3_q", "fa3_k", "fa3_v", "fa3_out", "fa3_lse")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: AttentionConfig, q, k, v):
  return sharding.attention_fwd(q, k, v, cfg)


def _attention_fwd(cfg, q, k, v):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros=True wraps primals
  # Differentiating a gradient differentiates both this forward and the backward below: both refuse clearly.
  out, lse = _validate.first_order_only(lambda q, k, v: sharding.attention_fwd(q, k, v, cfg))(q, k, v)
  residuals = tuple(checkpoint_name(x, name) for x, name in zip((q, k, v, out, lse), RESIDUAL_NAMES))
  return (out, lse), residuals


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, out, lse = residuals
  dout, dlse = cotangents
  dout = jnp.zeros_like(out) if isinstance(dout, SymbolicZero) else dout.astype(out.dtype)
  # A cotangent on lse (lse returned and used) shifts D = rowsum(dout * out); the backward takes it as an optional
  # operand (docs/kernels.md §3.2).
  dlse = None if isinstance(dlse, SymbolicZero) else dlse
  bwd = lambda dout, q, k, v, out, lse, dlse: sharding.attention_bwd(dout, q, k, v, out, lse, cfg, dlse=dlse)
  return _validate.first_order_only(bwd)(dout, q, k, v, out, lse, dlse)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _empty_result(q, v, return_lse):
  """Output for calls with nothing to compute (batch, seqlen_q, heads or seqlen_k == 0): zeros and lse = -inf."""
  b, sq, h, _ = q.shape
  out = jnp.zeros((b, sq, h, v.shape[-1]), q.dtype)
  lse = jnp.full((b, h, sq), -jnp.inf, jnp.float32)
  out, lse = (_vma.vary_over(x, _vma.varying_axes(q)) for x in (out, lse))
  return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, return_lse=False):
  """Exact attention, FlashAttention-3 interface, differentiable in q, k, v.

  Args:
    q: (batch, seqlen_q, heads, head_dim) float16 | bfloat16 array (jax or NumPy).
    k: (batch, seqlen_k, kv_heads, head_dim), same dtype; heads % kv_heads == 0 (GQA/MQA: query head i uses kv head
      i // (heads // kv_heads)). seqlen_q and seqlen_k are at most MAX_SEQLEN = 2**29 (the kernels' mask arithmetic
      is int32); a size of 0 (batch, seqlens, or heads and kv_heads) gives empty or zero results.
    v: (batch, seqlen_k, kv_heads, head_dim_v), same dtype; head_dim_v == head_dim, or (head_dim, head_dim_v) ==
      (192, 128). head_dim is a multiple of 8, at most 256.
    softmax_scale: scores are q.k * softmax_scale; default 1/sqrt(head_dim). A static number from float32's
      smallest normal number up to float32_max / (head_dim * 65504**2 * log2(e)) (about 8.6e26 at head_dim 64):
      larger scales could overflow the float32 scores of inputs within float16's range, giving NaN.
    causal: bottom-right aligned causal mask, as FlashAttention >= 2.1 (differs from jax.nn's top-left when
      seqlen_q != seqlen_k): query i sees key j iff j <= i + seqlen_k - seqlen_q. Same as window_size=(left, 0).
    window_size: (left, right) sliding window, inclusive, bottom-right aligned, -1 = unbounded on that side: query i
      sees key j iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right. Static ints; sides of
      MAX_SEQLEN or more are unbounded.
    softcap: if > 0, scores become softcap * tanh(scores / softcap) (after scaling, before masking); 0 or a number
      in float32's normal range, with softmax_scale / softcap finite in float32.
    deterministic: request a bitwise-reproducible backward (the reference path always is). On the CUDA kernels it
      orders the dQ accumulation and costs about 35% of backward throughput at 8k tokens (up to ~45% at 2k; head
      dim 128, H200).
    return_lse: also return lse.

  Returns:
    out (batch, seqlen_q, heads, head_dim_v) in the input dtype; with return_lse=True, (out, lse) with lse
    (batch, heads, seqlen_q) float32, the natural-log logsumexp of the scaled, softcapped, masked scores. A query row
    with no visible key gives out = 0 and lse = -inf.

  Raises TypeError / ValueError at trace time for bad arguments, naming them, and NotImplementedError for
  unsupported head dim pairs and for second-order derivatives (grad of grad, jvp of grad).
  """
  _validate.check_qkv(q, k, v)
  cfg = _validate.attention_config(q.shape[-1], softmax_scale, causal, window_size, softcap, deterministic)
  return_lse = _validate.check_bool("return_lse", return_lse)
  if 0 in q.shape[:3] or k.shape[1] == 0:
    return _empty_result(q, v, return_lse)
  # Inside shard_map(check_vma=True) the custom_vjp's cotangents must have their primals' types.
  out, lse = _attention(cfg, *_vma.match_varying_axes(q, k, v))
  return (out, lse) if return_lse else out


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              deterministic=False, return_lse=False):
  """flash_attn_func on a packed qkv of shape (batch, seqlen, 3, heads, head_dim) float16 | bfloat16; same
  keywords, results and limits, with errors about the array naming qkv.

  The gradient is the packed (batch, seqlen, 3, heads, head_dim) array.
  """
  _validate.check_qkvpacked(qkv)
  return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, deterministic=deterministic,
                         return_lse=return_lse)


def kernel_available(dtype, head_dim: int, head_dim_v: int | None = None, direction: str = "fwd") -> bool:
  """Whether a CUDA kernel was compiled that serves these inputs (else the pure-JAX reference runs).

  dtype is a floating dtype (float32, which dot_product_attention accepts, never has a kernel). direction is "fwd"
  or "bwd". head_dim_v defaults to head_dim. Other head dims that are multiples of 8 are served by the next compiled
  size (zero-padded). The kernel runs when the computation is placed on a CUDA device. Inputs that flash_attn_func
  rejects raise its errors (TypeError for an unknown dtype or a non-int head dim, ValueError for a head dim
  outside [8, 256] or not a multiple of 8, NotImplementedError for an unsupported (head_dim, head_dim_v) pair);
  False means only that no kernel was compiled for valid inputs.
  """
  direction = _validate.check_choice("direction", direction, ("fwd", "bwd"))
  dtype = _validate.check_float_dtype("dtype", dtype)
  head_dim = _validate.check_int("head_dim", head_dim, 0)
  head_dim_v = head_dim if head_dim_v is None else _validate.check_int("head_dim_v", head_dim_v, 0)
  _validate.check_head_dims(head_dim, head_dim_v)
  return _ops.kernel_available(direction, dtype, head_dim, head_dim_v)
