"""Context parallelism: attention over a sequence sharded along a mesh axis (ring or all-gather-KV), with zig-zag
causal load balancing.

Every rank holds a chunk of the sequence of q, k and v (BSHD; the sequence axis is sharded). Two strategies:

- "ring": K/V travel around the ring (`ppermute` i -> i + 1) while each rank attends its resident q chunk to the
  visiting K/V chunk; partial results merge in float32 through their LSE. The backward scans the ring again with
  the final out/lse; dK/dV accumulators (float32) travel with K/V and arrive home after a full turn.
- "allgather": K/V are all-gathered (cheap for GQA/MQA, where K/V are small), each rank attends its q chunk to the
  whole sequence; dK/dV are reduce-scattered back.

Per (q chunk, kv chunk) pair the mask relation is static once the two chunks' global positions are known, but
which pair a rank sees at a step is only known at run time (lax.axis_index), so each pair runs a `lax.switch` over
the few distinct static configurations: skip (fully masked), full, or a window relative to the pair's offset
(docs/integration.md §6.1). The kernels therefore receive only compile-time integer windows; nothing per device is an
attribute.

Layouts: "contiguous" (rank r holds chunk r of n) or "zigzag" (the sequence cut into 2n chunks, rank r holds chunks
r and 2n-1-r, so every rank does the same causal work). `zigzag_reorder` / `zigzag_restore` convert a global array
between natural and zig-zag order (do it once at model input, e.g. on token ids and positions).

Semantics are those of `flash_attn_func` on the global (unsharded, natural-order) sequence: bottom-right aligned
causal/windows over the global lengths n * local_seqlen.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from fa3_jax import _ops
from fa3_jax import _validate
from fa3_jax import _vma
from fa3_jax._config import AttentionConfig
from fa3_jax._config import diagonal
from fa3_jax._config import key_bounds

LAYOUTS = ("contiguous", "zigzag")
STRATEGIES = ("ring", "allgather")


# ---- zig-zag order ---------------------------------------------------------------------------------------------

def _zigzag_chunk_order(num_shards: int) -> np.ndarray:
  """Natural chunk index at each zig-zag position: [0, 2n-1, 1, 2n-2, ...]."""
  n = num_shards
  return np.array([c for r in range(n) for c in (r, 2 * n - 1 - r)])


def _permute_chunks(x, num_shards, axis, inverse: bool):
  """x with the 2 * num_shards chunks of `axis` in zig-zag order (or back to natural order if `inverse`)."""
  _validate.check_is_array("x", x)
  order = _zigzag_chunk_order(_validate.check_int("num_shards", num_shards, 1))
  axis = _validate.check_axis("axis", axis, x.ndim)
  size = x.shape[axis]
  chunks = len(order)
  if size % chunks:
    raise ValueError(f"x.shape[{axis}] (the sequence axis) must be divisible by 2 * num_shards = {chunks}, got "
                     f"{size}")
  shape = x.shape[:axis] + (chunks, size // chunks) + x.shape[axis + 1:]
  order = np.argsort(order) if inverse else order
  return jnp.take(x.reshape(shape), jnp.asarray(order), axis=axis).reshape(x.shape)


def zigzag_reorder(x, num_shards: int, axis: int = 1):
  """Natural -> zig-zag order along `axis` (cut into 2 * num_shards chunks; shard r gets chunks r and 2n-1-r).

  x is a jax or NumPy array of any shape whose `axis` (an int, negative counting from the end) has a length
  divisible by 2 * num_shards (an int >= 1); returns x's shape and dtype. Apply it to the global q, k, v (or better,
  once, to token ids and positions) before sharding the sequence over `num_shards` devices, and pass
  layout="zigzag" to `context_parallel_attention`.
  """
  return _permute_chunks(x, num_shards, axis, inverse=False)


def zigzag_restore(x, num_shards: int, axis: int = 1):
  """Zig-zag -> natural order along `axis`: the inverse of `zigzag_reorder`, with the same arguments."""
  return _permute_chunks(x, num_shards, axis, inverse=True)


# ---- static per-pair configurations ----------------------------------------------------------------------------

def _pair_config(cfg: AttentionConfig, q_start: int, q_len: int, k_start: int, k_len: int, seqlen_q: int,
                 seqlen_k: int):
  """The static config of q rows [q_start, +q_len) against keys [k_start, +k_len) of the global problem, in the
  pair's own bottom-right alignment; "skip" if no pair is visible."""
  lo_row, hi_row = q_start, q_start + q_len - 1
  lo_col, hi_col = k_start, k_start + k_len - 1
  # The keys of the pair's first and last rows; both bounds move one key per row.
  lo_first, lo_last = key_bounds(lo_row, seqlen_q, seqlen_k, cfg)
  hi_first, _ = key_bounds(hi_row, seqlen_q, seqlen_k, cfg)
  if lo_first > lo_last:  # an empty window: no row sees any key
    return "skip"
  # The rows whose keys reach into [lo_col, hi_col]: from where the last key reaches lo_col, up to where the first
  # key is still at most hi_col.
  first = max(lo_row, lo_row + lo_col - lo_last)
  last = min(hi_row, hi_row + hi_col - hi_first)
  if first > last:
    return "skip"
  fully_left = hi_first <= lo_col
  fully_right = lo_last >= hi_col
  if fully_left and fully_right:
    return dataclasses.replace(cfg, window_left=None, window_right=None)
  # The global diagonal minus the pair's own (its chunks as one sequence of q_len queries and k_len keys).
  shift = diagonal(q_start, seqlen_q, seqlen_k) - (k_start + diagonal(0, q_len, k_len))
  return dataclasses.replace(cfg, window_left=None if fully_left else cfg.window_left - shift,
                             window_right=None if fully_right else cfg.window_right + shift)


def _switch_table(cfg, q_starts, q_len, k_starts, k_len, seqlen_q, seqlen_k):
  """(branch configs, int32 table[q chunk, k chunk] -> branch): the distinct static configs of all chunk pairs."""
  branches, table = [], np.zeros((len(q_starts), len(k_starts)), np.int32)
  for i, qs in enumerate(q_starts):
    for j, ks in enumerate(k_starts):
      c = _pair_config(cfg, qs, q_len, ks, k_len, seqlen_q, seqlen_k)
      if c not in branches:
        branches.append(c)
      table[i, j] = branches.index(c)
  return branches, table


def _select(branches, table, row, col, fns):
  """lax.switch over the branch functions, or a direct call when every pair has the same config."""
  if len(branches) == 1:
    return lambda *args: fns[0](*args)
  index = jnp.asarray(table)[row, col] if col is not None else jnp.asarray(table)[row, 0]
  return lambda *args: jax.lax.switch(index, fns, *args)


# ---- ring geometry -----------------------------------------------------------------------------------------------

def _axis_size(axis_name) -> int:
  return int(jax.lax.axis_size(axis_name))


def _chunk_ids(rank, n: int, layout: str):
  """Global chunk index of each local sub-chunk of `rank` (traced)."""
  return [rank] if layout == "contiguous" else [rank, 2 * n - 1 - rank]


def _split(x, m: int, axis: int = 1):
  return [x] if m == 1 else jnp.split(x, m, axis=axis)


def _check_local_lengths(q, k, m: int):
  for name, x in (("q", q), ("k", k)):
    if x.shape[1] % m:
      raise ValueError(f"with layout='zigzag' the local seqlen of {name} must be even, got {x.shape[1]}")


def _geometry(q, k, n: int, layout: str):
  m = 1 if layout == "contiguous" else 2
  _check_local_lengths(q, k, m)
  cq, ck = q.shape[1] // m, k.shape[1] // m
  chunks = n * m
  return m, cq, ck, chunks, [i * cq for i in range(chunks)], [j * ck for j in range(chunks)]


def _merge(o, lse, o_i, lse_i):
  """Merge a partial (out, lse) into float32 accumulators; empty rows carry lse = -inf (kernels may say +inf)."""
  lse_i = jnp.where(lse_i == jnp.inf, -jnp.inf, lse_i)
  new = jnp.logaddexp(lse, lse_i)
  ref = jnp.where(jnp.isfinite(new), new, 0.0)
  w_old = jnp.swapaxes(jnp.exp(lse - ref), 1, 2)[..., None]
  w_new = jnp.swapaxes(jnp.exp(lse_i - ref), 1, 2)[..., None]
  return o * w_old + o_i.astype(jnp.float32) * w_new, new


def _send(xs, axis_name, n: int):
  """ppermute i -> i + 1, each array bitcast to uint16 first so that one combined collective carries one dtype."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  out = []
  for x in xs:
    u = jax.lax.bitcast_convert_type(x, jnp.uint16)
    out.append(jax.lax.bitcast_convert_type(jax.lax.ppermute(u, axis_name, perm), x.dtype))
  return out


def _no_visible_keys(q, v, axes):
  """(out, lse) of q rows that see no key: zeros and -inf, varying over `axes`."""
  b, s, h, _ = q.shape
  out = jnp.zeros((b, s, h, v.shape[-1]), q.dtype)
  lse = jnp.full((b, h, s), -jnp.inf, jnp.float32)
  return _vma.vary_over(out, axes), _vma.vary_over(lse, axes)


def _fwd_branches(branches, axes):
  def make(c):
    def fn(q, k, v):
      if c == "skip":
        return _no_visible_keys(q, v, axes)
      out, lse = _ops.attention_fwd(q, k, v, c)
      return _vma.vary_over(out, axes), _vma.vary_over(lse, axes)
    return fn
  return [make(c) for c in branches]


def _bwd_branches(branches, axes, with_dlse: bool):
  def make(c):
    def fn(dout, q, k, v, out, lse, dlse):
      if c == "skip":
        grads = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v))
      else:
        grads = _ops.attention_bwd(dout, q, k, v, out, lse, c, dlse=dlse if with_dlse else None)
      return tuple(_vma.vary_over(g, axes) for g in grads)
    return fn
  return [make(c) for c in branches]


def _init_accumulators(q_parts, v, axes):
  b, _, h, _ = q_parts[0].shape
  o = [jnp.zeros((b, x.shape[1], h, v.shape[-1]), jnp.float32) for x in q_parts]
  lse = [jnp.full((b, h, x.shape[1]), -jnp.inf, jnp.float32) for x in q_parts]
  return [_vma.vary_over(x, axes) for x in o], [_vma.vary_over(x, axes) for x in lse]


# ---- ring ------------------------------------------------------------------------------------------------------

def ring_forward(q, k, v, cfg: AttentionConfig, axis_name, layout: str = "contiguous"):
  """Local (out, lse) of the ring forward; call inside shard_map / a partitioned region over `axis_name`."""
  n = _axis_size(axis_name)
  m, cq, ck, chunks, q_starts, k_starts = _geometry(q, k, n, layout)
  branches, table = _switch_table(cfg, q_starts, cq, k_starts, ck, n * q.shape[1], n * k.shape[1])
  axes = _vma.varying_axes(q, k, v)
  fns = _fwd_branches(branches, axes)
  rank = jax.lax.axis_index(axis_name)
  q_ids = _chunk_ids(rank, n, layout)
  q_parts = _split(q, m)

  def compute(o, lse, k, v, step):
    src = (rank - step) % n
    for a, (qa, qid) in enumerate(zip(q_parts, q_ids)):
      for c, (kc, vc, kid) in enumerate(zip(_split(k, m), _split(v, m), _chunk_ids(src, n, layout))):
        o_i, lse_i = _select(branches, table, qid, kid, fns)(qa, kc, vc)
        o[a], lse[a] = _merge(o[a], lse[a], o_i, lse_i)
    return o, lse

  def body(carry, step):
    o, lse, k, v = carry
    k_next, v_next = _send((k, v), axis_name, n)  # issued before the compute it overlaps with
    o, lse = compute(list(o), list(lse), k, v, step)
    return (o, lse, k_next, v_next), None

  o, lse = _init_accumulators(q_parts, v, axes)
  (o, lse, k, v), _ = jax.lax.scan(body, (o, lse, k, v), jnp.arange(n - 1))
  o, lse = compute(list(o), list(lse), k, v, n - 1)
  out = jnp.concatenate(o, axis=1) if m > 1 else o[0]
  return out.astype(q.dtype), jnp.concatenate(lse, axis=2) if m > 1 else lse[0]


def ring_backward(dout, q, k, v, out, lse, cfg: AttentionConfig, axis_name, layout: str = "contiguous",
                  dlse=None):
  """Local (dq, dk, dv) of the ring backward, given the final (merged) out and lse of the forward."""
  n = _axis_size(axis_name)
  m, cq, ck, chunks, q_starts, k_starts = _geometry(q, k, n, layout)
  branches, table = _switch_table(cfg, q_starts, cq, k_starts, ck, n * q.shape[1], n * k.shape[1])
  axes = _vma.varying_axes(dout, q, k, v, out, lse, *(() if dlse is None else (dlse,)))
  fns = _bwd_branches(branches, axes, dlse is not None)
  rank = jax.lax.axis_index(axis_name)
  q_ids = _chunk_ids(rank, n, layout)
  q_parts, do_parts, out_parts = _split(q, m), _split(dout, m), _split(out, m)
  lse_parts = _split(lse, m, axis=2)
  dlse_parts = _split(dlse, m, axis=2) if dlse is not None else [jnp.zeros((), jnp.float32)] * m

  def compute(dq, dk, dv, k, v, step):
    src = (rank - step) % n
    dk_parts, dv_parts = list(_split(dk, m)), list(_split(dv, m))
    for a, qid in enumerate(q_ids):
      for c, (kc, vc, kid) in enumerate(zip(_split(k, m), _split(v, m), _chunk_ids(src, n, layout))):
        g = _select(branches, table, qid, kid, fns)(do_parts[a], q_parts[a], kc, vc, out_parts[a], lse_parts[a],
                                                     dlse_parts[a])
        dq[a] = dq[a] + g[0].astype(jnp.float32)
        dk_parts[c] = dk_parts[c] + g[1].astype(jnp.float32)
        dv_parts[c] = dv_parts[c] + g[2].astype(jnp.float32)
    cat = lambda xs: jnp.concatenate(xs, axis=1) if m > 1 else xs[0]
    return dq, cat(dk_parts), cat(dv_parts)

  def body(carry, step):
    dq, dk, dv, k, v = carry
    k_next, v_next = _send((k, v), axis_name, n)
    dq, dk, dv = compute(list(dq), dk, dv, k, v, step)
    dk, dv = _send((dk, dv), axis_name, n)  # the accumulators follow their K/V block
    return (dq, dk, dv, k_next, v_next), None

  zeros = lambda x: _vma.vary_over(jnp.zeros(x.shape, jnp.float32), axes)
  init = ([zeros(x) for x in q_parts], zeros(k), zeros(v), k, v)
  (dq, dk, dv, k, v), _ = jax.lax.scan(body, init, jnp.arange(n - 1))
  dq, dk, dv = compute(list(dq), dk, dv, k, v, n - 1)
  dk, dv = _send((dk, dv), axis_name, n)  # the n-th hop brings dK/dV home
  dq = jnp.concatenate(dq, axis=1) if m > 1 else dq[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---- all-gather KV -------------------------------------------------------------------------------------------

def _gather_kv(x, axis_name, n: int, layout: str):
  """The whole sequence of x in natural order."""
  full = jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  return full if layout == "contiguous" else zigzag_restore(full, n)


def allgather_forward(q, k, v, cfg: AttentionConfig, axis_name, layout: str = "contiguous"):
  """Local (out, lse): K/V all-gathered over `axis_name`, the local q chunk(s) attend the whole sequence."""
  n = _axis_size(axis_name)
  m, cq, _, chunks, q_starts, _ = _geometry(q, k, n, layout)
  seqlen_k = n * k.shape[1]
  branches, table = _switch_table(cfg, q_starts, cq, [0], seqlen_k, n * q.shape[1], seqlen_k)
  kf, vf = _gather_kv(k, axis_name, n, layout), _gather_kv(v, axis_name, n, layout)
  axes = _vma.varying_axes(q, kf, vf)
  fns = _fwd_branches(branches, axes)
  rank = jax.lax.axis_index(axis_name)
  results = [_select(branches, table, qid, None, fns)(qa, kf, vf)
             for qa, qid in zip(_split(q, m), _chunk_ids(rank, n, layout))]
  if m == 1:
    return results[0]
  return jnp.concatenate([r[0] for r in results], axis=1), jnp.concatenate([r[1] for r in results], axis=2)


def allgather_backward(dout, q, k, v, out, lse, cfg: AttentionConfig, axis_name, layout: str = "contiguous",
                       dlse=None):
  """Local (dq, dk, dv) of the all-gather strategy: K/V gathered again, dK/dV reduce-scattered in float32."""
  n = _axis_size(axis_name)
  m, cq, _, chunks, q_starts, _ = _geometry(q, k, n, layout)
  seqlen_k = n * k.shape[1]
  branches, table = _switch_table(cfg, q_starts, cq, [0], seqlen_k, n * q.shape[1], seqlen_k)
  kf, vf = _gather_kv(k, axis_name, n, layout), _gather_kv(v, axis_name, n, layout)
  axes = _vma.varying_axes(dout, q, kf, vf, out, lse, *(() if dlse is None else (dlse,)))
  fns = _bwd_branches(branches, axes, dlse is not None)
  rank = jax.lax.axis_index(axis_name)
  dlse_parts = _split(dlse, m, axis=2) if dlse is not None else [jnp.zeros((), jnp.float32)] * m
  dq, dk, dv = [], 0.0, 0.0
  for a, qid in enumerate(_chunk_ids(rank, n, layout)):
    g = _select(branches, table, qid, None, fns)(_split(dout, m)[a], _split(q, m)[a], kf, vf, _split(out, m)[a],
                                                 _split(lse, m, axis=2)[a], dlse_parts[a])
    dq.append(g[0])
    dk = dk + g[1].astype(jnp.float32)
    dv = dv + g[2].astype(jnp.float32)
  if layout == "zigzag":
    dk, dv = zigzag_reorder(dk, n), zigzag_reorder(dv, n)
  dk = jax.lax.psum_scatter(dk, axis_name, scatter_dimension=1, tiled=True)
  dv = jax.lax.psum_scatter(dv, axis_name, scatter_dimension=1, tiled=True)
  dq = jnp.concatenate(dq, axis=1) if m > 1 else dq[0]
  return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def sequence_parallel_forward(q, k, v, cfg, axis_name, layout="contiguous", strategy="ring"):
  """(out, lse) of the local shards with the sequence sharded over `axis_name` (no custom_vjp: raw direction)."""
  fn = ring_forward if strategy == "ring" else allgather_forward
  return fn(q, k, v, cfg, axis_name, layout)


def sequence_parallel_backward(dout, q, k, v, out, lse, cfg, axis_name, layout="contiguous", strategy="ring",
                               dlse=None):
  """(dq, dk, dv) of the local shards; dlse (the lse cotangent) is optional."""
  fn = ring_backward if strategy == "ring" else allgather_backward
  return fn(dout, q, k, v, out, lse, cfg, axis_name, layout, dlse=dlse)


# ---- public, differentiable ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
  cfg: AttentionConfig
  axis_name: object
  layout: str
  strategy: str


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cp_attention(plan: _Plan, q, k, v):
  return sequence_parallel_forward(q, k, v, plan.cfg, plan.axis_name, plan.layout, plan.strategy)


def _cp_fwd(plan, q, k, v):
  q, k, v = q.value, k.value, v.value  # symbolic_zeros=True wraps primals
  # Differentiating a gradient differentiates both this forward and the backward below: both refuse clearly.
  fwd = lambda q, k, v: sequence_parallel_forward(q, k, v, plan.cfg, plan.axis_name, plan.layout, plan.strategy)
  out, lse = _validate.first_order_only(fwd)(q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _cp_bwd(plan, residuals, cotangents):
  q, k, v, out, lse = residuals
  dout, dlse = cotangents
  dout = jnp.zeros_like(out) if isinstance(dout, SymbolicZero) else dout.astype(out.dtype)
  # The lse cotangent is only non-zero when lse is returned and used; it then runs the reference backward per pair.
  dlse = None if isinstance(dlse, SymbolicZero) else dlse

  def bwd(dout, q, k, v, out, lse, dlse):
    return sequence_parallel_backward(dout, q, k, v, out, lse, plan.cfg, plan.axis_name, plan.layout, plan.strategy,
                                      dlse=dlse)

  return _validate.first_order_only(bwd)(dout, q, k, v, out, lse, dlse)


_cp_attention.defvjp(_cp_fwd, _cp_bwd, symbolic_zeros=True)


def context_parallel_attention(q, k, v, axis_name, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, deterministic=False, layout="contiguous", strategy="ring",
                               return_lse=False):
  """Attention over a sequence sharded along mesh axis `axis_name`, called inside `jax.shard_map`.

  Args:
    q: local shard (batch, seqlen_q / n, heads, head_dim) float16 | bfloat16, the sequence sharded over
      `axis_name` (n devices) in `layout` order.
    k, v: local shards (batch, seqlen_k / n, kv_heads, head_dim[_v]); heads % kv_heads == 0 (GQA/MQA).
    axis_name: the mesh axis (a str, or a tuple of distinct ones) the sequence is sharded over; it must be an axis
      of the enclosing `jax.shard_map` (ValueError otherwise, TypeError for a non-str). The global sequence lengths
      (n times the local ones) are at most MAX_SEQLEN = 2**29.
    softmax_scale, causal, window_size, softcap, deterministic, return_lse: as `flash_attn_func`, applied to the
      global sequence (bottom-right aligned over the global lengths).
    layout: "contiguous" (shard r holds chunk r) or "zigzag" (shard r holds chunks r and 2n-1-r of 2n; see
      `zigzag_reorder`): balances causal work across ranks.
    strategy: "ring" (K/V rotate, O(local) memory) or "allgather" (K/V all-gathered; best when K/V are small,
      e.g. GQA/MQA with few kv heads).

  Returns:
    The local shard of out (batch, seqlen_q / n, heads, head_dim_v), and with return_lse=True also lse
    (batch, heads, seqlen_q / n) float32. Differentiable in q, k, v (dK/dV travel back around the ring); second-order
    derivatives raise NotImplementedError. Empty shards (batch, seqlen or heads 0) give empty / zero results.
  """
  _validate.check_qkv(q, k, v)
  cfg = _validate.attention_config(q.shape[-1], softmax_scale, causal, window_size, softcap, deterministic)
  layout = _validate.check_choice("layout", layout, LAYOUTS)
  strategy = _validate.check_choice("strategy", strategy, STRATEGIES)
  return_lse = _validate.check_bool("return_lse", return_lse)
  axes, n = _validate.check_axis_name(axis_name)
  _validate.check_seqlen(f"the global seqlen_q ({n} shards x {q.shape[1]})", n * q.shape[1])
  _validate.check_seqlen(f"the global seqlen_k ({n} shards x {k.shape[1]})", n * k.shape[1])
  # Inside shard_map the sequence shards vary over the ring axes; K/V must vary like q (docs/integration.md §4.7).
  q, k, v = _vma.match_varying_axes(q, k, v)
  if 0 in q.shape[:3] or k.shape[1] == 0:  # nothing to compute; the ops require non-empty operands
    out, lse = _no_visible_keys(q, v, _vma.varying_axes(q))
  else:
    plan = _Plan(cfg, axes[0] if len(axes) == 1 else axes, layout, strategy)
    out, lse = _cp_attention(plan, q, k, v)
  return (out, lse) if return_lse else out
