"""One function per kernel direction: the XLA FFI call, its vmap folding, and the platform dispatch
(CUDA kernel where it was built and covers the inputs, else the pure-JAX reference).

The contract with cuda/ffi/ (written once, here and in the handlers' comments):

  "fa3_jax_fwd"  operands q (b, s_q, h, d), k (b, s_k, h_k, d), v (b, s_k, h_k, d_v)        [bf16|f16, BSHD]
                 optional cu_seqlens_q, cu_seqlens_k (b + 1,) int32, seqused_q, seqused_k (b,) int32
                 results  out (b, s_q, h, d_v) q.dtype, lse (b, h, s_q) f32, workspace (n,) u8
                 attrs    softmax_scale f32, softcap f32 (0 = off), window_left i64, window_right i64,
                          max_seqlen_q i64, max_seqlen_k i64, num_splits i64 (split-KV; > 1 only for BSHD q
                          without seqused_q)
  "fa3_jax_bwd"  operands dout (b, s_q, h, d_v), q, k, v, out (b, s_q, h, d_v), lse (b, h, s_q) f32
                 optional dlse (like lse) f32, the cotangent of lse; then the sequence layout as fwd
                 results  dq, dk, dv (shapes and dtypes of q, k, v), workspace (n,) u8
                 attrs    as fwd, plus deterministic bool

  Sequence layout (cuda/ffi/problem.h, docs/kernels.md §10): cu_seqlens_q makes q packed, (total_q, h, d), with out
  and dq alike and lse (h, total_q); cu_seqlens_k makes k and v packed; seqused_* limit the rows each sequence uses
  in either form. max_seqlen_* bound a packed side's lengths and equal a BSHD side's seqlen.
  Each op's operand list is one `FfiOp` table below. Optional operands follow the required ones in table order, and
  each is present iff the bool attribute `with_<name>` is true (cuda/ffi/optional_operands.h decodes the same rule).

  "fa3_jax_segment_layout"  operands segment_ids (b, s) int32
                 results  cu_seqlens (b * m + 1), seqused (b * m) int32, workspace uint8 (its size from the
                          extension, like the attention ops')
                 attrs    max_segments i64 (m): shared segment ids as the packing of _segments.packing, bit for bit

  Windows arrive resolved (AttentionConfig.resolved_window): query i may attend key j iff
  i + s_k - s_q - window_left <= j <= i + s_k - s_q + window_right, with no -1 sentinels. The workspace size n
  comes from the extension (`{fwd,bwd}_workspace_bytes`); XLA owns the buffer and Python drops it.
  Python guarantees: b, s_q, s_k, h >= 1; (d, d_v) is a compiled pair (other head dims are zero-padded here).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fa3_jax import _chunks
from fa3_jax import _extension
from fa3_jax import _segments
from fa3_jax import reference
from fa3_jax._config import SEQUENCE_ARRAYS
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout


@dataclasses.dataclass(frozen=True)
class FfiOp:
  """An FFI target's operand and result names, in the order its handler decodes them (written once, here)."""
  target: str
  operands: tuple[str, ...]
  results: tuple[str, ...]
  optional: tuple[str, ...] = ()  # after `operands`, each present iff attribute with_<name> is true

  def __call__(self, result_types, operands: dict, **attributes) -> dict:
    """ffi_call with `operands` by name (optional ones absent or None); returns the results by name."""
    unknown = set(operands) - set(self.operands) - set(self.optional)
    if unknown or not set(self.operands) <= set(operands):
      raise TypeError(f"{self.target} takes operands {self.operands} + optional {self.optional}, "
                      f"got {sorted(operands)}")
    present = [n for n in self.optional if operands.get(n) is not None]
    flags = {f"with_{n}": n in present for n in self.optional}
    call = jax.ffi.ffi_call(self.target, result_types)
    results = call(*(operands[n] for n in (*self.operands, *present)), **attributes, **flags)
    return dict(zip(self.results, results))

  @property
  def outputs(self) -> tuple[str, ...]:
    """The results the caller sees (all but the scratch workspace)."""
    return tuple(n for n in self.results if n != "workspace")


FWD = FfiOp("fa3_jax_fwd", operands=("q", "k", "v"), results=("out", "lse", "workspace"), optional=SEQUENCE_ARRAYS)
BWD = FfiOp("fa3_jax_bwd", operands=("dout", "q", "k", "v", "out", "lse"),
            results=("dq", "dk", "dv", "workspace"), optional=("dlse", *SEQUENCE_ARRAYS))
# Called inside the attention ops, so a vmap reaches it folded into more batch rows (fold_sequences).
SEGMENT_LAYOUT = FfiOp("fa3_jax_segment_layout", operands=("segment_ids",),
                       results=("cu_seqlens", "seqused", "workspace"))

# What each tensor the tables name is shaped like: q-like or k-like rows with head dim d ("d") or d_v ("e"), or a
# row statistic of the queries ("lse"). The sharding layer derives its Shardy rules and partition specs from this and
# the tables (fa3_jax/sharding.py), so an operand's position is written only in its table.
TENSOR_KINDS = {"q": ("q", "d"), "dq": ("q", "d"), "out": ("q", "e"), "dout": ("q", "e"), "k": ("kv", "d"),
                "dk": ("kv", "d"), "v": ("kv", "e"), "dv": ("kv", "e"), "lse": ("lse",), "dlse": ("lse",)}


# ---- which kernels exist ---------------------------------------------------------------------------------------

def kernel_head_dims(direction: str, dtype, head_dim: int, head_dim_v: int) -> tuple[int, int] | None:
  """The compiled (d, d_v) that serves these head dims (the smallest that fits, zero-padding d), or None."""
  name = np.dtype(dtype).name
  fits = [(d, dv) for t, d, dv in _extension.compiled_kernels(direction)
          if t == name and d >= head_dim and dv >= head_dim_v and (d == dv) == (head_dim == head_dim_v)]
  return min(fits, default=None)


def kernel_available(direction: str, dtype, head_dim: int, head_dim_v: int) -> bool:
  return kernel_head_dims(direction, dtype, head_dim, head_dim_v) is not None


def _gpus():
  """The GPU devices JAX sees (none on a machine without one)."""
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


def _non_hopper_gpus() -> list[str]:
  """The visible GPUs the kernels cannot run on: they are compiled for compute capability 9.0 (sm_90a) only."""
  return sorted({f"{d.device_kind} (compute capability {d.compute_capability})" for d in _gpus()
                 if getattr(d, "compute_capability", None) != "9.0"})


def _reference_reason(direction: str, dtype, head_dim: int, head_dim_v: int) -> str | None:
  """Why a call lowered for CUDA runs the reference instead of a kernel, or None if a kernel serves it."""
  if not kernel_available(direction, dtype, head_dim, head_dim_v):
    if _extension.module is None:
      return f"the CUDA extension is not installed ({_extension.import_error})"
    return f"no {direction} kernel was compiled for {np.dtype(dtype).name}, head_dim={head_dim}, head_dim_v={head_dim_v}"
  non_hopper = _non_hopper_gpus()
  if non_hopper:
    return f"the kernels need a Hopper GPU (compute capability 9.0) and this machine has {', '.join(non_hopper)}"
  return None


@functools.cache
def _warn_reference_on_gpu(reason: str, direction: str) -> None:
  """Say once when a user with a GPU would silently get the (slow) reference instead of a kernel."""
  if _gpus():
    warnings.warn(f"fa3_jax: attention {direction} runs on the pure-JAX reference path on GPU because {reason}; "
                  "see `python -m fa3_jax`", stacklevel=4)


def _dispatch(direction: str, kernel_fn, reference_fn, dtype, head_dim: int, head_dim_v: int, *args):
  # Lowering for CUDA on a machine without a GPU (the lowering tests) has no device to ask: it emits the kernels.
  reason = _reference_reason(direction, dtype, head_dim, head_dim_v)
  if reason is None:
    return jax.lax.platform_dependent(*args, cuda=kernel_fn, default=reference_fn)
  _warn_reference_on_gpu(reason, direction)
  return reference_fn(*args)


# ---- ffi_call plumbing -----------------------------------------------------------------------------------------

def _result_type(like, shape, dtype):
  """A result type that keeps `like`'s varying manual axes, so custom_vjp works inside shard_map(check_vma=True)."""
  t = jax.typeof(like)
  return t.update(shape=tuple(shape), dtype=dtype, sharding=t.sharding.update(spec=P(*([None] * len(shape)))))


def _attributes(cfg: AttentionConfig, seqlen_q: int, seqlen_k: int) -> dict:
  left, right = cfg.resolved_window(seqlen_q, seqlen_k)
  # Explicit NumPy types: a Python float would arrive as f64 and fail to decode as the handler's float.
  return dict(softmax_scale=np.float32(cfg.softmax_scale), softcap=np.float32(cfg.softcap),
              window_left=np.int64(left), window_right=np.int64(right), max_seqlen_q=np.int64(seqlen_q),
              max_seqlen_k=np.int64(seqlen_k))


def fold_vmap(op, fold, fold_into_heads=None):
  """Make `op(*operands) -> tuple of arrays` vmappable by folding the vmapped axis into the problem.

  Operands are arrays or pytrees of them (a SequenceLayout, None). Operands that are not batched are broadcast
  first, then `fold(axis_size, *operands) -> (operands, unfold)` merges the vmapped axis (fold_fwd, fold_bwd) and
  `unfold(*results)` splits it off the results again; unless `fold_into_heads(axis_size, in_batched, *operands)`
  handles the call (the forward folds a q-only vmap into the query heads, so K/V are never copied). Nested vmaps
  fold too, because the rule calls the folded op again. A vmap over a size-0 axis returns empty results without
  running `op` (its results' shapes come from an abstract evaluation of one unbatched call).
  """
  folded = jax.custom_batching.custom_vmap(op)

  @folded.def_vmap
  def rule(axis_size, in_batched, *args):
    in_batched = tuple(in_batched)
    if axis_size == 0:
      unbatched = jax.tree.map(lambda a, b: jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype), args,
                               in_batched)
      shapes = jax.eval_shape(op, *unbatched)
      return tuple(jnp.zeros((0, *r.shape), r.dtype) for r in shapes), (True,) * len(shapes)
    if fold_into_heads is not None:
      results = fold_into_heads(folded, axis_size, in_batched, *args)
      if results is not None:
        return tuple(results), (True,) * len(results)
    args = jax.tree.map(lambda a, b: a if b else jnp.broadcast_to(a, (axis_size, *a.shape)), args, in_batched)
    args, unfold = fold(axis_size, *args)
    results = unfold(*folded(*args))
    return tuple(results), (True,) * len(results)

  return folded


def _merge(x):
  """(n, b, ...) -> (n * b, ...): n vmapped copies as one longer leading axis (batch, or a packed side's rows)."""
  return x.reshape(-1, *x.shape[2:])


def _split(x, n: int):
  return x.reshape(n, -1, *x.shape[1:])


def _merge_lse(x, packed: bool):
  """An lse-shaped operand of n copies: BSHD (n, b, h, s) merges its batch, packed (n, h, total) its rows."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1) if packed else _merge(x)


def _split_lse(x, n: int, packed: bool):
  return jnp.moveaxis(x.reshape(x.shape[0], n, -1), 1, 0) if packed else _split(x, n)


def fold_sequences(n: int, sequences: SequenceLayout, rows_q: int, rows_k: int, pages: int = 0) -> SequenceLayout:
  """The layout of n problems run as one, from their layout (every array with a leading axis of n). A packed side
  (rows_q / rows_k rows per copy) becomes one packing of n * batch sequences, copy i's offsets shifted by i * rows
  and every length explicit (seqused, clipped as in its copy), so that rows past a copy's cu_seqlens[-1] stay
  uncovered; a BSHD side's seqused, and a segmented layout's segments, concatenate like its batch; a paged
  layout's tables too, copy i's entries shifted by i * pages (the pages per copy, which merge like a batch)."""
  def side(name, rows):
    offset, length = sequences.extents(name, rows)
    if offset is None:
      return None, None if length is None else _merge(length)
    shift = rows * jnp.arange(n, dtype=jnp.int32)[:, None]
    return jnp.append(_merge(offset + shift), jnp.int32(n * rows)), _merge(length)

  if sequences.segmented:  # BSHD sides: the copies' rows (and their segment ids) are more batch rows
    return jax.tree.map(_merge, sequences)
  (cu_q, used_q), (cu_k, used_k) = side("q", rows_q), side("k", rows_k)
  table = sequences.page_table
  if table is not None:
    table = _merge(table + pages * jnp.arange(n, dtype=table.dtype)[:, None, None])
  return dataclasses.replace(sequences, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=used_q, seqused_k=used_k,
                             page_table=table)


def _folded_sequences(n: int, sequences: SequenceLayout, q, k) -> SequenceLayout:
  """fold_sequences of n copies of q and k (leading axis n; k's rows per copy: SequenceLayout.key_rows, and its
  pages where paged)."""
  rows_q = q.shape[1] if sequences.packed_q else q.shape[2]
  return fold_sequences(n, sequences, rows_q, sequences.key_rows(k), k.shape[1] if sequences.paged else 0)


def fold_fwd(n: int, q, k, v, sequences):
  """n forward problems (operands with a leading axis n) as one, and how to unfold its (out, lse)."""
  folded = (_merge(q), _merge(k), _merge(v), _folded_sequences(n, sequences, q, k))
  return folded, lambda out, lse: (_split(out, n), _split_lse(lse, n, sequences.packed_q))


def fold_bwd(n: int, dout, q, k, v, out, lse, dlse, sequences):
  """n backward problems as one, and how to unfold its (dq, dk, dv)."""
  packed = sequences.packed_q
  folded = (*map(_merge, (dout, q, k, v, out)), _merge_lse(lse, packed),
            None if dlse is None else _merge_lse(dlse, packed), _folded_sequences(n, sequences, q, k))
  return folded, lambda dq, dk, dv: (_split(dq, n), _split(dk, n), _split(dv, n))


def fwd_fold_into_heads(folded, axis_size, in_batched, q, k, v, sequences):
  """vmap over q alone: stack the vmapped copies as extra query heads of each kv head's group (BSHD or packed q:
  the heads are the second-to-last axis of q and of lse)."""
  batched = jax.tree.leaves(in_batched)
  if not batched[0] or any(batched[1:]):
    return None
  n, *rows, h, d = q.shape
  hk = k.shape[-2]
  g = h // hk
  q = jnp.moveaxis(q.reshape(n, *rows, hk, g, d), 0, -3).reshape(*rows, hk * n * g, d)
  out, lse = folded(q, k, v, sequences)
  out = jnp.moveaxis(out.reshape(*rows, hk, n, g, -1), -3, 0).reshape(n, *rows, h, -1)
  lse = jnp.moveaxis(lse.reshape(*lse.shape[:-2], hk, n, g, lse.shape[-1]), -3, 0)
  return out, lse.reshape(*lse.shape[:-3], h, lse.shape[-1])


def _pad_last(x, size: int):
  return x if x.shape[-1] == size else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def lse_shape(q, sequences: SequenceLayout) -> tuple[int, ...]:
  """lse's shape for q: (heads, total_q) when `sequences` packs q, else (batch, heads, seqlen_q)."""
  return (q.shape[1], q.shape[0]) if sequences.packed_q else (q.shape[0], q.shape[2], q.shape[1])


def _problem_sizes(q, k, sequences: SequenceLayout) -> tuple[int, int, int]:
  """(batch, max_seqlen_q, max_seqlen_k) as the handlers decode them: a packed side's sequence count and bound, a
  BSHD side's batch and seqlen."""
  batch = sequences.cu_seqlens_q.shape[0] - 1 if sequences.packed_q else q.shape[0]
  max_q = sequences.max_seqlen_q if sequences.packed_q else q.shape[1]
  max_k = sequences.max_seqlen_k if sequences.packed_k else k.shape[1]
  return batch, max_q, max_k


def fwd_kernel(q, k, v, cfg: AttentionConfig, sequences: SequenceLayout = SequenceLayout()):
  """The CUDA forward as an ffi_call (lowers for the cuda platform only). Returns (out, lse) in q's layout:
  out (*q.shape[:-1], d_v), lse (b, h, s_q), or (h, total_q) where `sequences` packs q."""
  head_dim, head_dim_v = q.shape[-1], v.shape[-1]
  dims = kernel_head_dims("fwd", q.dtype, head_dim, head_dim_v) or (head_dim, head_dim_v)

  def call(q, k, v, sequences):
    batch, max_q, max_k = _problem_sizes(q, k, sequences)
    d, dv = dims
    # Split-KV's partials cover BSHD query rows that all take part (docs/kernels.md §2.10).
    splits = 1 if sequences.packed_q or sequences.seqused_q is not None else cfg.num_splits
    n = _extension.workspace_bytes("fwd", batch, max_q, max_k, q.shape[-2], k.shape[-2], d, dv,
                                   not sequences.uniform, splits)
    result_types = (_result_type(q, (*q.shape[:-1], dv), q.dtype),
                    _result_type(q, lse_shape(q, sequences), jnp.float32), _result_type(q, (n,), jnp.uint8))
    operands = dict(q=_pad_last(q, d), k=_pad_last(k, d), v=_pad_last(v, dv), **sequences.arrays())
    with jax.named_scope("fa3_fwd"):
      r = FWD(result_types, operands, num_splits=np.int64(splits), **_attributes(cfg, max_q, max_k))
    return r["out"][..., :head_dim_v], r["lse"]

  return tuple(fold_vmap(call, fold_fwd, fwd_fold_into_heads)(q, k, v, sequences))


def bwd_kernel(dout, q, k, v, out, lse, dlse=None, *, cfg: AttentionConfig,
               sequences: SequenceLayout = SequenceLayout()):
  """The CUDA backward as an ffi_call (lowers for the cuda platform only). Returns (dq, dk, dv).

  dlse, the cotangent of lse (lse's shape, float32), is optional: the kernel folds it into D = rowsum(dout * out).
  """
  head_dim, head_dim_v = q.shape[-1], v.shape[-1]
  dims = kernel_head_dims("bwd", q.dtype, head_dim, head_dim_v) or (head_dim, head_dim_v)

  def call(dout, q, k, v, out, lse, dlse, sequences):
    batch, max_q, max_k = _problem_sizes(q, k, sequences)
    d, dv = dims
    total_q = q.shape[0] if sequences.packed_q else 0
    n = _extension.workspace_bytes("bwd", batch, max_q, max_k, q.shape[-2], k.shape[-2], d, dv, cfg.deterministic,
                                   total_q)
    result_types = (_result_type(q, (*q.shape[:-1], d), q.dtype), _result_type(k, (*k.shape[:-1], d), k.dtype),
                    _result_type(v, (*v.shape[:-1], dv), v.dtype), _result_type(q, (n,), jnp.uint8))
    operands = dict(dout=_pad_last(dout, dv), q=_pad_last(q, d), k=_pad_last(k, d), v=_pad_last(v, dv),
                    out=_pad_last(out, dv), lse=lse, dlse=dlse, **sequences.arrays())
    with jax.named_scope("fa3_bwd"):
      r = BWD(result_types, operands, deterministic=bool(cfg.deterministic), **_attributes(cfg, max_q, max_k))
    return r["dq"][..., :head_dim], r["dk"][..., :head_dim], r["dv"][..., :head_dim_v]

  return tuple(fold_vmap(call, fold_bwd)(dout, q, k, v, out, lse, dlse, sequences))


# ---- the two directions, dispatched --------------------------------------------------------------------------

def segment_kernel(ids, max_segments: int) -> SequenceLayout:
  """The packed layout of shared segment ids (b, s) by the CUDA derivation (lowers for the cuda platform only)."""
  b, s = ids.shape
  result_types = [_result_type(ids, shape, dtype) for shape, dtype in (
      ((b * max_segments + 1,), jnp.int32), ((b * max_segments,), jnp.int32),
      ((_extension.workspace_bytes("segment_layout", b, s),), jnp.uint8))]
  with jax.named_scope("fa3_segment_layout"):
    r = SEGMENT_LAYOUT(result_types, dict(segment_ids=ids), max_segments=np.int64(max_segments))
  return SequenceLayout(r["cu_seqlens"], r["cu_seqlens"], r["seqused"], r["seqused"], max_seqlen_q=s, max_seqlen_k=s)


def segment_packing(sequences: SequenceLayout) -> SequenceLayout:
  """The packed layout the kernels run a segmented one as (_segments.packing: the batch's rows back to back).
  Shared ids (self-attention) are derived by one small CUDA op (fa3_jax_segment_layout), which costs a few
  microseconds where XLA's scans and scatters cost tens; distinct q / kv ids, whose key runs are matched by id,
  derive in XLA."""
  if sequences.segment_ids_k is None:
    return segment_kernel(sequences.segment_ids_q, sequences.max_segments)
  return _segments.packing(sequences)


@dataclasses.dataclass(frozen=True)
class PackedRun:
  """How the kernels run a call whose rule or layout they do not take directly: segment ids (their packing,
  segment_packing) and attention_chunk (each chunk a sequence, fa3_jax/_chunks.py) both become a packing of both
  sides, a BSHD side's batch rows back to back, under a rule without chunks. pack_* turn the call's tensors into the
  packed run's, unpack_* its results back."""
  cfg: AttentionConfig
  sequences: SequenceLayout
  q_batch: int | None  # q's batch where q is BSHD (its tensors merge), None where packed already
  k_batch: int | None

  @classmethod
  def of(cls, q, k, cfg: AttentionConfig, sequences: SequenceLayout) -> "PackedRun | None":
    """The packed run of a call, or None where the kernels take it as it is."""
    if not (sequences.segmented or cfg.attention_chunk):
      return None
    q_batch = None if sequences.packed_q else q.shape[0]
    k_batch = None if sequences.packed_k else k.shape[0]
    # Each side's rows as `sequences` counts them: a packed side's total, a BSHD side's seqlen.
    rows_q, rows_k = (x.shape[0] if packed else x.shape[1] for x, packed in ((q, sequences.packed_q),
                                                                            (k, sequences.packed_k)))
    if sequences.segmented:
      sequences, rows_q, rows_k = segment_packing(sequences), q.shape[0] * q.shape[1], k.shape[0] * k.shape[1]
    if cfg.attention_chunk:
      batch = _problem_sizes(q, k, sequences)[0]
      sequences = _chunks.chunk_layout(sequences, cfg.attention_chunk, rows_q, rows_k, batch)
    return cls(dataclasses.replace(cfg, attention_chunk=0), sequences, q_batch, k_batch)

  def pack_q(self, x):
    return x if self.q_batch is None else _merge(x)

  def pack_k(self, x):
    return x if self.k_batch is None else _merge(x)

  def pack_lse(self, x):
    return x if self.q_batch is None or x is None else _merge_lse(x, packed=True)

  def unpack_q(self, x):
    return x if self.q_batch is None else _split(x, self.q_batch)

  def unpack_k(self, x):
    return x if self.k_batch is None else _split(x, self.k_batch)

  def unpack_lse(self, x):
    return x if self.q_batch is None else _split_lse(x, self.q_batch, packed=True)


def attention_fwd(q, k, v, cfg: AttentionConfig, sequences: SequenceLayout = SequenceLayout()):
  """(out, lse): the CUDA kernel on a GPU where one was built for these inputs, else the reference. q, k, v are
  BSHD, or packed where `sequences` says so (fwd_kernel gives the shapes). Segmented layouts and chunked rules run
  on the kernels as a PackedRun and on the reference as they are (it masks by segment and chunk); a segmented
  layout is shard-local here, so the batch may have been sharded above."""
  def kernel_fwd(q, k, v, sequences):
    k, v, sequences = sequences.unpaged(k, v)  # the kernels read BSHD or packed keys, not pages yet
    run = PackedRun.of(q, k, cfg, sequences)
    if run is None:
      return fwd_kernel(q, k, v, cfg, sequences)
    out, lse = fwd_kernel(run.pack_q(q), run.pack_k(k), run.pack_k(v), run.cfg, run.sequences)
    return run.unpack_q(out), run.unpack_lse(lse)

  return _dispatch("fwd", kernel_fwd, lambda q, k, v, s: reference.varlen_forward(q, k, v, cfg, s),
                   q.dtype, q.shape[-1], v.shape[-1], q, k, v, sequences)


def attention_bwd(dout, q, k, v, out, lse, cfg: AttentionConfig, dlse=None,
                  sequences: SequenceLayout = SequenceLayout()):
  """(dq, dk, dv): the CUDA kernel on a GPU where one was built for these inputs, else the reference. dlse (lse's
  cotangent, lse's shape, float32) is optional. Segmented layouts and chunked rules as in attention_fwd; paged ones
  are forward-only."""
  if sequences.paged:
    raise NotImplementedError("paged keys (page_table) are forward-only: flash_attn_with_kvcache has no gradient")
  def kernel_bwd(dout, q, k, v, out, lse, dlse, sequences):
    run = PackedRun.of(q, k, cfg, sequences)
    if run is None:
      return bwd_kernel(dout, q, k, v, out, lse, dlse, cfg=cfg, sequences=sequences)
    dq, dk, dv = bwd_kernel(*map(run.pack_q, (dout, q)), *map(run.pack_k, (k, v)), run.pack_q(out),
                            run.pack_lse(lse), run.pack_lse(dlse), cfg=run.cfg, sequences=run.sequences)
    return run.unpack_q(dq), run.unpack_k(dk), run.unpack_k(dv)

  def reference_bwd(dout, q, k, v, out, lse, dlse, sequences):
    return reference.varlen_backward(q, k, v, out, lse, dout, cfg, sequences, dlse=dlse)

  return _dispatch("bwd", kernel_bwd, reference_bwd, q.dtype, q.shape[-1], v.shape[-1], dout, q, k, v, out, lse,
                   dlse, sequences)
