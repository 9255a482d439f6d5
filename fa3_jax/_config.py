"""The configuration of one attention call, shared by the reference and the kernels: the static rule
(AttentionConfig, with the one visibility rule of every Python path, `visible`) and where each sequence's rows are
(SequenceLayout)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Hashable static arguments of an attention call (a `nondiff_argnums` value of the custom_vjp).

  Alignment is bottom-right: query row i may attend key column j iff
  i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right, where None is unbounded on
  that side. Causal attention is window_right == 0. Bounds may be negative (jax.nn's top-left causal is
  window_right = seqlen_q - seqlen_k), which is why "unbounded" is None here rather than FlashAttention's -1.

  attention_chunk C > 0 (Llama 4's local attention) further limits query row i to the keys of its chunk: with the
  row at position p = i + seqlen_k - seqlen_q, key j is visible only if p // C == j // C (floor division, so rows
  at negative positions see no key). The kernels have no chunk rule of their own: they run each chunk as a
  sequence of a packing (fa3_jax/_chunks.py).
  """

  softmax_scale: float
  window_left: int | None = None
  window_right: int | None = None
  softcap: float = 0.0
  deterministic: bool = False
  # The forward kernel's split-KV count (fa3_jax/_split_kv.py): how the work is cut, not what is computed. Calls with
  # packed or seqused queries run unsplit.
  num_splits: int = 1
  attention_chunk: int = 0  # 0: no chunks

  def resolved_window(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """(left, right) with "unbounded" replaced by a bound that excludes nothing, as the kernels expect.

    The left side excludes nothing once left >= seqlen_k - 1 and the right side once right >= seqlen_q - 1, so
    seqlen_k and seqlen_q are safe stand-ins for None: the kernels see plain integers, no sentinels. Upper bounds of
    the lengths serve as well (a variable-length call resolves with its max_seqlen_q / max_seqlen_k).
    """
    left = seqlen_k if self.window_left is None else self.window_left
    right = seqlen_q if self.window_right is None else self.window_right
    return left, right


# ---- the visibility rule -----------------------------------------------------------------------------------------
# Arguments are Python ints or broadcastable integer arrays; lengths may be per batch (e.g. shaped (b, 1, 1, 1)).

def diagonal(row, seqlen_q, seqlen_k):
  """The key on query `row`'s diagonal: alignment is bottom-right, the last query meets the last key."""
  return row + seqlen_k - seqlen_q


def key_bounds(row, seqlen_q, seqlen_k, cfg: AttentionConfig):
  """(first, last): query `row` of a sequence of seqlen_q queries and seqlen_k keys may attend the keys
  first <= col <= last, before clipping to the keys that exist (unbounded sides lie past every key)."""
  left, right = cfg.resolved_window(seqlen_q, seqlen_k)
  d = diagonal(row, seqlen_q, seqlen_k)
  return d - left, d + right


def visible(row, col, seqlen_q, seqlen_k, cfg: AttentionConfig):
  """Whether query `row` may attend key `col` (both >= 0) of a sequence of seqlen_q queries and seqlen_k keys. Rows
  and keys at or past their sequence's length see and are seen by nothing."""
  first, last = key_bounds(row, seqlen_q, seqlen_k, cfg)
  seen = (row < seqlen_q) & (col < seqlen_k) & (col >= first) & (col <= last)
  if cfg.attention_chunk:
    seen = seen & (diagonal(row, seqlen_q, seqlen_k) // cfg.attention_chunk == col // cfg.attention_chunk)
  return seen


# ---- where the sequences are -------------------------------------------------------------------------------------

SEQUENCE_ARRAYS = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """Where each sequence of a call lies in q's and k's rows (docs/integration.md §4.8). A pytree: the int32 arrays
  are its leaves, the bounds static. The default, no arrays, is a plain BSHD call ("uniform").

  A side (q or k) with cu_seqlens (batch + 1,) is packed: its tensors are (total, heads, dim), and sequence b owns
  rows [offset(b), offset(b) + length(b)) with offset(b) = cu[b] clipped to [0, total]. Without, the side is BSHD
  (batch, seqlen, heads, dim) and sequence b is batch entry b from row 0. length(b) is seqused[b] if given, else
  cu[b + 1] - cu[b] (packed) or seqlen (BSHD), clipped to [0, max_seqlen] and to the rows from offset(b) on, where
  max_seqlen is a packed side's static bound and a BSHD side's seqlen. No value of the arrays reaches outside the
  tensors; well-formed ones (cu nondecreasing from 0, cu[-1] <= total, seqused <= the allotment) do as documented.

  A segmented layout (segment_ids_q (batch, seqlen_q) int32 and, unless they are the same ids, segment_ids_k
  (batch, seqlen_k); nothing else) keeps both sides BSHD: each batch row holds runs of one non-negative id
  (segments), and a segment's queries attend the key run of the same id in the same row (docs/integration.md §4.9).
  max_segments, static, bounds the runs of any row. The shard-local ops run it as the packing of the batch's rows
  back to back (`fa3_jax._segments.packing`), so batch and heads shard like a dense call's.

  A paged layout (page_table (batch, pages_per_seq) int32, with q BSHD and optionally seqused_k; nothing else) keeps
  the keys in pages shared by all sequences: k and v are (num_pages, page_size, kv_heads, dim) and sequence b's key
  j is row j % page_size of page page_table[b, j // page_size] (`unpaged` writes that rule once), so its keys are
  pages_per_seq * page_size long at most. Table entries outside [0, num_pages) read some page, never outside k.
  Forward only (KV caches, docs/integration.md §4.8).
  """

  cu_seqlens_q: jax.Array | None = None
  cu_seqlens_k: jax.Array | None = None
  seqused_q: jax.Array | None = None
  seqused_k: jax.Array | None = None
  # Segmented: both sides BSHD, each batch row holding several sequences (segments). segment_ids_k None: the ids
  # of q serve both sides (self-attention).
  segment_ids_q: jax.Array | None = None
  segment_ids_k: jax.Array | None = None
  page_table: jax.Array | None = None  # paged keys
  max_seqlen_q: int | None = dataclasses.field(default=None, metadata=dict(static=True))  # packed q only
  max_seqlen_k: int | None = dataclasses.field(default=None, metadata=dict(static=True))  # packed k only
  max_segments: int | None = dataclasses.field(default=None, metadata=dict(static=True))  # segmented only

  @property
  def packed_q(self) -> bool:
    return self.cu_seqlens_q is not None

  @property
  def packed_k(self) -> bool:
    return self.cu_seqlens_k is not None

  @property
  def segmented(self) -> bool:
    return self.segment_ids_q is not None

  @property
  def paged(self) -> bool:
    return self.page_table is not None

  @property
  def uniform(self) -> bool:
    """Every sequence is its batch entry's whole seqlen (BSHD on both sides, no seqused, no segments, no pages)."""
    return all(getattr(self, name) is None for name in SEQUENCE_ARRAYS) and not (self.segmented or self.paged)

  @property
  def batch_aligned(self) -> bool:
    """Sequence b lies in batch entry b on both sides (no side packed, keys not in shared pages): uniform,
    seqused-only or segmented layouts, which shard over the batch like a dense call."""
    return not (self.packed_q or self.packed_k or self.paged)

  def key_rows(self, k) -> int:
    """Rows per sequence of the k side as `extents` counts them: a packed side's total, a paged side's pages per
    sequence times page_size, a BSHD side's seqlen (leading vmapped axes of k allowed)."""
    return k.shape[-3] * (self.page_table.shape[-1] if self.paged else 1)

  def unpaged(self, k, v):
    """(k, v, layout) with the paged keys gathered into BSHD (batch, pages_per_seq * page_size, kv_heads, dim) and
    the table dropped: the paging rule, written once. Other layouts come back unchanged."""
    if not self.paged:
      return k, v, self
    table = self.page_table

    def gather(x):  # (num_pages, page_size, ...) -> (batch, pages_per_seq * page_size, ...)
      pages = jnp.take(x, table, axis=0, mode="clip")
      return pages.reshape(table.shape[0], -1, *x.shape[2:])

    return gather(k), gather(v), dataclasses.replace(self, page_table=None)

  def arrays(self) -> dict:
    """The arrays by name (absent ones None), in the kernels' operand order."""
    return {name: getattr(self, name) for name in SEQUENCE_ARRAYS}

  def extents(self, side: str, rows: int):
    """(offset, length) of side "q" or "k"'s sequences as int32 arrays (..., batch), leading (vmapped) axes kept.
    rows is the side's row count: in all when packed, per batch entry (seqlen) when BSHD. A BSHD side's offset is
    None (every sequence starts at row 0), and so is its length when it has no seqused (every row takes part)."""
    cu, used = getattr(self, f"cu_seqlens_{side}"), getattr(self, f"seqused_{side}")
    if cu is None:
      return None, None if used is None else jnp.clip(used, 0, rows)
    offset = jnp.clip(cu[..., :-1], 0, rows)
    length = cu[..., 1:] - cu[..., :-1] if used is None else used
    return offset, jnp.clip(length, 0, jnp.minimum(getattr(self, f"max_seqlen_{side}"), rows - offset))
