"""Segment ids in XLA, under jit, from traced ids, with fixed-size arrays: their runs (what a segment is), each
token's place in its run (the reference's segment mask), and the packed SequenceLayout the kernels run: the
definition that distinct q / kv ids use and that the CUDA derivation of shared ids
(cuda/include/fa3/segment_layout.cuh, through _ops.segment_packing) reproduces exactly. docs/integration.md §4.9."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax._config import SequenceLayout

_NO_ID = np.iinfo(np.int32).max  # sorts after every id: empty key slots are never matched


def _run_starts(ids):
  """(..., s) bool: where a run of equal non-negative ids begins (negative ids, padding, belong to no run)."""
  previous = jnp.concatenate([jnp.full_like(ids[..., :1], -1), ids[..., :-1]], axis=-1)
  return (ids >= 0) & (ids != previous)


def run_coordinates(ids):
  """(index, length) (..., s) int32: each position's index within its run and that run's length (arbitrary at
  padding, which belongs to no run)."""
  s = ids.shape[-1]
  position = jnp.arange(s, dtype=jnp.int32)
  following = jnp.concatenate([ids[..., 1:], jnp.full_like(ids[..., :1], -1)], axis=-1)
  ends = (ids >= 0) & (ids != following)
  start = jax.lax.cummax(jnp.where(_run_starts(ids), position, 0), axis=ids.ndim - 1)
  end = jax.lax.cummin(jnp.where(ends, position, s), axis=ids.ndim - 1, reverse=True)
  return position - start, end - start + 1


def run_counts(ids):
  """The runs of each row of ids (..., s) int32: (...,) int32."""
  return _run_starts(ids).sum(axis=-1, dtype=jnp.int32)


def _runs(ids, max_segments: int):
  """The runs of each row of ids (b, s) int32, in order, the first max_segments of them: (starts, lengths, run_ids)
  (b, max_segments) int32, empty slots (s, 0, -1). Written per row and vmapped, so that the scatters carry the
  batch as a batching dimension."""
  def row(ids):
    s = ids.shape[0]
    first = _run_starts(ids)
    slot = jnp.where(ids >= 0, jnp.cumsum(first) - 1, max_segments)  # out of range: dropped by the scatters
    empty = jnp.zeros((max_segments,), jnp.int32)
    starts = (empty + s).at[slot].min(jnp.arange(s, dtype=jnp.int32), mode="drop")
    lengths = empty.at[slot].add(1, mode="drop")
    run_ids = (empty - 1).at[slot].max(ids, mode="drop")
    return starts, lengths, run_ids

  return jax.vmap(row)(ids)


def _matched_keys(run_ids_q, keys):
  """For each query slot (b, m), the (start, length) of the key run with its id; length 0 where there is none (or
  the slot is empty). keys is _runs of the key ids. Unmatched slots start where the previous matched run ends, so
  that the starts stay nondecreasing when shared ids come in the same order on both sides. Matching sorts each row's
  key ids and binary-searches them: O(max_segments log max_segments) per row, where a comparison of every pair of
  slots would take max_segments**2 memory."""
  starts_k, lengths_k, run_ids_k = keys
  # Empty slots sort last; they are each row's trailing slots, so a stable sort keeps them after a real id of
  # _NO_ID too, and the leftmost match is real.
  keys_ids = jnp.where(run_ids_k >= 0, run_ids_k, _NO_ID)
  order = jnp.argsort(keys_ids, axis=1, stable=True)
  sorted_ids = jnp.take_along_axis(keys_ids, order, axis=1)
  found = jnp.minimum(jax.vmap(jnp.searchsorted)(sorted_ids, run_ids_q), run_ids_k.shape[1] - 1)
  slot = jnp.take_along_axis(order, found, axis=1)
  matched = (jnp.take_along_axis(sorted_ids, found, axis=1) == run_ids_q) & (run_ids_q >= 0)
  starts, lengths = (jnp.take_along_axis(x, slot, axis=1) for x in (starts_k, lengths_k))
  ends = jnp.where(matched, starts + lengths, 0)
  previous_end = jnp.concatenate([jnp.zeros_like(ends[:, :1]), jax.lax.cummax(ends, axis=1)[:, :-1]], axis=1)
  return jnp.where(matched, starts, previous_end), jnp.where(matched, lengths, 0)


def packing(sequences: SequenceLayout) -> SequenceLayout:
  """The packed layout of a segmented one: its batch's rows back to back, (batch * seqlen, heads, dim) per side,
  batch * max_segments sequences. Slot m of row b is the row's m-th query run and the key run of the same id; the
  slots with rows come first, in order (segment m of row b at offset b * seqlen + start, seqused its length), then
  the empty ones, at the tensors' end, where the kernels' walks over the sequences stop (docs/kernels.md §10.2), so
  the unused slots of a generous max_segments cost (almost) nothing. Well-formed ids (contiguous runs, shared ids in
  the same order on both sides) give nondecreasing offsets; other values are clamped like any packing's."""
  m = sequences.max_segments
  q_ids = sequences.segment_ids_q
  kv_ids = q_ids if sequences.segment_ids_k is None else sequences.segment_ids_k
  queries = _runs(q_ids, m)
  if sequences.segment_ids_k is None:
    keys = queries[:2]
  else:
    keys = _matched_keys(queries[2], _runs(kv_ids, m))

  def side(starts, lengths, seqlen):
    batch = starts.shape[0]
    return (starts + seqlen * jnp.arange(batch, dtype=jnp.int32)[:, None]).reshape(-1), lengths.reshape(-1)

  (starts_q, used_q), (starts_k, used_k) = side(*queries[:2], q_ids.shape[1]), side(*keys, kv_ids.shape[1])
  total_q, total_k = q_ids.size, kv_ids.size
  real = (used_q > 0) | (used_k > 0)
  slot = jnp.where(real, jnp.cumsum(real) - 1, real.sum() + jnp.cumsum(~real) - 1)

  def compact(values, empty):
    return jnp.full_like(values, empty).at[slot].set(jnp.where(real, values, empty), unique_indices=True)

  cu_q, cu_k = (jnp.append(compact(x, total), jnp.int32(total)) for x, total in ((starts_q, total_q),
                                                                                (starts_k, total_k)))
  return SequenceLayout(cu_q, cu_k, compact(used_q, 0), compact(used_k, 0), max_seqlen_q=q_ids.shape[1],
                        max_seqlen_k=kv_ids.shape[1])
