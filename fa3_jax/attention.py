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
  out, lse = sharding.attention_fwd(q, k, v, cfg)
  residuals = tuple(checkpoint_name(x, name) for x, name in zip((q, k, v, out, lse), RESIDUAL_NAMES))
  return (out, lse), residuals


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, out, lse = residuals
  dout, dlse = cotangents
  dout = jnp.zeros_like(out) if isinstance(dout, SymbolicZero) else dout.astype(out.dtype)
  # A cotangent on lse (lse returned and used) shifts D = rowsum(dout * out); the kernels take no such input
  # yet, so that rare case runs the reference backward (per shard) on every platform.
  return sharding.attention_bwd(dout, q, k, v, out, lse, cfg, dlse=None if isinstance(dlse, SymbolicZero) else dlse)


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
    q: (batch, seqlen_q, heads, head_dim) float16 | bfloat16.
    k: (batch, seqlen_k, kv_heads, head_dim), same dtype; heads % kv_heads == 0 (GQA/MQA: query head i uses kv head
      i // (heads // kv_heads)).
    v: (batch, seqlen_k, kv_heads, head_dim_v), same dtype; head_dim_v == head_dim, or (head_dim, head_dim_v) ==
      (192, 128). head_dim is a multiple of 8, at most 256.
    softmax_scale: scores are q.k * softmax_scale; default 1/sqrt(head_dim).
    causal: bottom-right aligned causal mask, as FlashAttention >= 2.1 (differs from jax.nn's top-left when
      seqlen_q != seqlen_k): query i sees key j iff j <= i + seqlen_k - seqlen_q. Same as window_size=(left, 0).
    window_size: (left, right) sliding window, inclusive, bottom-right aligned, -1 = unbounded on that side: query i
      sees key j iff i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right.
    softcap: if > 0, scores become softcap * tanh(scores / softcap) (after scaling, before masking).
    deterministic: request a bitwise-reproducible backward (the reference path always is). On the CUDA kernels it
      orders the dQ accumulation and costs about 35% of backward throughput at 8k tokens (up to ~45% at 2k; head
      dim 128, H200).
    return_lse: also return lse.

  Returns:
    out (batch, seqlen_q, heads, head_dim_v) in the input dtype; with return_lse=True, (out, lse) with lse
    (batch, heads, seqlen_q) float32, the natural-log logsumexp of the scaled, softcapped, masked scores. A query row
    with no visible key gives out = 0 and lse = -inf.
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
  """flash_attn_func on a packed qkv of shape (batch, seqlen, 3, heads, head_dim); same keywords and results.

  The gradient is the packed (batch, seqlen, 3, heads, head_dim) array.
  """
  _validate.check_qkvpacked(qkv)
  return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, deterministic=deterministic,
                         return_lse=return_lse)


def kernel_available(dtype, head_dim: int, head_dim_v: int | None = None, direction: str = "fwd") -> bool:
  """Whether a CUDA kernel was compiled that serves these inputs (else the pure-JAX reference runs).

  direction is "fwd" or "bwd". head_dim_v defaults to head_dim. Other head dims that are multiples of 8 are served
  by the next compiled size (zero-padded). The kernel runs when the computation is placed on a CUDA device.
  """
  if direction not in ("fwd", "bwd"):
    raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
  return _ops.kernel_available(direction, jnp.dtype(dtype), head_dim, head_dim if head_dim_v is None else head_dim_v)
