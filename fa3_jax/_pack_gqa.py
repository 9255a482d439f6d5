"""GQA packing for decoding (docs/kernels.md §2.12): the query heads that share a KV head become rows of one tile.

A decode step has one query row per head. Unpacked, the forward runs a tile per query head, and the g = heads /
kv_heads tiles of a KV head each read its whole cache and each compute a 128-row tile for one valid row. Packed,
q (b, s_q, heads, d) is presented to the kernel as (b, s_q * g, kv_heads, d), row i * g + j being query row i of the
group's head j: one tile per KV head reads the cache once, with g valid rows.

The kernel then applies one visibility rule to all rows of a tile, so packing is exact only where every query row
sees the same keys: no window on either side, or a single query row with no left window (it sits at the last key,
so causal and any right window see every key), and no attention_chunk (flash_attn_with_kvcache turns a single
row's chunk into the start of its keys first). Other calls run unpacked.
"""

from __future__ import annotations

import dataclasses

from fa3_jax._config import AttentionConfig


def exact(cfg: AttentionConfig, seqlen_q: int) -> bool:
  """Whether packing computes the same attention: every query row sees every key of its sequence."""
  return not cfg.attention_chunk and cfg.window_left is None and (cfg.window_right is None or seqlen_q == 1)


def choose(pack_gqa: bool | None, cfg: AttentionConfig, seqlen_q: int, heads: int, kv_heads: int) -> bool:
  """FA3's pack_gqa (None: pack decode-sized groups, s_q * g <= 128 rows) as the decision for this call."""
  group = heads // kv_heads
  if pack_gqa and not exact(cfg, seqlen_q):
    raise NotImplementedError("pack_gqa=True needs every query row to see the same keys: seqlen_q == 1 without a "
                              "left window, or no causal mask and no window, and attention_chunk only with "
                              "seqlen_q == 1; pass pack_gqa=None or False")
  if pack_gqa is None:
    return group > 1 and exact(cfg, seqlen_q) and seqlen_q * group <= 128
  return bool(pack_gqa) and group > 1


def unmasked(cfg: AttentionConfig) -> AttentionConfig:
  """The rule the packed rows run with (exact() guarantees it sees the same keys)."""
  return dataclasses.replace(cfg, window_left=None, window_right=None)


def pack(q, kv_heads: int):
  """(b, s_q, heads, d) -> (b, s_q * g, kv_heads, d), row i * g + j = query row i of head kv_head * g + j."""
  b, sq, h, d = q.shape
  g = h // kv_heads
  return q.reshape(b, sq, kv_heads, g, d).transpose(0, 1, 3, 2, 4).reshape(b, sq * g, kv_heads, d)


def unpack(out, lse, heads: int):
  """The packed call's out (b, s_q * g, kv_heads, d_v) and lse (b, kv_heads, s_q * g) in q's layout:
  (b, s_q, heads, d_v) and (b, heads, s_q)."""
  b, rows, hk, dv = out.shape
  g = heads // hk
  sq = rows // g
  out = out.reshape(b, sq, g, hk, dv).transpose(0, 1, 3, 2, 4).reshape(b, sq, heads, dv)
  lse = lse.reshape(b, hk, sq, g).transpose(0, 1, 3, 2).reshape(b, heads, sq)
  return out, lse
