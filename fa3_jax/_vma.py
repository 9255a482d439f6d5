"""Varying-manual-axes bookkeeping for shard_map(check_vma=True): values built from constants (zeros, scan
carries) and values combined from inputs that vary over different mesh axes must be given matching types."""

from __future__ import annotations

import jax


def varying_axes(*xs) -> frozenset:
  """The mesh axes over which any of xs varies (empty outside shard_map)."""
  return frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs))


def vary_over(x, axes: frozenset):
  """x, marked as varying over `axes` as well (a no-op for axes it already varies over)."""
  missing = tuple(sorted(axes - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def match_varying_axes(*xs):
  """xs, each varying over the union of their axes. The transpose of pcast sums cotangents over the added axes,
  so e.g. K/V replicated across a mesh axis that shards q receive their summed gradients."""
  axes = varying_axes(*xs)
  return tuple(vary_over(x, axes) for x in xs)
