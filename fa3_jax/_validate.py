"""Argument checks shared by every public entry point; they raise at trace time with messages that name the
argument, what was expected and what was received."""

from __future__ import annotations

import math

import numpy as np

from fa3_jax._config import AttentionConfig

MAX_HEAD_DIM = 256
# The one (head_dim, head_dim_v) pair with head_dim_v != head_dim (DeepSeek-style MLA prefill shapes).
ASYMMETRIC_HEAD_DIMS = ((192, 128),)


def _dtype_name(x) -> str:
  return np.dtype(x.dtype).name


def check_array(name: str, x, ndim: int, layout: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")


def check_qkv(q, k, v) -> None:
  """Shapes (batch, seqlen, heads, head_dim), dtypes, GQA divisibility and head dims of q, k, v."""
  layout_q = "(batch, seqlen_q, heads, head_dim)"
  layout_kv = "(batch, seqlen_k, kv_heads, head_dim)"
  check_array("q", q, 4, layout_q)
  check_array("k", k, 4, layout_kv)
  check_array("v", v, 4, "(batch, seqlen_k, kv_heads, head_dim_v)")

  if _dtype_name(q) not in ("float16", "bfloat16"):
    raise TypeError(f"q must be float16 or bfloat16, got {_dtype_name(q)}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share a dtype, got q={_dtype_name(q)}, k={_dtype_name(k)}, "
                    f"v={_dtype_name(v)}")

  b, _, h, d = q.shape
  bk, sk, hk, dk = k.shape
  bv, sv, hv, dv = v.shape
  if bk != b or bv != b:
    raise ValueError(f"q, k and v must have the same batch size, got q={b}, k={bk}, v={bv}")
  if sv != sk:
    raise ValueError(f"k and v must have the same seqlen_k, got k={sk}, v={sv}")
  if hv != hk:
    raise ValueError(f"k and v must have the same number of kv_heads, got k={hk}, v={hv}")
  if hk == 0 or h % hk != 0:
    raise ValueError(f"heads of q must be a multiple of kv_heads of k and v (GQA/MQA), got heads={h}, "
                     f"kv_heads={hk}")
  if dk != d:
    raise ValueError(f"k must have the head_dim of q, got q head_dim={d}, k head_dim={dk}")
  check_head_dims(d, dv)


def check_head_dims(d: int, dv: int) -> None:
  if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
    raise ValueError(f"head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")
  if dv != d and (d, dv) not in ASYMMETRIC_HEAD_DIMS:
    raise NotImplementedError(
        f"head_dim_v must equal head_dim, or (head_dim, head_dim_v) must be one of {list(ASYMMETRIC_HEAD_DIMS)}; "
        f"got head_dim={d}, head_dim_v={dv}")


def check_qkvpacked(qkv) -> None:
  check_array("qkv", qkv, 5, "(batch, seqlen, 3, heads, head_dim)")
  if qkv.shape[2] != 3:
    raise ValueError(f"qkv must have shape (batch, seqlen, 3, heads, head_dim), got dim 2 = {qkv.shape[2]} "
                     f"(shape {tuple(qkv.shape)})")


def check_softmax_scale(softmax_scale, head_dim: int) -> float:
  """Returns the scale to use: 1/sqrt(head_dim) by default."""
  if softmax_scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
    raise TypeError(f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__} "
                    "(a traced value cannot be a compile-time kernel constant)")
  scale = float(softmax_scale)
  if not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale}")
  return scale


def check_window(window_size, causal) -> tuple[int, int]:
  """Returns (left, right) in FlashAttention's convention (-1 = unbounded), with causal folded in (right = 0)."""
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
  if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
      or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window_size)):
    raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
  left, right = (int(w) for w in window_size)
  if left < -1 or right < -1:
    raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {(left, right)}")
  if causal:
    if right > 0:
      raise ValueError(f"causal=True allows no keys to the right of the diagonal, but window_size has right={right};"
                       f" pass window_size=({left}, 0) or ({left}, -1) with causal=True, or causal=False")
    right = 0
  return left, right


def check_softcap(softcap) -> float:
  if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
    raise TypeError(f"softcap must be a Python float, got {type(softcap).__name__}")
  cap = float(softcap)
  if not math.isfinite(cap) or cap < 0:
    raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap}")
  return cap


def check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
  return bool(value)


def attention_config(head_dim: int, softmax_scale, causal, window_size, softcap, deterministic) -> AttentionConfig:
  """The checked AttentionConfig for FlashAttention-style arguments (window -1 = unbounded, causal = right 0)."""
  left, right = check_window(window_size, causal)
  return AttentionConfig(softmax_scale=check_softmax_scale(softmax_scale, head_dim),
                         window_left=None if left < 0 else left, window_right=None if right < 0 else right,
                         softcap=check_softcap(softcap), deterministic=check_bool("deterministic", deterministic))
