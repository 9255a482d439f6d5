"""flash_attn_func, flash_attn_qkvpacked_func and flash_attn_varlen_func: validation -> custom_vjp -> kernel or
reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from fa3_jax import _ops
from fa3_jax import _segments
from fa3_jax import fp8
from fa3_jax import _validate
from fa3_jax import _vma
from fa3_jax import sharding
from fa3_jax import sinks as sinks_lib
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout

# Names of the saved residuals, for remat policies, e.g.
# jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names("fa3_out", "fa3_lse")).
RESIDUAL_NAMES = ("fa3_q", "fa3_k", "fa3_v", "fa3_out", "fa3_lse")


def _forward(cfg, q, k, v, sequences, sinks):
  out, lse = sharding.attention_fwd(q, k, v, cfg, sequences)
  return (out, lse) if sinks is None else sinks_lib.apply(out, lse, sinks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: AttentionConfig, q, k, v, sequences: SequenceLayout = SequenceLayout(), sinks=None):
  return _forward(cfg, q, k, v, sequences, sinks)


def _attention_fwd(cfg, q, k, v, sequences, sinks):
  # symbolic_zeros=True wraps primals
  q, k, v, sequences, sinks = jax.tree.map(lambda x: x.value, (q, k, v, sequences, sinks))
  # Differentiating a gradient differentiates both this forward and the backward below: both refuse clearly.
  out, lse = _validate.first_order_only(functools.partial(_forward, cfg))(q, k, v, sequences, sinks)
  residuals = tuple(checkpoint_name(x, name) for x, name in zip((q, k, v, out, lse), RESIDUAL_NAMES))
  return (out, lse), (*residuals, sequences, sinks)


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, out, lse, sequences, sinks = residuals
  dout, dlse = cotangents
  dout = jnp.zeros_like(out) if isinstance(dout, SymbolicZero) else dout.astype(out.dtype)
  # A cotangent on lse (lse returned and used) shifts D = rowsum(dout * out); the backward takes it as an optional
  # operand (docs/kernels.md §3.2).
  dlse = None if isinstance(dlse, SymbolicZero) else dlse

  def bwd(dout, q, k, v, out, lse, dlse, sequences, sinks):
    # With sinks, out and lse are the sinked ones, which is all the kernels' backward needs (fa3_jax/sinks.py).
    grads = sharding.attention_bwd(dout, q, k, v, out, lse, cfg, dlse=dlse, sequences=sequences)
    return (*grads, None if sinks is None else sinks_lib.gradient(dout, out, lse, dlse, sinks))

  dq, dk, dv, dsinks = _validate.first_order_only(bwd)(dout, q, k, v, out, lse, dlse, sequences, sinks)
  # The sequence layout (integer arrays) has no cotangent.
  return dq, dk, dv, None, dsinks


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def _empty_result(q, v, return_lse, sequences: SequenceLayout = SequenceLayout(), sinks=None):
  """Output for calls with nothing to compute (no sequences, query rows, heads or keys): zeros and lse = -inf (the
  sinks where given), in q's layout (BSHD, or packed under `sequences`)."""
  out = jnp.zeros((*q.shape[:-1], v.shape[-1]), q.dtype)
  lse = jnp.full(_ops.lse_shape(q, sequences), -jnp.inf, jnp.float32)
  out, lse = (_vma.vary_over(x, _vma.varying_axes(q)) for x in (out, lse))
  if sinks is not None:
    out, lse = sinks_lib.apply(out, lse, sinks)
  return (out, lse) if return_lse else out


def _attention_under(cfg: AttentionConfig, q, k, v, sequences: SequenceLayout = SequenceLayout(), sinks=None):
  """The custom_vjp on q, k, v (and sinks) under `sequences`. Inside shard_map(check_vma=True) its cotangents must
  have their primals' types, so the inputs first get matching varying axes; the sequence arrays vary like q too, so
  that everything computed from them does."""
  leaves, tree = jax.tree.flatten((sequences, sinks))
  q, k, v, *leaves = _vma.match_varying_axes(q, k, v, *leaves)
  return _attention(cfg, q, k, v, *jax.tree.unflatten(tree, leaves))


def segment_attention(cfg: AttentionConfig, q, k, v, q_ids, kv_ids, max_segments: int, sinks=None):
  """(out, lse) of BSHD q, k, v where tokens attend only within their segment (flash_attn_func's q_segment_ids);
  q_ids / kv_ids are checked int32 arrays (one object for self-attention, see _validate.segment_ids). Rows of a
  batch entry with more segments than max_segments, which the fixed-size layout cannot hold, give NaN."""
  longest = max(q_ids.shape[1], kv_ids.shape[1])
  # No row has more runs than tokens, so a larger bound would only add empty slots.
  max_segments = min(max_segments, longest)
  sequences = SequenceLayout(segment_ids_q=q_ids, segment_ids_k=None if kv_ids is q_ids else kv_ids,
                             max_segments=max_segments)
  out, lse = _attention_under(cfg, q, k, v, sequences, sinks)
  if max_segments == longest:
    return out, lse  # nothing can overflow: skip a pass over out (~30 us at 16k x 16 x 128)
  # Leaving the excess segments out would silently give their rows 0 and -inf; NaN reaches any loss instead.
  overflow = (_segments.run_counts(q_ids) > max_segments) | (_segments.run_counts(kv_ids) > max_segments)
  return jnp.where(overflow[:, None, None, None], jnp.nan, out), jnp.where(overflow[:, None, None], jnp.nan, lse)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, return_lse=False, q_segment_ids=None, kv_segment_ids=None,
                    max_segments=None, q_descale=None, k_descale=None, v_descale=None, out_dtype=None, sinks=None,
                    attention_chunk=0):
  """Exact attention, FlashAttention-3 interface, differentiable in q, k, v (float16 / bfloat16).

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
    q_segment_ids, kv_segment_ids: optional int32 (batch, seqlen_q) / (batch, seqlen_k) arrays, traced or not, for
      packed documents: each batch row holds segments, contiguous runs of one non-negative id, and a token attends
      only to the keys of its own segment in its own row (the key run with its id). Negative ids mark padding. One
      of them alone serves both sides when seqlen_q == seqlen_k. causal and window_size apply within each segment,
      bottom-right aligned between its query run and key run, as flash_attn_varlen_func does per sequence (for
      self-attention the two runs coincide, so this is plain causal attention per document). Where both are given,
      ids present on both sides must come in the same order. Keep padding tokens' k and v finite (zeros are
      fine): as in flash_attn_varlen_func, the kernels multiply them by zero probabilities inside a tile.
    max_segments: static int >= 1, an upper bound on the segments (runs) of any row of either ids array; default
      max(seqlen_q, seqlen_k), always enough but it makes the kernel grids (and the reference's padded batch)
      batch * seqlen sequences large: setting it to the real bound is the fast path. A row with more segments gives
      NaN in all its rows of out and lse (ValueError at trace time when the ids are known then).
    q_descale, k_descale, v_descale, out_dtype: the FP8 path (fa3_jax.fp8, docs/integration.md §4.10). With q, k, v
      all float8_e4m3fn, their real values are x * descale, each descale float32 (batch, kv_heads) or per block of
      fa3_jax.fp8.BLOCK_SIZE tokens (batch, ceil(seqlen / BLOCK_SIZE), kv_heads) (None: 1; q's too is per kv head,
      shared by its query heads), and out (and the computation) is out_dtype, bfloat16 by default or float16.
      Forward only. fa3_jax.fp8.quantize / fa3_jax.fp8.attention make these inputs. Until the FP8 kernels land,
      the real values run the bfloat16 / float16 kernels.
    sinks: optional learnable sink logits (gpt-oss), a floating (heads,) array computed in float32: each row's
      softmax also runs over a key of score sinks[h] and value 0, so out = sum_j p_j v_j with
      p_j = exp(s_j) / (exp(sinks[h]) + sum_j exp(s_j)) and lse = log(exp(sinks[h]) + sum_j exp(s_j)); a row with no
      visible key gives out = 0 and lse = sinks[h]. Differentiable (the gradient sums over batch and rows), traced or
      not; it shards with the heads (fa3_jax/sinks.py).
    attention_chunk: static int C >= 0 (0: off), Llama 4's chunked local attention: query i, at position
      p = i + seqlen_k - seqlen_q, sees key j only if p // C == j // C, on top of causal / window_size (within each
      segment with segment ids, positions counted from the segment's start). The kernels skip every block outside
      the chunks, forward and backward (fa3_jax/_chunks.py). A sharded sequence axis is gathered for it (no context
      parallelism), batch and heads shard as usual.

  Returns:
    out (batch, seqlen_q, heads, head_dim_v) in the input dtype; with return_lse=True, (out, lse) with lse
    (batch, heads, seqlen_q) float32, the natural-log logsumexp of the scaled, softcapped, masked scores (and the sink).
    A query row with no visible key gives out = 0 and lse = -inf (the sink with sinks); so do padding rows (negative segment id) and rows of a segment
    whose id has no key run, all with zero gradients.

  Segment ids known at trace time (NumPy arrays, non-traced jax arrays) are checked: integer dtype, shape, each id
  one contiguous run per row, at most max_segments runs, shared ids in the same order. Traced ones cannot be, and
  malformed values give unspecified results, never out-of-bounds accesses. They run as one packing of the batch's
  rows (the varlen kernels), under jit, vmap, grad, remat, shard_map and batch / head sharding.

  Raises TypeError / ValueError at trace time for bad arguments, naming them, and NotImplementedError for
  unsupported head dim pairs and for second-order derivatives (grad of grad, jvp of grad).
  """
  if fp8.is_fp8(q) or fp8.is_fp8(k) or fp8.is_fp8(v):
    q, k, v = fp8.real_inputs(q, k, v, q_descale, k_descale, v_descale, out_dtype)
  elif any(x is not None for x in (q_descale, k_descale, v_descale, out_dtype)):
    raise ValueError("q_descale, k_descale, v_descale and out_dtype belong to the FP8 path: pass float8_e4m3fn q, "
                     "k and v (fa3_jax.fp8.quantize), or leave them None")
  _validate.check_qkv(q, k, v)
  cfg = _validate.attention_config(q.shape[-1], softmax_scale, causal, window_size, softcap, deterministic,
                                   attention_chunk)
  sinks = _validate.check_sinks(sinks, q.shape[2])
  return_lse = _validate.check_bool("return_lse", return_lse)
  segments = _validate.segment_ids(q_segment_ids, kv_segment_ids, max_segments, q.shape[0], q.shape[1], k.shape[1])
  if 0 in q.shape[:3] or k.shape[1] == 0:
    return _empty_result(q, v, return_lse, sinks=sinks)
  if segments is None:
    out, lse = _attention_under(cfg, q, k, v, sinks=sinks)
  else:
    out, lse = segment_attention(cfg, q, k, v, *segments, sinks=sinks)
  return (out, lse) if return_lse else out


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              deterministic=False, return_lse=False, q_segment_ids=None, kv_segment_ids=None,
                              max_segments=None, sinks=None, attention_chunk=0):
  """flash_attn_func on a packed qkv of shape (batch, seqlen, 3, heads, head_dim) float16 | bfloat16; same
  keywords, results and limits, with errors about the array naming qkv.

  The gradient is the packed (batch, seqlen, 3, heads, head_dim) array.
  """
  _validate.check_qkvpacked(qkv)
  return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, deterministic=deterministic,
                         return_lse=return_lse, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         max_segments=max_segments, sinks=sinks, attention_chunk=attention_chunk)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           deterministic=False, return_lse=False, sinks=None, attention_chunk=0):
  """Exact attention over variable-length sequences packed back to back, FlashAttention-3 interface,
  differentiable in q, k, v. One compiled function serves every packing of the same shapes.

  Args:
    q: (total_q, heads, head_dim) float16 | bfloat16: the query rows of every sequence, back to back.
    k: (total_k, kv_heads, head_dim), same dtype; heads % kv_heads == 0 (GQA/MQA as flash_attn_func).
    v: (total_k, kv_heads, head_dim_v), same dtype; head dims as flash_attn_func.
    cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 (or another integer dtype, converted) arrays, traced or not:
      sequence b's rows are allotted [cu_seqlens[b], cu_seqlens[b + 1]). Well-formed values start at 0, never
      decrease and end at most at total_q / total_k (rows after cu_seqlens[-1] belong to no sequence).
    max_seqlen_q, max_seqlen_k: static ints in [1, MAX_SEQLEN = 2**29], upper bounds of the sequences' lengths.
    seqused_q, seqused_k: optional (batch,) int32 arrays: sequence b uses only the first seqused[b] rows of its
      allotment (the rest belong to no sequence).
    softmax_scale, softcap, deterministic, return_lse, sinks: as flash_attn_func.
    causal, window_size, attention_chunk: as flash_attn_func, applied to each sequence on its own lengths
      (bottom-right aligned: query i of a sequence of len_q queries and len_k keys sits at position
      p = i + len_k - len_q and sees key j iff p - left <= j <= p + right, and with attention_chunk C only if
      p // C == j // C).

  Sequence b owns the query rows [cu_seqlens_q[b], cu_seqlens_q[b] + len_q(b)) and the key rows
  [cu_seqlens_k[b], cu_seqlens_k[b] + len_k(b)), where len_q(b) = seqused_q[b] if given, else
  cu_seqlens_q[b + 1] - cu_seqlens_q[b], clamped to [0, max_seqlen_q] and to the rows that exist (the offset
  clamped to [0, total_q], len_q(b) <= total_q - offset); likewise for k. Its queries attend only its keys.

  Returns:
    out (total_q, heads, head_dim_v) in the input dtype; with return_lse=True, (out, lse) with lse (heads, total_q)
    float32, the natural-log logsumexp of the scaled, softcapped, masked scores. Rows that belong to no sequence
    (gaps, rows past cu_seqlens_q[-1] or beyond seqused_q) and rows that see no key give out = 0 and lse = -inf
    (with sinks: the sink);
    their dq, and dk / dv of key rows outside every sequence, are 0.

  Values of cu_seqlens and seqused known at trace time (NumPy arrays, non-traced jax arrays) are checked to be
  well-formed (ValueError naming the argument; also seqused within each allotment and every length within
  max_seqlen); traced ones cannot be, and malformed values give unspecified results, never out-of-bounds accesses.
  Raises TypeError / ValueError at trace time for bad arguments, naming them, and NotImplementedError for
  unsupported head dim pairs and for second-order derivatives. Works under jit, vmap (of any arguments, cu_seqlens
  included: the copies run as one longer packing), remat, shard_map and automatic sharding over heads.
  """
  _validate.check_varlen_qkv(q, k, v)
  sequences = _validate.sequence_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
                                        seqused_k, q.shape[0], k.shape[0])
  cfg = _validate.attention_config(q.shape[-1], softmax_scale, causal, window_size, softcap, deterministic,
                                   attention_chunk)
  sinks = _validate.check_sinks(sinks, q.shape[1])
  return_lse = _validate.check_bool("return_lse", return_lse)
  if 0 in (*q.shape[:2], k.shape[0], sequences.cu_seqlens_q.shape[0] - 1):
    return _empty_result(q, v, return_lse, sequences, sinks)
  out, lse = _attention_under(cfg, q, k, v, sequences, sinks)
  return (out, lse) if return_lse else out


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
