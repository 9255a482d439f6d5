"""Segment ids as a segmented SequenceLayout, computed on device (under jit, from traced ids) with fixed-size arrays:
every batch row has max_segments slots, the unused ones empty. docs/integration.md §4.9."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax._config import SequenceLayout

_NO_ID = np.iinfo(np.int32).max  # sorts after every id: empty key slots are never matched


def _runs(ids, max_segments: int):
  """The runs of equal non-negative ids of each row of ids (b, s) int32, in order, the first max_segments of them:
  (starts, lengths, run_ids) (b, max_segments) int32, empty slots (s, 0, -1); and the number of runs per row (b,).
  Tokens with negative ids (padding) belong to no run. Written per row and vmapped, so that the scatters carry the
  batch as a batching dimension, which XLA partitions with a sharded batch instead of reducing across it."""
  def row(ids):
    s = ids.shape[0]
    valid = ids >= 0
    first = valid & jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    slot = jnp.where(valid, jnp.cumsum(first) - 1, max_segments)  # out of range: dropped by the scatters
    empty = jnp.zeros((max_segments,), jnp.int32)
    starts = (empty + s).at[slot].min(jnp.arange(s, dtype=jnp.int32), mode="drop")
    lengths = empty.at[slot].add(1, mode="drop")
    run_ids = (empty - 1).at[slot].max(ids, mode="drop")
    return starts, lengths, run_ids, first.sum()

  return jax.vmap(row)(ids)


def _matched_keys(run_ids_q, keys):
  """For each query slot (b, m), the (start, length) of the key run with its id; length 0 where there is none (or
  the slot is empty). keys is _runs of the key ids. Unmatched slots start where the previous matched run ends, so
  that the starts stay nondecreasing (SequenceLayout.packing) when shared ids come in the same order on both sides.
  Matching sorts each row's key ids and binary-searches them: O(max_segments log max_segments) per row, where a
  comparison of every pair of slots would take max_segments**2 memory."""
  starts_k, lengths_k, run_ids_k, _ = keys
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


def segment_layout(q_ids, kv_ids, max_segments: int) -> tuple[SequenceLayout, jax.Array]:
  """(the segmented SequenceLayout, overflow) of q_ids (b, s_q) and kv_ids (b, s_k) int32 (the same object for
  self-attention): slot m of row b is the row's m-th query run and the key run of the same id. overflow (b,) bool
  marks rows whose q or kv ids have more than max_segments runs, which the layout cannot hold."""
  queries = _runs(q_ids, max_segments)
  keys = queries if kv_ids is q_ids else _runs(kv_ids, max_segments)
  starts_q, lengths_q, run_ids_q, count_q = queries
  starts_k, lengths_k = (keys[0], keys[1]) if kv_ids is q_ids else _matched_keys(run_ids_q, keys)
  sequences = SequenceLayout(segments_q=jnp.stack([starts_q, lengths_q], axis=-1),
                             segments_k=jnp.stack([starts_k, lengths_k], axis=-1))
  return sequences, (count_q > max_segments) | (keys[3] > max_segments)
