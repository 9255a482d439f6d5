"""FP8 attention inputs (float8_e4m3fn): quantization with per-tensor, per-head or per-block scales, the randomized
Hadamard rotation that spreads outliers over the head dim (incoherent processing), and the one definition of the
descale convention that flash_attn_func's FP8 path reads (docs/integration.md §4.10).

Convention: a real value is x_fp8 * descale. Descales are float32 (batch, groups), one per sequence and head group, or
(batch, ceil(seqlen / BLOCK_SIZE), groups), one per block of BLOCK_SIZE tokens as well. For k and v the groups are the
kv heads; for q too (FlashAttention-3's q_descale is (batch, kv_heads)): the query heads that share a kv head share a
scale, so the scale of a query tile is one number.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fa3_jax import _validate

FP8_DTYPE = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
# Tokens per block of per-block descales. The FP8 kernels' tiles will be chosen so that this divides their rows.
BLOCK_SIZE = 128


def is_fp8(x) -> bool:
  """Whether x is an FP8 array (anything without a dtype is not; the callers' checks name it)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.dtype(dtype) == FP8_DTYPE


def hadamard_block(head_dim: int) -> int:
  """The size of the Hadamard blocks over a head dim: its largest power-of-two divisor (the whole dim for 64, 128,
  256; 32 for 96, 64 for 192). A block-diagonal of orthogonal blocks is orthogonal."""
  return head_dim & -head_dim


@jax.jit
def hadamard_rotate(x, key):
  """x (..., head_dim) times R = diag(signs) H: random signs from `key` (one per feature), then the normalised
  Walsh-Hadamard transform over blocks of hadamard_block(head_dim) features. R is orthogonal, so rotating q and k
  with the same key leaves q k^T unchanged while an outlier feature is spread over its block. float32 result."""
  d = x.shape[-1]
  n = hadamard_block(d)
  signs = jnp.where(jax.random.bernoulli(key, 0.5, (d,)), 1.0, -1.0).astype(jnp.float32)
  y = (x.astype(jnp.float32) * signs).reshape(*x.shape[:-1], d // n, n)
  h = 1
  while h < n:  # butterflies of the fast Walsh-Hadamard transform, log2(n) of them
    y = y.reshape(*y.shape[:-1], n // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2).reshape(*x.shape[:-1], d // n, n)
    h *= 2
  return (y / math.sqrt(n)).reshape(x.shape)


def _group_amax(x, groups: int, block_size: int | None, per_tensor: bool):
  """max |x| per descale entry: (batch, groups), (batch, blocks, groups), or the whole tensor's broadcast to
  (batch, groups). x (batch, seqlen, heads, d) float32, heads a multiple of groups."""
  b, s, h, d = x.shape
  a = jnp.abs(x).reshape(b, s, groups, h // groups * d)
  if per_tensor:
    return jnp.broadcast_to(jnp.max(a), (b, groups))
  if block_size is None:
    return jnp.max(a, axis=(1, 3))
  blocks = -(-s // block_size)
  a = jnp.pad(a, ((0, 0), (0, blocks * block_size - s), (0, 0), (0, 0)))
  return jnp.max(a.reshape(b, blocks, block_size, groups, -1), axis=(2, 4))


def expand_descale(descale, seqlen: int, heads: int):
  """A descale (batch, groups) or (batch, blocks, groups) as a factor broadcastable against (batch, seqlen, heads,
  head_dim): head i takes group i // (heads / groups), token t block t // BLOCK_SIZE."""
  groups = descale.shape[-1]
  per_head = jnp.repeat(descale.astype(jnp.float32), heads // groups, axis=-1)
  if descale.ndim == 2:
    return per_head[:, None, :, None]
  return jnp.repeat(per_head, BLOCK_SIZE, axis=1)[:, :seqlen, :, None]


def quantize(x, *, block_size: int | None = None, per_tensor: bool = False, groups: int | None = None,
             hadamard: bool = False, key=None):
  """x (batch, seqlen, heads, head_dim) floating -> (x_fp8 float8_e4m3fn, descale float32), x ~= x_fp8 * descale.

  Scaling: each descale entry maps the max |x| it covers onto E4M3_MAX = 448.
    default: per (batch, group), descale (batch, groups);
    block_size=BLOCK_SIZE: per block of BLOCK_SIZE tokens too, descale (batch, ceil(seqlen / BLOCK_SIZE), groups)
      (the one block size flash_attn_func reads);
    per_tensor=True: one scale for the whole tensor, as a (batch, groups) descale of equal entries.
  groups: the descale's head axis, default x's heads; pass kv_heads when quantizing q for GQA (docs above).
  hadamard=True rotates the head dim first (fa3_jax.fp8.hadamard_rotate) with `key`, which q and k must share: their
  product is unchanged and outliers no longer set the scale of a whole row. v is not rotated.
  All-zero groups get descale 1.
  """
  _validate.check_array("x", x, 4, "(batch, seqlen, heads, head_dim)")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got {x.dtype}")
  heads = x.shape[2]
  groups = heads if groups is None else _validate.check_int("groups", groups, 1)
  if heads % groups:
    raise ValueError(f"groups must divide x's heads ({heads}), got {groups}")
  per_tensor = _validate.check_bool("per_tensor", per_tensor)
  if block_size is not None:
    if per_tensor:
      raise ValueError("per_tensor=True and block_size are exclusive: one scale, or one per block")
    if _validate.check_int("block_size", block_size, 1) != BLOCK_SIZE:
      raise NotImplementedError(f"block_size must be fa3_jax.fp8.BLOCK_SIZE = {BLOCK_SIZE} (the tokens per block "
                                f"that flash_attn_func reads), got {block_size}")
  if _validate.check_bool("hadamard", hadamard):
    if key is None:
      raise ValueError("hadamard=True needs key (a jax.random key, the same for q and k)")
    x = hadamard_rotate(x, key)
  x = jnp.asarray(x, jnp.float32)
  amax = _group_amax(x, groups, block_size, per_tensor)
  descale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0).astype(jnp.float32)
  x_fp8 = (x / expand_descale(descale, x.shape[1], heads)).astype(FP8_DTYPE)
  return x_fp8, descale


def dequantize(x_fp8, descale):
  """x_fp8 (batch, seqlen, heads, head_dim) * descale (the convention above), float32."""
  return x_fp8.astype(jnp.float32) * expand_descale(descale, x_fp8.shape[1], x_fp8.shape[2])


def check_descale(name: str, descale, batch: int, seqlen: int, groups: int):
  """A descale for a tensor of `seqlen` tokens: None (1), or float32 (batch, groups) / (batch, blocks, groups)."""
  if descale is None:
    return jnp.ones((batch, groups), jnp.float32)
  descale = jnp.asarray(_validate.as_array(name, descale))
  blocks = -(-seqlen // BLOCK_SIZE)
  if descale.shape not in ((batch, groups), (batch, blocks, groups)):
    raise ValueError(f"{name} must have shape (batch, kv_heads) = {(batch, groups)} or (batch, ceil(seqlen / "
                     f"BLOCK_SIZE), kv_heads) = {(batch, blocks, groups)}, got {tuple(descale.shape)}")
  if not jnp.issubdtype(descale.dtype, jnp.floating):
    raise TypeError(f"{name} must be a float32 array, got {descale.dtype}")
  return descale.astype(jnp.float32)


def attention(q, k, v, *, block_size: int | None = BLOCK_SIZE, hadamard: bool = True, key=None, out_dtype=None,
              **kwargs):
  """Quantize bfloat16 / float16 q, k, v to FP8 and attend: flash_attn_func's FP8 path in one call.

  q and k are rotated by one randomized Hadamard matrix (hadamard=True; key defaults to PRNGKey(0)) and scaled per
  block of BLOCK_SIZE tokens (block_size=None: per sequence and head group); v is scaled alike, never rotated.
  kwargs are flash_attn_func's (causal, window_size, softcap, softmax_scale, return_lse). out_dtype defaults to q's
  dtype. Forward only.
  """
  _validate.check_qkv(q, k, v)
  if hadamard and key is None:
    key = jax.random.PRNGKey(0)
  groups = k.shape[2]
  q8, qs = quantize(q, block_size=block_size, groups=groups, hadamard=hadamard, key=key)
  k8, ks = quantize(k, block_size=block_size, hadamard=hadamard, key=key)
  v8, vs = quantize(v, block_size=block_size)
  from fa3_jax.attention import flash_attn_func  # pylint: disable=import-outside-toplevel (attention imports us)
  return flash_attn_func(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs,
                         out_dtype=q.dtype if out_dtype is None else out_dtype, **kwargs)


def _forward_only(fn):
  wrapped = jax.custom_jvp(fn)

  @wrapped.defjvp
  def _refuse(primals, tangents):
    raise NotImplementedError("the FP8 path of flash_attn_func is forward-only (as FlashAttention-3's): quantized "
                              "inputs have no gradient. Differentiate the bfloat16 / float16 call instead")

  return wrapped


def real_inputs(q, k, v, q_descale, k_descale, v_descale, out_dtype):
  """flash_attn_func's FP8 arguments checked and turned into the real values of q, k, v in out_dtype (default
  bfloat16), forward-only. Until the FP8 kernels exist this is the whole FP8 path: the attention then runs on
  these values as a bfloat16 / float16 call (docs/integration.md §4.10)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    _validate.check_array(name, x, 4, "(batch, seqlen, heads, head_dim)")
    if not is_fp8(x):
      raise TypeError(f"q, k and v must all be float8_e4m3fn on the FP8 path, got {name} {x.dtype}")
  out_dtype = jnp.dtype(jnp.bfloat16 if out_dtype is None else out_dtype)
  if out_dtype.name not in _validate.HALF_DTYPES:
    raise TypeError(f"out_dtype must be bfloat16 or float16, got {out_dtype.name}")
  b, groups = q.shape[0], k.shape[2]
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"q, k and v must have the same batch size, got q={b}, k={k.shape[0]}, v={v.shape[0]}")
  if groups == 0 or q.shape[2] % groups:
    raise ValueError(f"heads of q must be a multiple of kv_heads of k (GQA/MQA), got heads={q.shape[2]}, "
                     f"kv_heads={groups}")
  descales = [check_descale(name, s, b, x.shape[1], groups)
              for name, s, x in (("q_descale", q_descale, q), ("k_descale", k_descale, k), ("v_descale", v_descale, v))]

  def real(q, k, v, *descales):
    return tuple(dequantize(x, s).astype(out_dtype) for x, s in zip((q, k, v), descales))

  return _forward_only(real)(q, k, v, *descales)


__all__ = ["BLOCK_SIZE", "E4M3_MAX", "FP8_DTYPE", "attention", "dequantize", "hadamard_rotate", "quantize"]
