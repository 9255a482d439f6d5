"""The static configuration of one attention call, shared by the reference and the kernels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Hashable static arguments of an attention call (a `nondiff_argnums` value of the custom_vjp).

  Alignment is bottom-right: query row i may attend key column j iff
  i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right, where None is unbounded on
  that side. Causal attention is window_right == 0. Bounds may be negative (jax.nn's top-left causal is
  window_right = seqlen_q - seqlen_k), which is why "unbounded" is None here rather than FlashAttention's -1.
  """

  softmax_scale: float
  window_left: int | None = None
  window_right: int | None = None
  softcap: float = 0.0
  deterministic: bool = False

  def resolved_window(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """(left, right) with "unbounded" replaced by a bound that excludes nothing, as the kernels expect.

    The left side excludes nothing once left >= seqlen_k - 1 and the right side once right >= seqlen_q - 1, so
    seqlen_k and seqlen_q are safe stand-ins for None: the kernels see plain integers, no sentinels.
    """
    left = seqlen_k if self.window_left is None else self.window_left
    right = seqlen_q if self.window_right is None else self.window_right
    return left, right
