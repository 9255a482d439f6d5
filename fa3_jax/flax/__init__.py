"""Flax integration of fa3_jax (needs flax; `import fa3_jax` itself never imports it).

  fa3_jax.flax.linen: attention_fn / make_attention_fn for flax.linen.MultiHeadDotProductAttention, and
    MultiHeadAttention (linen module).
  fa3_jax.flax.nnx: the same for flax.nnx.MultiHeadAttention, and MultiHeadAttention (nnx module).

Both follow jax.nn's conventions (top-left causal, True = attend masks). The submodules import lazily, so importing
fa3_jax.flax.nnx does not import linen and vice versa.
"""

from __future__ import annotations

import importlib

from fa3_jax.flax._common import apply_rotary
from fa3_jax.flax._common import attention_fn
from fa3_jax.flax._common import make_attention_fn

__all__ = ["apply_rotary", "attention_fn", "linen", "make_attention_fn", "nnx"]


def __getattr__(name: str):
  if name in ("linen", "nnx"):
    return importlib.import_module(f"fa3_jax.flax.{name}")
  raise AttributeError(f"module 'fa3_jax.flax' has no attribute {name!r}")
