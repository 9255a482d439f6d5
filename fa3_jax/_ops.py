"""One function per kernel direction: the XLA FFI call, its vmap folding, and the platform dispatch
(CUDA kernel where it was built and covers the inputs, else the pure-JAX reference).

The contract with cuda/ffi/ (written once, here and in the handlers' comments):

  "fa3_jax_fwd"  operands q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v)        [bf16|f16, BSHD]
                 results  out (b, s_q, h, d_v) q.dtype, lse (b, h, s_q) f32, workspace (n,) u8
                 attrs    softmax_scale f32, softcap f32 (0 = off), window_left i64, window_right i64
  "fa3_jax_bwd"  operands dout (b, s_q, h, d_v), q, k, v, out (b, s_q, h, d_v), lse (b, h, s_q) f32
                 results  dq, dk, dv (shapes and dtypes of q, k, v), workspace (n,) u8
                 attrs    as fwd, plus deterministic bool

  Windows arrive resolved (AttentionConfig.resolved_window): query i may attend key j iff
  i + s_k - s_q - window_left <= j <= i + s_k - s_q + window_right, with no -1 sentinels. The workspace size n
  comes from the extension (`{fwd,bwd}_workspace_bytes`); XLA owns the buffer and Python drops it.
  Python guarantees: b, s_q, s_k, h >= 1; (d, d_v) is a compiled pair (other head dims are zero-padded here).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fa3_jax import _extension
from fa3_jax import reference
from fa3_jax._config import AttentionConfig

FWD_TARGET = "fa3_jax_fwd"
BWD_TARGET = "fa3_jax_bwd"


# ---- which kernels exist ---------------------------------------------------------------------------------------

def kernel_head_dims(direction: str, dtype, head_dim: int, head_dim_v: int) -> tuple[int, int] | None:
  """The compiled (d, d_v) that serves these head dims (the smallest that fits, zero-padding d), or None."""
  name = np.dtype(dtype).name
  fits = [(d, dv) for t, d, dv in _extension.compiled_kernels(direction)
          if t == name and d >= head_dim and dv >= head_dim_v and (d == dv) == (head_dim == head_dim_v)]
  return min(fits, default=None)


def kernel_available(direction: str, dtype, head_dim: int, head_dim_v: int) -> bool:
  return kernel_head_dims(direction, dtype, head_dim, head_dim_v) is not None


@functools.cache
def _warn_reference_on_gpu(direction: str, dtype_name: str, head_dim: int, head_dim_v: int) -> None:
  """Say once when a user with a GPU would silently get the (slow) reference instead of a kernel."""
  if not any(d.platform == "gpu" for d in jax.devices()):
    return
  why = (f"the CUDA extension is not installed ({_extension.import_error})" if _extension.module is None
         else f"no {direction} kernel was compiled for {dtype_name}, head_dim={head_dim}, head_dim_v={head_dim_v}")
  warnings.warn(f"fa3_jax: attention {direction} runs on the pure-JAX reference path on GPU because {why}; "
                "see `python -m fa3_jax`", stacklevel=4)


def _dispatch(direction: str, kernel_fn, reference_fn, dtype, head_dim: int, head_dim_v: int, *args):
  if kernel_available(direction, dtype, head_dim, head_dim_v):
    return jax.lax.platform_dependent(*args, cuda=kernel_fn, default=reference_fn)
  _warn_reference_on_gpu(direction, np.dtype(dtype).name, head_dim, head_dim_v)
  return reference_fn(*args)


# ---- ffi_call plumbing -----------------------------------------------------------------------------------------

def _result_type(like, shape, dtype):
  """A result type that keeps `like`'s varying manual axes, so custom_vjp works inside shard_map(check_vma=True)."""
  t = jax.typeof(like)
  return t.update(shape=tuple(shape), dtype=dtype, sharding=t.sharding.update(spec=P(*([None] * len(shape)))))


def _attributes(cfg: AttentionConfig, seqlen_q: int, seqlen_k: int) -> dict:
  left, right = cfg.resolved_window(seqlen_q, seqlen_k)
  # Explicit NumPy types: a Python float would arrive as f64 and fail to decode as the handler's float.
  return dict(softmax_scale=np.float32(cfg.softmax_scale), softcap=np.float32(cfg.softcap),
              window_left=np.int64(left), window_right=np.int64(right))


def fold_vmap(op, fold_into_heads=None):
  """Make `op(*arrays) -> tuple of arrays` vmappable by folding the vmapped axis into the leading batch axis.

  Operands that are not batched are broadcast first, unless `fold_into_heads(axis_size, in_batched, *args)` handles
  the call (the forward folds a q-only vmap into the query heads, so K/V are never copied). Nested vmaps fold too,
  because the rule calls the folded op again.
  """
  folded = jax.custom_batching.custom_vmap(op)

  @folded.def_vmap
  def rule(axis_size, in_batched, *args):
    if fold_into_heads is not None:
      results = fold_into_heads(folded, axis_size, in_batched, *args)
      if results is not None:
        return tuple(results), (True,) * len(results)
    args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, batched in zip(args, in_batched)]
    results = folded(*[a.reshape(-1, *a.shape[2:]) for a in args])
    return tuple(r.reshape(axis_size, -1, *r.shape[1:]) for r in results), (True,) * len(results)

  return folded


def fwd_fold_into_heads(folded, axis_size, in_batched, q, k, v):
  """vmap over q alone: stack the vmapped copies as extra query heads of each kv head's group."""
  if tuple(in_batched) != (True, False, False):
    return None
  n, b, s, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  q = q.reshape(n, b, s, hk, g, d).transpose(1, 2, 3, 0, 4, 5).reshape(b, s, hk * n * g, d)
  out, lse = folded(q, k, v)
  out = out.reshape(b, s, hk, n, g, -1).transpose(3, 0, 1, 2, 4, 5).reshape(n, b, s, h, -1)
  lse = lse.reshape(b, hk, n, g, s).transpose(2, 0, 1, 3, 4).reshape(n, b, h, s)
  return out, lse


def _pad_last(x, size: int):
  return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def fwd_kernel(q, k, v, cfg: AttentionConfig):
  """The CUDA forward as an ffi_call (lowers for the cuda platform only). Returns (out, lse)."""
  head_dim, head_dim_v = q.shape[-1], v.shape[-1]
  dims = kernel_head_dims("fwd", q.dtype, head_dim, head_dim_v) or (head_dim, head_dim_v)

  def call(q, k, v):
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    d, dv = dims
    n = _extension.workspace_bytes("fwd", b, sq, sk, h, hk, d, dv)
    result_types = (_result_type(q, (b, sq, h, dv), q.dtype), _result_type(q, (b, h, sq), jnp.float32),
                    _result_type(q, (n,), jnp.uint8))
    with jax.named_scope("fa3_fwd"):
      out, lse, _ = jax.ffi.ffi_call(FWD_TARGET, result_types)(
          _pad_last(q, d), _pad_last(k, d), _pad_last(v, dv), **_attributes(cfg, sq, sk))
    return out[..., :head_dim_v], lse

  return tuple(fold_vmap(call, fwd_fold_into_heads)(q, k, v))


def bwd_kernel(dout, q, k, v, out, lse, cfg: AttentionConfig):
  """The CUDA backward as an ffi_call (lowers for the cuda platform only). Returns (dq, dk, dv)."""
  head_dim, head_dim_v = q.shape[-1], v.shape[-1]
  dims = kernel_head_dims("bwd", q.dtype, head_dim, head_dim_v) or (head_dim, head_dim_v)

  def call(dout, q, k, v, out, lse):
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    d, dv = dims
    n = _extension.workspace_bytes("bwd", b, sq, sk, h, hk, d, dv, cfg.deterministic)
    result_types = (_result_type(q, (b, sq, h, d), q.dtype), _result_type(k, (b, sk, hk, d), k.dtype),
                    _result_type(v, (b, sk, hk, dv), v.dtype), _result_type(q, (n,), jnp.uint8))
    with jax.named_scope("fa3_bwd"):
      dq, dk, dv_, _ = jax.ffi.ffi_call(BWD_TARGET, result_types)(
          _pad_last(dout, dv), _pad_last(q, d), _pad_last(k, d), _pad_last(v, dv), _pad_last(out, dv), lse,
          deterministic=bool(cfg.deterministic), **_attributes(cfg, sq, sk))
    return dq[..., :head_dim], dk[..., :head_dim], dv_[..., :head_dim_v]

  return tuple(fold_vmap(call)(dout, q, k, v, out, lse))


# ---- the two directions, dispatched --------------------------------------------------------------------------

def attention_fwd(q, k, v, cfg: AttentionConfig):
  """(out, lse): the CUDA kernel on a GPU where one was built for these inputs, else the reference."""
  return _dispatch("fwd", functools.partial(fwd_kernel, cfg=cfg),
                   functools.partial(reference.attention_forward, cfg=cfg),
                   q.dtype, q.shape[-1], v.shape[-1], q, k, v)


def attention_bwd(dout, q, k, v, out, lse, cfg: AttentionConfig):
  """(dq, dk, dv): the CUDA kernel on a GPU where one was built for these inputs, else the reference."""
  return _dispatch("bwd", functools.partial(bwd_kernel, cfg=cfg),
                   lambda dout, q, k, v, out, lse: reference.attention_backward(q, k, v, out, lse, dout, cfg),
                   q.dtype, q.shape[-1], v.shape[-1], dout, q, k, v, out, lse)
