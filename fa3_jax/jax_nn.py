"""dot_product_attention: a drop-in for jax.nn.dot_product_attention, mapped onto fa3_jax's kernels.

jax.nn's conventions hold here, not FlashAttention's: causal and windows are aligned top-left (query i sees key j
iff i - left <= j <= i + right, causal is right = 0), masks are boolean with True = attend, layouts are BTNH.
Top-left alignment maps onto AttentionConfig as window_right = right + seqlen_q - seqlen_k (may be negative) and
window_left = left + seqlen_k - seqlen_q.

What runs where:
  * no mask, is_causal, local_window_size, and dense masks whose values are known when tracing and that are
    causal/window-shaped (e.g. flax's make_causal_mask, even inside jit): the fa3 custom_vjp (CUDA kernel on a Hopper
    GPU, the blockwise reference elsewhere). The dense mask is read once at trace time and never reaches the kernel.
  * query_seq_lengths / key_value_seq_lengths, and known padding masks whose valid positions are a prefix of each
    row (with an optional window): the same custom_vjp with per-batch lengths (seqused, docs/integration.md §4.8),
    wherever the kernels' alignment provably agrees with jax.nn's (see `_kernel_lengths`): always without causal or
    window; with them when every batch entry's lengths differ by the same known amount, e.g. the same lengths array
    passed for both with T == S, or lengths known at trace time; and always when only query_seq_lengths is given.
    Otherwise the dense float32 path below.
  * bias, and masks that are data-dependent or of any other shape: a dense float32 pure-JAX path (O(T * S) memory
    per head, like jax.nn's XLA implementation).

Rows beyond query_seq_lengths match jax.nn exactly: output 0 and, as residual, the logsumexp of jax.nn's masked
logits (-0.7 * float32's max, in key's dtype: -inf in float16); so does the residual of every row that sees no key.
The one difference from jax.nn (implementation="xla"), a degenerate case: a query row within query_seq_lengths that
sees no key gives output 0, where jax.nn averages all values (padded keys included).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax import _segments
from fa3_jax import _validate
from fa3_jax import sinks as sinks_lib
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout
from fa3_jax._config import visible
from fa3_jax.attention import _attention_under
from fa3_jax.attention import _empty_result
from fa3_jax.attention import segment_attention

# Masks computed inside a traced function from shapes alone (iota, compares, broadcasts) are evaluated at trace
# time if they take at most this many operations and elements.
_MAX_FOLDED_EQNS = 256
_MAX_FOLDED_ELEMENTS = 1 << 26
_KERNEL_DTYPES = ("float16", "bfloat16", "float32")  # float32 runs on the reference inside the same custom_vjp
# jax.nn's residual for a row whose logits are all masked: its masking value, which logsumexp returns unchanged
# (float32 cannot resolve + log(S) at this magnitude); computed as jax.nn computes it.
_JAX_NN_MASKED_LSE = np.asarray(-0.7 * np.finfo(np.float32).max, np.float32)


# ---- masks known at trace time --------------------------------------------------------------------------------

def concrete_value(x) -> np.ndarray | None:
  """x as a NumPy array if its value is known while tracing, else None.

  Known: non-traced arrays, and values a jit/remat trace computed from constants only (flax's make_causal_mask
  called inside the traced function). Values that depend on the traced function's inputs are not known. Folding
  reads JAX's tracing state; anything unexpected there counts as "not known", never as a wrong value.
  """
  if x is None:
    return None
  if not isinstance(x, jax.core.Tracer):
    return np.asarray(x)
  if math.prod(x.shape) > _MAX_FOLDED_ELEMENTS:
    return None
  try:
    return _fold_constant(x)
  except Exception:  # internals changed or an operation cannot run eagerly: treat as data-dependent
    return None


class _NotConstant(Exception):
  pass


def _fold_constant(tracer) -> np.ndarray | None:
  from jax._src import core  # pylint: disable=g-import-not-at-top
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top

  known = core.to_concrete_value(tracer)
  if known is not None:
    return np.asarray(known)
  if not isinstance(tracer, pe.DynamicJaxprTracer):
    return None
  values: dict[int, object] = {}
  budget = [_MAX_FOLDED_EQNS]

  def evaluate(t):
    if id(t) in values:
      return values[id(t)]
    atom = t.val
    if isinstance(atom, core.Literal):
      value = atom.val
    else:
      value = t._trace.frame.constvar_to_val.get(atom)  # pylint: disable=protected-access
      if value is None:
        eqn = t.parent
        budget[0] -= 1
        if eqn is None or eqn.effects or budget[0] < 0:
          raise _NotConstant
        args = [evaluate(i) for i in eqn.in_tracers]
        with jax.ensure_compile_time_eval():
          outs = eqn.primitive.bind(*args, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        value = next(o for v, o in zip(eqn.outvars, outs) if v is atom)
    values[id(t)] = value
    return value

  try:
    return np.asarray(evaluate(tracer))
  except _NotConstant:
    return None


@dataclasses.dataclass(frozen=True)
class MaskStructure:
  """What a boolean mask (batch, heads|1, T, S) means, in jax.nn's top-left terms.

  Query i of batch b may attend key j iff q_valid[b, i] and kv_valid[b, j] and i - left <= j <= i + right, where
  None is unbounded. q_valid (batch, T) / kv_valid (batch, S) are None when every position is valid.
  """

  left: int | None = None
  right: int | None = None
  q_valid: np.ndarray | None = None
  kv_valid: np.ndarray | None = None


def analyse_mask(mask: np.ndarray) -> MaskStructure | None:
  """The structure of a concrete boolean mask broadcastable to (batch, heads, T, S), or None if it has none of the
  expressible forms (window x query validity x key validity, the same for every head)."""
  mask = np.asarray(mask, bool)
  if mask.ndim != 4:
    return None
  if mask.shape[1] > 1 and not (mask == mask[:, :1]).all():
    return None
  m = mask[:, 0]  # (batch|1, T, S)
  t, s = m.shape[1:]
  q_valid, kv_valid = m.any(axis=2), m.any(axis=1)
  i = np.arange(t)[:, None]
  j = np.arange(s)[None, :]
  offsets = np.broadcast_to(i - j, m.shape)[m]
  left = int(offsets.max()) if offsets.size else 0
  right = int(-offsets.min()) if offsets.size else 0
  band = (i - j <= left) & (j - i <= right)
  if not (m == (q_valid[:, :, None] & kv_valid[:, None, :] & band)).all():
    return None
  return MaskStructure(left=None if left >= t - 1 else left, right=None if right >= s - 1 else right,
                       q_valid=None if q_valid.all() else q_valid, kv_valid=None if kv_valid.all() else kv_valid)


# ---- validation ------------------------------------------------------------------------------------------------

# fa3_jax.flax checks its local_window_size arguments under this name.
_check_window = _validate.check_local_window_size


def _min_bound(a: int | None, b: int | None) -> int | None:
  return b if a is None else a if b is None else min(a, b)


def _and_valid(a, b):
  return b if a is None else a if b is None else jnp.logical_and(a, b)


def _ensure_4d(x):
  return None if x is None else jnp.expand_dims(jnp.asarray(x), tuple(range(4 - jnp.ndim(x))))


# ---- the internal entry point (also used by fa3_jax.flax) ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Masking:
  """Everything that restricts attention, in top-left terms (see MaskStructure); dense parts force the dense path.

  q_lengths / kv_lengths (batch,) int32 arrays (traced or not): query rows / keys at or past them take no part.
  q_valid (batch|1, T) and kv_valid (batch|1, S) bool arrays (traced or not); dense_mask bool broadcastable to
  (batch, heads, T, S); bias broadcastable to (batch, heads, T, S).
  segments: (ids, ids, max_segments) from _validate.segment_ids, for self-attention (T == S) with nothing else but
  the window: tokens attend only within their segment (flash_attn_func's q_segment_ids). A segment's query and key
  runs coincide, so jax.nn's top-left window within it is the kernels' bottom-right one.
  chunk: attention_chunk C > 0, top-left like the window: query i sees key j only if i // C == j // C (within a
  segment, counted from its start). The kernels take it where the bottom-right positions equal the top-left ones
  (a shift of 0); elsewhere the dense path masks it.
  """

  left: int | None = None
  right: int | None = None
  q_lengths: object = None
  kv_lengths: object = None
  q_valid: object = None
  kv_valid: object = None
  dense_mask: object = None
  bias: object = None
  segments: tuple | None = None
  chunk: int = 0

  def with_structure(self, st: MaskStructure) -> "Masking":
    return dataclasses.replace(self, left=_min_bound(self.left, st.left), right=_min_bound(self.right, st.right),
                               q_valid=_and_valid(self.q_valid, st.q_valid),
                               kv_valid=_and_valid(self.kv_valid, st.kv_valid))

  @property
  def kernel_expressible(self) -> bool:
    """Nothing but a window and lengths (whose alignment `_kernel_lengths` still has to check)."""
    return self.q_valid is None and self.kv_valid is None and self.dense_mask is None and self.bias is None

  def with_prefix_validity_as_lengths(self, batch: int) -> "Masking":
    """Concrete q_valid / kv_valid whose valid positions are a prefix of every row (a padding mask) become lengths,
    which the kernels take; others stay."""
    lengths = {}
    for side in ("q", "kv"):
      valid = getattr(self, f"{side}_valid")
      if isinstance(valid, np.ndarray) and (np.diff(valid.astype(np.int8), axis=-1) <= 0).all():
        n = np.broadcast_to(valid.sum(axis=-1), (batch,)).astype(np.int32)
        known = getattr(self, f"{side}_lengths")
        lengths |= {f"{side}_valid": None, f"{side}_lengths": n if known is None else jnp.minimum(known, n)}
    return dataclasses.replace(self, **lengths)

  def validity(self, t: int, s: int):
    """(q_valid, kv_valid) with the lengths folded in, for the dense path (None where every position is valid)."""
    def side(valid, lengths, n):
      return _and_valid(valid, None if lengths is None else jnp.arange(n)[None, :] < lengths[:, None])
    return side(self.q_valid, self.q_lengths, t), side(self.kv_valid, self.kv_lengths, s)


def attend(q, k, v, masking: Masking, *, scale: float | None = None, softcap: float = 0.0, sinks=None):
  """Attention with top-left masking. q (B, T, N, H), k (B, S, K, H), v (B, S, K, H_v), N % K == 0, one float dtype;
  sinks: optional (N,) float32 sink logits (fa3_jax/sinks.py).

  Returns (out (B, T, N, H_v) in q.dtype, lse (B, N, T) float32; -inf (the sink) and out = 0 where a row sees no
  key).
  Runs the fa3 custom_vjp when `masking.kernel_expressible` and the dtype/head dims have a kernel path, else the
  dense float32 path.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  _validate.check_seqlen("T (query's sequence length)", t)
  _validate.check_seqlen("S (key's sequence length)", s)
  scale, softcap = _validate.check_scale_and_softcap(scale, softcap, h, scale_name="scale")
  if 0 in q.shape[:3] or s == 0:
    return _empty_result(q, v, return_lse=True, sinks=sinks)
  # Bounds that exclude nothing become unbounded, so that windows of any size stay within int32 arithmetic.
  masking = dataclasses.replace(masking, left=None if masking.left is None or masking.left >= t - 1 else masking.left,
                                right=None if masking.right is None or masking.right >= s - 1 else masking.right)
  if masking.segments is not None:
    if _has_flash_path(q, k, v):
      return segment_attention(_config(masking, scale, softcap, shift=0), q, k, v, *masking.segments, sinks=sinks)
    ids = masking.segments[0]
    same_segment = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
    if masking.chunk:  # chunks count from each segment's start
      chunk = _segments.run_coordinates(ids)[0] // masking.chunk
      same_segment = same_segment & (chunk[:, :, None] == chunk[:, None, :])
    masking = dataclasses.replace(masking, segments=None, dense_mask=same_segment[:, None], chunk=0)
  masking = masking.with_prefix_validity_as_lengths(b)
  lengths = _kernel_lengths(masking, t, s) if masking.kernel_expressible and _has_flash_path(q, k, v) else None
  if lengths is None or (masking.chunk and lengths[2] != 0):
    out, lse = _dense_attention(q, k, v, masking, _config(masking, scale, softcap, shift=s - t))
    return (out, lse) if sinks is None else sinks_lib.apply(out, lse, sinks)
  used_q, used_k, shift = lengths
  out, lse = _attention_under(_config(masking, scale, softcap, shift), q, k, v,
                              SequenceLayout(seqused_q=used_q, seqused_k=used_k), sinks)
  if masking.q_lengths is None:
    return out, lse
  # The kernels may have run every query row (see _kernel_lengths): those past q_lengths are padding, 0 and -inf;
  # the where also keeps their gradients at 0.
  q_valid = jnp.arange(t)[None, :] < masking.q_lengths[:, None]
  return jnp.where(q_valid[:, :, None, None], out, 0), jnp.where(q_valid[:, None, :], lse, -jnp.inf)


def _config(masking: Masking, scale: float, softcap: float, shift: int) -> AttentionConfig:
  """masking's top-left window in the kernels' bottom-right terms, for sequences whose used key length exceeds
  their used query length by `shift` (docs/integration.md §7): query i's bottom-right diagonal is i + shift, so
  top-left's i - left <= j <= i + right is window_left = left + shift, window_right = right - shift. The chunk rule
  carries over only at shift 0 (where the two positions agree); the dense path masks other shifts itself."""
  return AttentionConfig(softmax_scale=scale, window_left=None if masking.left is None else masking.left + shift,
                         window_right=None if masking.right is None else masking.right - shift, softcap=softcap,
                         attention_chunk=masking.chunk if shift == 0 else 0)


def _kernel_lengths(masking: Masking, t: int, s: int):
  """(seqused_q, seqused_k, shift): how the kernels take masking's lengths with jax.nn's top-left alignment, or None
  where they provably cannot (the caller then runs the dense path).

  The kernels align windows bottom-right on each batch entry's used lengths (lq, lk), i.e. on the diagonal
  i + lk - lq, while jax.nn aligns them top-left, on i, whatever the lengths. One static window serves every batch
  entry only if the shift lk - lq is the same for all of them and known at trace time. Keys past kv_lengths must be
  invisible, so lk is kv_lengths (or S); the queries may use q_lengths (the kernels then skip the padded rows) or
  all T rows (the caller zeroes the rows past q_lengths afterwards): the first for which the shift is provably
  constant. Without a window the shift does not matter.
  """
  q_lengths, kv_lengths = masking.q_lengths, masking.kv_lengths
  if masking.left is None and masking.right is None:
    return _as_seqused(q_lengths), _as_seqused(kv_lengths), 0
  for used_q in (None,) if q_lengths is None else (q_lengths, None):
    shift = _constant_difference(s if kv_lengths is None else kv_lengths, s, t if used_q is None else used_q, t)
    if shift is not None:
      return _as_seqused(used_q), _as_seqused(kv_lengths), shift
  return None


def _as_seqused(lengths):
  return None if lengths is None else jnp.asarray(lengths, jnp.int32)


def _known_lengths(x, rows: int) -> np.ndarray | None:
  """A side's row count (an int) or (batch,) lengths as the kernels use them, clipped to [0, rows], where known at
  trace time."""
  value = x if isinstance(x, int) else concrete_value(x)
  return None if value is None else np.clip(np.asarray(value, np.int64), 0, rows)


def _constant_difference(a, rows_a: int, b, rows_b: int) -> int | None:
  """a - b (each a side's row count or its (batch,) lengths, see _known_lengths) when it provably is one number for
  every batch entry: the same array object on sides of equal rows, or values known at trace time. Else None."""
  if a is b and rows_a == rows_b:
    return 0
  known_a, known_b = _known_lengths(a, rows_a), _known_lengths(b, rows_b)
  if known_a is None or known_b is None:
    return None
  difference = np.unique(known_a - known_b)
  return int(difference[0]) if difference.size == 1 else None


def _has_flash_path(q, k, v) -> bool:
  if np.dtype(q.dtype).name not in _KERNEL_DTYPES:
    return False
  try:
    _validate.check_head_dims(q.shape[-1], v.shape[-1])
  except (ValueError, NotImplementedError):
    return False
  return True


def _dense_attention(q, k, v, masking: Masking, cfg: AttentionConfig):
  """Dense float32 attention with arbitrary masking: the path for padding, bias and general masks. cfg holds the
  scale, softcap and masking's window (bottom-right, as the kernels take it)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qg = q.astype(jnp.float32).reshape(b, t, kh, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * cfg.softmax_scale
  if cfg.softcap > 0:
    logits = cfg.softcap * jnp.tanh(logits / cfg.softcap)

  def grouped(x):  # (B|1, N|1, T, S) -> (B|1, K|1, G|1, T, S)
    x = _ensure_4d(x)
    return x[:, :, None] if x.shape[1] == 1 else x.reshape(x.shape[0], kh, g, *x.shape[2:])

  if masking.bias is not None:
    logits = logits + grouped(masking.bias).astype(jnp.float32)
  rows, cols = jnp.arange(t)[:, None], jnp.arange(s)[None, :]
  attend = visible(rows, cols, t, s, dataclasses.replace(cfg, attention_chunk=0))[None, None, None]
  if masking.chunk:  # top-left, as jax.nn's positions
    attend = attend & (rows // masking.chunk == cols // masking.chunk)[None, None, None]
  q_valid, kv_valid = masking.validity(t, s)
  if q_valid is not None:
    attend = attend & jnp.asarray(q_valid, bool)[:, None, None, :, None]
  if kv_valid is not None:
    attend = attend & jnp.asarray(kv_valid, bool)[:, None, None, None, :]
  if masking.dense_mask is not None:
    attend = attend & grouped(jnp.asarray(masking.dense_mask, bool))
  attend = jnp.broadcast_to(attend, logits.shape)
  masked = jnp.where(attend, logits, -jnp.inf)
  m = jnp.max(masked, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(attend, jnp.exp(jnp.where(attend, logits, 0.0) - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  has_keys = l > 0
  safe_l = jnp.where(has_keys, l, 1.0)
  out = jnp.einsum("bkgts,bskh->btkgh", p / safe_l, v.astype(jnp.float32)).reshape(b, t, n, v.shape[-1])
  lse = jnp.where(has_keys, m + jnp.log(safe_l), -jnp.inf)[..., 0].reshape(b, n, t)
  return out.astype(q.dtype), lse


# ---- the public drop-in ----------------------------------------------------------------------------------------

def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False, sinks=None, attention_chunk=0):
  """Scaled dot-product attention with jax.nn.dot_product_attention's signature and semantics, on fa3_jax.

  Args:
    query: (B, T, N, H) or (T, N, H); float16 | bfloat16 (kernel on Hopper) or float32 (reference path). Arrays or,
      as in jax.nn, nested lists. H >= 1; T and S are at most fa3_jax's MAX_SEQLEN = 2**29; sizes B, T, S or
      N = K = 0 give empty / zero results.
    key: (B, S, K, H) or (S, K, H), query's dtype; N % K == 0 (GQA/MQA: query head n reads kv head n // (N // K)).
    value: key's shape, except that (H, H_v) may be (192, 128) as in flash_attn_func; other H_v != H raise
      NotImplementedError (jax.nn rejects every H_v != H).
    bias: optional additive logits bias broadcastable to (B, N, T, S); runs the dense float32 path.
    mask: optional bool mask broadcastable to (B, N, T, S), True = attend. If its values are known at trace time
      (a constant, or computed from shapes only, like flax's make_causal_mask even inside jit) and it is a top-left
      causal/window band, it becomes kernel arguments; padding-shaped (query validity x key validity, optionally
      with a band) runs the dense path; anything else, or a mask depending on traced data, runs the dense path.
    scale: logits scale, default 1/sqrt(H). Must be a Python number (a kernel compile-time constant), at most
      float32_max / (H * 65504**2 * log2(e)) (larger scales could overflow float32 scores; see flash_attn_func).
    is_causal: top-left causal: query i sees key j iff j <= i (jax.nn's convention; fa3_jax.flash_attn_func is
      bottom-right). With T != S this is AttentionConfig(window_right=T - S).
    query_seq_lengths: optional (B,) int32; query rows at or beyond the length output zeros (and zero gradients).
    key_value_seq_lengths: optional (B,) int32; keys at or beyond the length are invisible. Lengths run on the
      kernels (per-batch seqused) where their alignment provably matches jax.nn's top-left one (see the module
      docstring): always without is_causal / local_window_size, always with only query_seq_lengths, and with
      both when the same array is passed for both (T == S) or the lengths are known at trace time; else the dense
      float32 path.
    local_window_size: int w or (left, right): query i sees keys i - left ... i + right (inclusive).
    implementation: None or "fa3" (this library), or "xla" / "cudnn" to call jax.nn.dot_product_attention.
    return_residual: also return the logsumexp, (B, T, N) or (T, N), in key's dtype, without gradient (jax.nn's
      layout and behaviour; rows that see no key, those beyond query_seq_lengths included, give jax.nn's value
      there, the masking value -0.7 * float32's max cast to key's dtype: -inf in float16).
    sinks: optional (N,) learnable sink logits (fa3_jax's extension; see flash_attn_func), differentiable.
    attention_chunk: int C >= 0 (fa3_jax's extension; 0: off): query i sees key j only if i // C == j // C, on top
      of everything else, top-left like is_causal. On the kernels where T == S and the lengths (if any) are the
      same for queries and keys; else the dense path.

  Returns:
    (B, T, N, H_v) (or (T, N, H_v)) in query's dtype; with return_residual, (out, residual).

  Calls that run the fa3 custom_vjp (see the module docstring) raise NotImplementedError for second-order
  derivatives; the dense path supports them.
  """
  if _validate.check_choice("implementation", implementation, (None, "fa3", "xla", "cudnn")) in ("xla", "cudnn"):
    if sinks is not None or attention_chunk:
      raise NotImplementedError(f"sinks and attention_chunk are fa3_jax's extensions; implementation="
                                f"{implementation!r} (jax.nn.dot_product_attention) has neither: pass "
                                "implementation=None")
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        implementation=implementation, return_residual=return_residual)
  query, key, value = (_validate.as_array(name, x) for name, x in (("query", query), ("key", key), ("value", value)))
  unbatched = jnp.ndim(query) == 3
  q, k, v = (_ensure_4d(x) for x in (query, key, value))
  for name, x in (("query", q), ("key", k), ("value", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape (B, T|S, N|K, H) or (T|S, N|K, H), got {tuple(x.shape)}")
  b, t, n, _ = q.shape
  _, s, kh, _ = k.shape
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
    raise TypeError(f"query, key and value must share a floating dtype, got query={q.dtype}, key={k.dtype}, "
                    f"value={v.dtype}")
  # N = K = 0 is an empty problem (jax.nn divides by K there); K = 0 with query heads is not.
  if k.shape[0] != b or v.shape[:3] != k.shape[:3] or q.shape[-1] != k.shape[-1] or (n % kh if kh else n):
    raise ValueError(f"expected query (B, T, N, H), key (B, S, K, H), value (B, S, K, H_v) with N % K == 0, got "
                     f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}")
  if q.shape[-1] == 0:
    raise ValueError(f"query and key must have a head dim H >= 1 (the default scale is 1/sqrt(H)), got query "
                     f"{tuple(q.shape)}")
  _validate.check_head_dim_v(q.shape[-1], v.shape[-1], d_name="H", dv_name="value's H_v")
  is_causal = _validate.check_bool("is_causal", is_causal)
  return_residual = _validate.check_bool("return_residual", return_residual)
  left, right = _check_window(local_window_size)
  masking = Masking(left=left, right=_min_bound(right, 0 if is_causal else None))
  q_lengths = _validate.check_seq_lengths("query_seq_lengths", query_seq_lengths, b)
  kv_lengths = _validate.check_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, b)
  # One array passed for both (self-attention padding) stays one object: _kernel_lengths can then prove that the
  # kernels' per-sequence alignment equals jax.nn's even for traced lengths.
  if key_value_seq_lengths is query_seq_lengths:
    kv_lengths = q_lengths
  masking = dataclasses.replace(masking, q_lengths=q_lengths, kv_lengths=kv_lengths,
                                chunk=_validate.check_attention_chunk(attention_chunk))
  sinks = _validate.check_sinks(sinks, n)
  if bias is not None:
    bias = _validate.check_broadcastable("bias", _ensure_4d(_validate.as_array("bias", bias)), (b, n, t, s))
    masking = dataclasses.replace(masking, bias=bias)
  if mask is not None:
    mask = _validate.check_broadcastable("mask", _ensure_4d(_validate.as_array("mask", mask)), (b, n, t, s))
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be a bool array (True = attend), got {mask.dtype}")
    known = concrete_value(mask)
    structure = None if known is None else analyse_mask(known)
    masking = (dataclasses.replace(masking, dense_mask=mask) if structure is None
               else masking.with_structure(structure))

  out, lse = attend(q, k, v, masking, scale=scale, sinks=sinks)
  if unbatched:
    out, lse = out[0], lse[0]
  if not return_residual:
    return out
  lse = jnp.where(jnp.isneginf(lse), _JAX_NN_MASKED_LSE, lse)  # rows that see no key, as jax.nn
  return out, jax.lax.stop_gradient(jnp.swapaxes(lse, -1, -2).astype(k.dtype))
