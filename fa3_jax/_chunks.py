"""attention_chunk on the kernels: every chunk of every sequence runs as a sequence of its own (docs/integration.md
§4.12).

The kernels know windows, not chunks. Under attention_chunk C, the queries at positions [cC, (c+1)C) of a sequence
attend only its keys [cC, (c+1)C) (AttentionConfig: query i sits at p = i + len_k - len_q). Both are contiguous runs
of the sequence's rows, so chunk c is a sequence of a packing whose queries are the rows
[max(cC - shift, 0), min((c+1)C - shift, len_q)) (shift = len_k - len_q) and whose keys are the rows
[cC, min((c+1)C, len_k)). Bottom-right alignment inside it keeps every query-key distance, so causal, windows and
softcap apply unchanged, and the kernels visit only the key blocks of each chunk.
Queries at negative positions belong to no chunk: 0 and -inf, as the rule says.

Both sides of the result are packed (a BSHD side is its batch rows back to back, sequence b at b * seqlen). A
sequence of len_k keys has ceil(len_k / C) chunks, so B sequences over total_k key rows have at most
B + total_k // C of them, which fixes the layout's size; the slots past the last chunk are empty sequences at the
tensors' end, where the kernels' walks stop. Offsets stay nondecreasing for well-formed layouts.
"""

from __future__ import annotations

import jax.numpy as jnp

from fa3_jax._config import SequenceLayout


def _side(sequences: SequenceLayout, side: str, rows: int, batch: int):
  """(offset, length) (batch,) int32 of one side's sequences in its packed rows, the side's rows in all and its
  bound on a length. rows is a packed side's total or a BSHD side's seqlen."""
  offset, length = sequences.extents(side, rows)
  if getattr(sequences, f"packed_{side}"):
    return offset, length, rows, getattr(sequences, f"max_seqlen_{side}")
  offset = rows * jnp.arange(batch, dtype=jnp.int32)
  return offset, jnp.full((batch,), rows, jnp.int32) if length is None else length, batch * rows, rows


def chunk_layout(sequences: SequenceLayout, chunk: int, rows_q: int, rows_k: int, batch: int) -> SequenceLayout:
  """The packing of every chunk of `sequences` (not segmented; `batch` sequences) as one sequence. rows_q / rows_k:
  a packed side's total rows, or a BSHD side's seqlen (its tensors merge to batch * seqlen rows)."""
  offset_q, length_q, total_q, max_q = _side(sequences, "q", rows_q, batch)
  offset_k, length_k, total_k, max_k = _side(sequences, "k", rows_k, batch)

  chunks = (length_k + chunk - 1) // chunk
  slots = max(1, min(batch + total_k // chunk, batch * -(-max_k // chunk)))
  ends = jnp.cumsum(chunks)
  slot = jnp.arange(slots, dtype=jnp.int32)
  b = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), batch - 1).astype(jnp.int32)
  start = (slot - (ends[b] - chunks[b])) * chunk  # the chunk's first key position in its sequence
  real = slot < ends[-1]
  shift = length_k[b] - length_q[b]
  first_q = jnp.clip(start - shift, 0, length_q[b])
  end_q = jnp.clip(start + chunk - shift, 0, length_q[b])
  cu_q = jnp.where(real, offset_q[b] + first_q, total_q)
  cu_k = jnp.where(real, offset_k[b] + start, total_k)
  used_q = jnp.where(real, end_q - first_q, 0)
  used_k = jnp.where(real, jnp.clip(length_k[b] - start, 0, chunk), 0)
  close = lambda cu, total: jnp.append(cu, jnp.int32(total)).astype(jnp.int32)
  return SequenceLayout(close(cu_q, total_q), close(cu_k, total_k), used_q.astype(jnp.int32),
                        used_k.astype(jnp.int32), max_seqlen_q=min(chunk, max_q), max_seqlen_k=min(chunk, max_k))
