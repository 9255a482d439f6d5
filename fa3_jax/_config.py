"""The static configuration of one attention call, shared by the reference and the kernels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Hashable static arguments of an attention call (a `nondiff_argnums` value of the custom_vjp).

  window_left / window_right use FlashAttention's convention: -1 is unbounded on that side; causal attention is
  window_right == 0. Alignment is bottom-right: query row i may attend key column j iff
  i + seqlen_k - seqlen_q - window_left <= j <= i + seqlen_k - seqlen_q + window_right.
  """

  softmax_scale: float
  window_left: int = -1
  window_right: int = -1
  softcap: float = 0.0
  deterministic: bool = False

  def resolved_window(self, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """(left, right) with "unbounded" replaced by a bound that excludes nothing, as the kernels expect.

    The left side excludes nothing once left >= seqlen_k - 1 and the right side once right >= seqlen_q - 1, so
    seqlen_k and seqlen_q are safe stand-ins for -1: the kernels see plain integers, no sentinels.
    """
    left = seqlen_k if self.window_left < 0 else self.window_left
    right = seqlen_q if self.window_right < 0 else self.window_right
    return left, right
