"""Blockwise pure-JAX attention with exactly the kernels' semantics: the non-CUDA path and the test oracle.

Both directions walk the key axis in blocks with an online softmax and float32 arithmetic, so memory grows with
seqlen (one (seqlen_q, block) score tile at a time), never with seqlen_q * seqlen_k. Inputs are upcast to float32:
this path is the yardstick the kernels are measured against, so it favours accuracy over speed.

Layouts (BSHD): q (batch, seqlen_q, heads, head_dim), k (batch, seqlen_k, kv_heads, head_dim),
v (batch, seqlen_k, kv_heads, head_dim_v); query head i reads kv head i // (heads // kv_heads). Optional per-batch
lengths (seqlen_q / seqlen_k, (batch,) int32) shorten each batch entry's sequences. Variable-length calls
(`varlen_forward` / `varlen_backward`, any SequenceLayout) gather each packed side into that padded form
(batch, max_seqlen, ...), run the same blockwise attention with the per-batch lengths and scatter back; segment ids
stay BSHD and mask the pairs of different segments instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fa3_jax import _segments
from fa3_jax import _vma
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout
from fa3_jax._config import visible

DEFAULT_BLOCK_K = 256


def _grouped_queries(x, kv_heads: int):
  """(b, s, h, d) -> (b, kv_heads, group, s, d) float32: the query heads that share one kv head side by side."""
  b, s, h, d = x.shape
  return x.astype(jnp.float32).reshape(b, s, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungrouped(x):
  """(b, kv_heads, group, s, d) -> (b, s, kv_heads * group, d)."""
  b, hk, g, s, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


def _key_blocks(x, block: int):
  """(b, s_k, hk, d) -> (n_blocks, b, block, hk, d) float32, zero-padded; padded keys are masked by position."""
  b, s, hk, d = x.shape
  n = -(-s // block)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - s), (0, 0), (0, 0)))
  return x.reshape(b, n, block, hk, d).transpose(1, 0, 2, 3, 4)


def _unblocked(x, seqlen: int):
  """(n_blocks, b, block, hk, d) -> (b, seqlen, hk, d)."""
  n, b, block, hk, d = x.shape
  return x.transpose(1, 0, 2, 3, 4).reshape(b, n * block, hk, d)[:, :seqlen]


def _scores(qg, kb, cfg: AttentionConfig):
  """Scaled (and softcapped) scores of one key block, (b, hk, g, s_q, block), plus tanh for the softcap derivative."""
  s = jnp.einsum("bhgqd,bkhd->bhgqk", qg, kb) * cfg.softmax_scale
  if cfg.softcap > 0:
    t = jnp.tanh(s / cfg.softcap)
    return cfg.softcap * t, t
  return s, None


def _lengths(lengths, seqlen: int):
  """Per-batch lengths (b,) as (b, 1, 1, 1, 1), clipped to [0, seqlen], against (b, hk, g, s_q, block) scores; the
  tensor's seqlen when there are none."""
  return seqlen if lengths is None else jnp.clip(lengths, 0, seqlen)[:, None, None, None, None]


def _visibility(cfg: AttentionConfig, seqlen_q: int, seqlen_k: int, block: int, lengths_q=None, lengths_k=None,
                segment_ids=None):
  """mask(start): which (query, key) pairs of the key block starting at `start` may attend, (s_q, block) or
  (b, 1, 1, s_q, block) against the scores. The visibility rule takes each token's position in its sequence and
  that sequence's lengths: the tensor's rows and per-batch lengths (`lengths_q` / `lengths_k`, from _lengths), or,
  with segment_ids = (q ids (b, s_q), k ids (b, s_k)), the token's place in its run and the run's length, a pair
  also needing one non-negative id (docs/integration.md §4.9). Keys past seqlen_k (the last block's padding) are
  invisible either way."""
  if segment_ids is None:
    return lambda start: visible(jnp.arange(seqlen_q)[:, None], start + jnp.arange(block)[None, :], lengths_q,
                                 lengths_k, cfg)
  ids_q, ids_k = segment_ids
  padded = -(-seqlen_k // block) * block
  as_q = lambda x: x[:, None, None, :, None]
  (index_q, length_q), (index_k, length_k) = _segments.run_coordinates(ids_q), _segments.run_coordinates(ids_k)
  # Padded keys: id -1 (no segment) and length 0.
  ids_k, index_k, length_k = (jnp.pad(x, ((0, 0), (0, padded - seqlen_k)), constant_values=fill)
                              for x, fill in ((ids_k, -1), (index_k, 0), (length_k, 0)))

  def mask(start):
    as_k = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block, axis=1)[:, None, None, None, :]
    same = (as_q(ids_q) == as_k(ids_k)) & (as_q(ids_q) >= 0)
    return same & visible(as_q(index_q), as_k(index_k), as_q(length_q), as_k(length_k), cfg)

  return mask


def _block_size(seqlen_k: int, block_k: int) -> int:
  return min(block_k, seqlen_k)


def attention_forward(q, k, v, cfg: AttentionConfig, block_k: int = DEFAULT_BLOCK_K, seqlen_q=None, seqlen_k=None,
                      segment_ids=None):
  """Returns (out (b, s_q, h, d_v) in q.dtype, lse (b, h, s_q) float32 natural log; -inf where no key is visible).

  seqlen_q / seqlen_k: optional (b,) int32 lengths of each batch entry's sequences (clipped to [0, s_q] / [0, s_k]):
  query rows at or past seqlen_q[b] give out = 0 and lse = -inf, keys at or past seqlen_k[b] are invisible, and
  windows align bottom-right on the two lengths. segment_ids: optional (q ids (b, s_q), k ids (b, s_k)) int32
  instead: each run of one id is a sequence, whose queries attend the key run of their id (see _visibility).
  """
  lengths_q, lengths_k = _lengths(seqlen_q, q.shape[1]), _lengths(seqlen_k, k.shape[1])
  seqlen_q, seqlen_k, kv_heads = q.shape[1], k.shape[1], k.shape[2]  # from here on the tensors' seqlens
  block = _block_size(seqlen_k, block_k)
  visible_in = _visibility(cfg, seqlen_q, seqlen_k, block, lengths_q, lengths_k, segment_ids)
  qg = _grouped_queries(q, kv_heads)
  b, hk, g = qg.shape[:3]

  def step(carry, xs):
    m, l, acc = carry
    kb, vb, start = xs
    s, _ = _scores(qg, kb, cfg)
    s = jnp.where(visible_in(start), s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    # A row that has seen no visible key keeps max -inf; exponentiate against 0 there so that -inf - -inf
    # never produces NaN (its p and correction are exactly 0).
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_ref[..., None])
    correction = jnp.exp(m - m_ref)
    l = l * correction + p.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vb)
    return (m_new, l, acc), None

  axes = _vma.varying_axes(q, k, v)  # inside shard_map, scan carries must vary like the inputs
  init = tuple(_vma.vary_over(x, axes) for x in (jnp.full((b, hk, g, seqlen_q), -jnp.inf, jnp.float32),
                                                jnp.zeros((b, hk, g, seqlen_q), jnp.float32),
                                                jnp.zeros((b, hk, g, seqlen_q, v.shape[-1]), jnp.float32)))
  starts = jnp.arange(0, seqlen_k, block)
  (m, l, acc), _ = jax.lax.scan(step, init, (_key_blocks(k, block), _key_blocks(v, block), starts))

  has_keys = l > 0
  out = jnp.where(has_keys[..., None], acc / jnp.where(has_keys, l, 1.0)[..., None], 0.0)
  lse = jnp.where(has_keys, m + jnp.log(jnp.where(has_keys, l, 1.0)), -jnp.inf)
  return _ungrouped(out).astype(q.dtype), lse.reshape(b, hk * g, seqlen_q)


def attention_backward(q, k, v, out, lse, dout, cfg: AttentionConfig, dlse=None, block_k: int = DEFAULT_BLOCK_K,
                       seqlen_q=None, seqlen_k=None, segment_ids=None):
  """Gradients (dq, dk, dv) in the input dtypes, given the forward's out and lse and the cotangent dout.

  dlse, the cotangent of lse (b, h, s_q) float32, is optional: since d lse / d s = p, it enters as a shift of
  D = rowsum(dout * out). For GQA/MQA dk and dv are summed over the query heads of each group. seqlen_q / seqlen_k
  and segment_ids as in attention_forward: rows and keys that see or are seen by nothing get zero gradients.
  """
  lengths_q, lengths_k = _lengths(seqlen_q, q.shape[1]), _lengths(seqlen_k, k.shape[1])
  seqlen_q, seqlen_k, kv_heads = q.shape[1], k.shape[1], k.shape[2]  # from here on the tensors' seqlens
  block = _block_size(seqlen_k, block_k)
  visible_in = _visibility(cfg, seqlen_q, seqlen_k, block, lengths_q, lengths_k, segment_ids)
  qg = _grouped_queries(q, kv_heads)
  dog = _grouped_queries(dout, kv_heads)
  b, hk, g = qg.shape[:3]
  delta = jnp.sum(dog * _grouped_queries(out, kv_heads), axis=-1)
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32).reshape(b, hk, g, seqlen_q)
  # Rows with no visible key have lse = -inf; +inf there makes every p exactly 0 (and their gradients 0).
  lse_g = lse.reshape(b, hk, g, seqlen_q)
  lse_g = jnp.where(jnp.isfinite(lse_g), lse_g, jnp.inf)

  def step(dq, xs):
    kb, vb, start = xs
    s, t = _scores(qg, kb, cfg)
    p = jnp.where(visible_in(start), jnp.exp(s - lse_g[..., None]), 0.0)
    dv_b = jnp.einsum("bhgqk,bhgqd->bkhd", p, dog)
    dp = jnp.einsum("bhgqd,bkhd->bhgqk", dog, vb)
    ds = p * (dp - delta[..., None])
    if t is not None:
      ds = ds * (1.0 - t * t)  # d(cap * tanh(x / cap)) / dx
    ds = ds * cfg.softmax_scale
    dq = dq + jnp.einsum("bhgqk,bkhd->bhgqd", ds, kb)
    dk_b = jnp.einsum("bhgqk,bhgqd->bkhd", ds, qg)
    return dq, (dk_b, dv_b)

  starts = jnp.arange(0, seqlen_k, block)
  dq_init = _vma.vary_over(jnp.zeros_like(qg), _vma.varying_axes(q, k, v, out, lse, dout))
  dq, (dk, dv) = jax.lax.scan(step, dq_init, (_key_blocks(k, block), _key_blocks(v, block), starts))
  return (_ungrouped(dq).astype(q.dtype), _unblocked(dk, seqlen_k).astype(k.dtype),
          _unblocked(dv, seqlen_k).astype(v.dtype))


# ---- sequence layouts: packed sides as a padded batch ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Padding:
  """One side of a SequenceLayout as a padded batch (batch, max_seqlen, ...). index (batch, max_seqlen) int32 holds
  the packed row of each padded position, or `rows` (one past the last row) where the sequence has ended; it is None
  for a BSHD side, which is padded already. lengths (batch,) int32, or None where every row takes part."""
  index: jax.Array | None
  lengths: jax.Array | None
  rows: int

  def pad(self, x):
    """(rows, ...) -> (batch, max_seqlen, ...), zero past each sequence's end."""
    return x if self.index is None else jnp.take(x, self.index, axis=0, mode="fill", fill_value=0)

  def unpad(self, y, fill):
    """(batch, max_seqlen, ...) -> (rows, ...): each sequence's rows in place, `fill` in rows of no sequence."""
    if self.index is None:
      return y
    return jnp.full((self.rows, *y.shape[2:]), fill, y.dtype).at[self.index].set(y, mode="drop")

  def unpad_gradient(self, y):
    """The transpose of pad: (batch, max_seqlen, ...) summed into zeros (rows, ...)."""
    if self.index is None:
      return y
    return jnp.zeros((self.rows, *y.shape[2:]), y.dtype).at[self.index].add(y, mode="drop")

  def pad_lse(self, lse):
    """lse (heads, rows) of a packed q -> (batch, heads, max_seqlen), like the BSHD lse."""
    return lse if self.index is None else jnp.swapaxes(self.pad(lse.T), 1, 2)

  def unpad_lse(self, lse):
    """(batch, heads, max_seqlen) -> (heads, rows), -inf in rows of no sequence."""
    return lse if self.index is None else self.unpad(jnp.swapaxes(lse, 1, 2), -jnp.inf).T


def paddings(sequences: SequenceLayout, q, k) -> tuple[Padding, Padding]:
  """The Paddings of the q and k sides of q (packed (total_q, h, d) or BSHD) and k under `sequences`."""
  def side(name, x, packed, bound):
    rows = x.shape[0] if packed else x.shape[1]
    offset, length = sequences.extents(name, rows)
    if offset is None:
      return Padding(None, length, rows)
    position = jnp.arange(bound, dtype=jnp.int32)
    return Padding(jnp.where(position < length[:, None], offset[:, None] + position, rows), length, rows)

  return (side("q", q, sequences.packed_q, sequences.max_seqlen_q),
          side("k", k, sequences.packed_k, sequences.max_seqlen_k))


def _segment_ids(sequences: SequenceLayout):
  """(q ids, k ids) of a segmented layout."""
  ids_q = sequences.segment_ids_q
  return ids_q, ids_q if sequences.segment_ids_k is None else sequences.segment_ids_k


def varlen_forward(q, k, v, cfg: AttentionConfig, sequences: SequenceLayout, block_k: int = DEFAULT_BLOCK_K):
  """attention_forward under a SequenceLayout: (out, lse) in q's layout (packed: (total_q, h, d_v) and
  (h, total_q)); rows of no sequence give 0 and -inf. A uniform layout is attention_forward itself; a segmented
  one keeps its BSHD tensors and masks by segment, so that its memory does not grow with max_segments; a paged one
  gathers its keys (SequenceLayout.unpaged)."""
  k, v, sequences = sequences.unpaged(k, v)
  if sequences.segmented:
    return attention_forward(q, k, v, cfg, block_k, segment_ids=_segment_ids(sequences))
  pq, pk = paddings(sequences, q, k)
  out, lse = attention_forward(pq.pad(q), pk.pad(k), pk.pad(v), cfg, block_k, seqlen_q=pq.lengths,
                               seqlen_k=pk.lengths)
  return pq.unpad(out, 0), pq.unpad_lse(lse)


def varlen_backward(q, k, v, out, lse, dout, cfg: AttentionConfig, sequences: SequenceLayout, dlse=None,
                    block_k: int = DEFAULT_BLOCK_K):
  """attention_backward under a SequenceLayout: (dq, dk, dv) in the layouts of q, k, v; rows and keys of no
  sequence get zero gradients. dlse, if given, has lse's layout."""
  if sequences.segmented:
    return attention_backward(q, k, v, out, lse, dout, cfg, dlse=dlse, block_k=block_k,
                              segment_ids=_segment_ids(sequences))
  pq, pk = paddings(sequences, q, k)
  dq, dk, dv = attention_backward(pq.pad(q), pk.pad(k), pk.pad(v), pq.pad(out), pq.pad_lse(lse), pq.pad(dout), cfg,
                                  dlse=None if dlse is None else pq.pad_lse(dlse), block_k=block_k,
                                  seqlen_q=pq.lengths, seqlen_k=pk.lengths)
  return pq.unpad_gradient(dq), pk.unpad_gradient(dk), pk.unpad_gradient(dv)
