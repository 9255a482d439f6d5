"""How many splits the forward kernel cuts each tile's keys into (split-KV, docs/kernels.md §2.10).

Decoding runs few query rows against long caches: batch x heads x m-blocks tiles can be far fewer than the GPU's
SMs, each tile walking the whole cache alone. Splitting every tile's key blocks into num_splits chunks, each its own
tile with a float32 partial result that a combine kernel merges, fills the GPU. The choice is made at trace time
(the partials live in the op's workspace, whose size XLA must know): the fewest splits that keep the SMs at least
85 % as busy as the best split count would, with at least two key blocks per split.
"""

from __future__ import annotations

import math

import jax

# The forward tile: 128 query rows; key blocks by head dim (cuda/include/fa3/tile_size.h).
BLOCK_M = 128
MAX_SPLITS = 256  # what the kernels accept (fa3::kMaxSplits)
HEURISTIC_MAX_SPLITS = 128  # beyond this the partials cost more than the parallelism gains
DEFAULT_SMS = 132  # an H100 / H200 SXM, for lowering without a GPU


def block_n(head_dim: int, head_dim_v: int) -> int:
  if head_dim <= 128:
    return 128
  if head_dim <= 192:
    return 128 if head_dim_v <= 128 else 112
  return 80


def num_sms() -> int:
  """SMs of the first GPU JAX sees, or DEFAULT_SMS without one."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  return int(getattr(gpus[0], "core_count", DEFAULT_SMS)) if gpus else DEFAULT_SMS


def heuristic(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, head_dim_v: int,
              sms: int) -> int:
  """The split count for a forward of these sizes on `sms` SMs (1: do not split)."""
  tiles = batch * heads * math.ceil(seqlen_q / BLOCK_M)
  most = min(HEURISTIC_MAX_SPLITS, math.ceil(seqlen_k / block_n(head_dim, head_dim_v)) // 2)
  if tiles >= 0.8 * sms or most < 2:
    return 1
  efficiency = [(tiles * s / sms) / math.ceil(tiles * s / sms) for s in range(1, most + 1)]
  best = max(efficiency)
  return next(s for s, e in enumerate(efficiency, start=1) if e >= 0.85 * best)


def resolve(num_splits: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
            head_dim_v: int) -> int:
  """num_splits as FA3 takes it (0: choose, else that many; checked to be in [0, MAX_SPLITS]) as the count the
  kernel runs."""
  if num_splits == 0:
    return heuristic(batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, num_sms())
  return num_splits
