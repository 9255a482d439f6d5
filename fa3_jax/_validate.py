"""Argument checks shared by every public entry point. They raise at trace time with messages that name the
argument, what was expected and what was received: TypeError for a wrong type, ValueError for a wrong value,
NotImplementedError for a valid combination that is not supported."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout

MAX_HEAD_DIM = 256
# The one (head_dim, head_dim_v) pair with head_dim_v != head_dim (DeepSeek-style MLA prefill shapes).
ASYMMETRIC_HEAD_DIMS = ((192, 128),)
# The CUDA kernels' mask arithmetic is int32 and adds up to three bounded terms (row + seqlen_k - seqlen_q - window):
# with each below 2**29 no sum reaches 2**31.
MAX_SEQLEN = 2**29
# Rows of a packed (variable-length) tensor: cu_seqlens are int32.
MAX_TOTAL = 2**31 - 1
HALF_DTYPES = ("float16", "bfloat16")

# Python floats: comparing a Python float with a NumPy float32 would cast (and overflow) the Python float.
_F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32; kernels may flush smaller ones to 0
_F32_MAX = float(np.finfo(np.float32).max)
# The kernels scale scores by softmax_scale * log2(e) in float32 (exp2-domain softmax). Inputs within float16's
# finite range give |q.k| <= head_dim * 65504**2, so larger scales than max_softmax_scale could overflow to inf.
_MAX_HALF_INPUT = float(np.finfo(np.float16).max)
_LOG2_E = math.log2(math.e)


def _got(value) -> str:
  """What was received, for a type error: the type's name, or that it is traced (static arguments cannot be)."""
  if isinstance(value, jax.core.Tracer):
    return "a traced value (this argument is static: it must be known at trace time, not computed under jit)"
  return type(value).__name__


def _shown(value) -> str:
  """What was received, for a message about a static value or a tuple of them: its repr, or that it is traced."""
  parts = tuple(value) if isinstance(value, (tuple, list)) else ()
  traced = next((p for p in (value, *parts) if isinstance(p, jax.core.Tracer)), None)
  return repr(value) if traced is None else _got(traced)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _as_float(x) -> float:
  """float(x), with Python ints beyond float's range as inf (so the range checks report them)."""
  try:
    return float(x)
  except OverflowError:
    return math.inf if x > 0 else -math.inf


# ---- scalars -------------------------------------------------------------------------------------------------

def check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {_got(value)}")
  return bool(value)


def check_int(name: str, value, minimum: int) -> int:
  """A static Python (or NumPy) int >= minimum; bools are not ints here."""
  if not _is_int(value):
    raise TypeError(f"{name} must be an int, got {_got(value)}")
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
  return int(value)


def check_choice(name: str, value, choices: tuple):
  """One of `choices` (strings, or None where listed)."""
  if not (value is None or isinstance(value, str)) or value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  return value


def check_axis(name: str, axis, ndim: int) -> int:
  """An axis index of an ndim-dimensional array, negative values counting from the end; returned non-negative."""
  if not _is_int(axis):
    raise TypeError(f"{name} must be an int, got {_got(axis)}")
  if not -ndim <= axis < ndim:
    valid = f"an int in [-{ndim}, {ndim})" if ndim else "an axis, but a 0-dim array has none"
    raise ValueError(f"{name} must be {valid} for an array of {ndim} dims, got {axis}")
  return int(axis) % ndim


def check_float_dtype(name: str, dtype) -> np.dtype:
  """A floating dtype (anything jnp.dtype understands, e.g. jnp.bfloat16 or "float16")."""
  try:
    dt = None if dtype is None else jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{name} must be a floating dtype such as jnp.bfloat16 or jnp.float16, got "
                    f"{repr(dtype) if dt is None else dt.name}")
  return np.dtype(dt)


# ---- arrays and shapes ---------------------------------------------------------------------------------------

def _dtype_name(x) -> str:
  return np.dtype(x.dtype).name


def check_is_array(name: str, x) -> None:
  """A jax.Array (traced or not) or a NumPy array; Python lists, scalars and shape structs are not."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise TypeError(f"{name} must be an array (jax.Array or numpy.ndarray), got {_got(x)}")


def as_array(name: str, x):
  """x as an array: arrays pass through, nested lists and Python numbers are converted (as jax.nn does); None,
  strings, ragged lists and other objects raise TypeError."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    converted = np.asarray(x)
  except (TypeError, ValueError):
    converted = None
  if converted is None or converted.dtype.kind not in "biuf":
    raise TypeError(f"{name} must be an array (or a nested list of numbers), got {_got(x)}")
  return converted


def check_array(name: str, x, ndim: int, layout: str) -> None:
  check_is_array(name, x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")


def check_half_dtype(name: str, x) -> None:
  if _dtype_name(x) not in HALF_DTYPES:
    raise TypeError(f"{name} must be float16 or bfloat16, got {_dtype_name(x)}")


def check_seqlen(name: str, seqlen: int) -> None:
  if seqlen > MAX_SEQLEN:
    raise ValueError(f"{name} must be at most MAX_SEQLEN = 2**29 = {MAX_SEQLEN} (the CUDA kernels' mask arithmetic "
                     f"is int32), got {seqlen}")


def check_head_dim(d: int, name: str = "head_dim") -> None:
  if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
    raise ValueError(f"{name} must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")


def check_head_dim_v(d: int, dv: int, d_name: str = "head_dim", dv_name: str = "head_dim_v") -> None:
  if dv != d and (d, dv) not in ASYMMETRIC_HEAD_DIMS:
    raise NotImplementedError(
        f"{dv_name} must equal {d_name}, or ({d_name}, {dv_name}) must be one of {list(ASYMMETRIC_HEAD_DIMS)}; "
        f"got {d_name}={d}, {dv_name}={dv}")


def check_head_dims(d: int, dv: int) -> None:
  """The head dims flash_attn_func serves: head_dim a multiple of 8 up to 256, head_dim_v == head_dim or (192, 128)."""
  check_head_dim(d)
  check_head_dim_v(d, dv)


def _check_one_half_dtype(q, k, v) -> None:
  check_half_dtype("q", q)
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share a dtype, got q={_dtype_name(q)}, k={_dtype_name(k)}, "
                    f"v={_dtype_name(v)}")


def _check_heads_and_head_dims(q, k, v, rows_k: str) -> None:
  """What every layout shares (the last three dims are rows, heads, head dim): k and v with the same rows (named
  `rows_k`) and kv_heads, GQA divisibility, head dims."""
  *_, sk, hk, dk = k.shape
  *_, sv, hv, dv = v.shape
  h, d = q.shape[-2:]
  if sv != sk:
    raise ValueError(f"k and v must have the same {rows_k}, got k={sk}, v={sv}")
  if hv != hk:
    raise ValueError(f"k and v must have the same number of kv_heads, got k={hk}, v={hv}")
  # heads = kv_heads = 0 is an empty problem, like batch 0; kv_heads = 0 with query heads is not.
  if (h % hk if hk else h) != 0:
    raise ValueError(f"heads of q must be a multiple of kv_heads of k and v (GQA/MQA), got heads={h}, "
                     f"kv_heads={hk}")
  if dk != d:
    raise ValueError(f"k must have the head_dim of q, got q head_dim={d}, k head_dim={dk}")
  check_head_dims(d, dv)


def check_qkv(q, k, v) -> None:
  """Shapes (batch, seqlen, heads, head_dim), dtypes, GQA divisibility, head dims and sequence lengths of q, k, v."""
  check_array("q", q, 4, "(batch, seqlen_q, heads, head_dim)")
  check_array("k", k, 4, "(batch, seqlen_k, kv_heads, head_dim)")
  check_array("v", v, 4, "(batch, seqlen_k, kv_heads, head_dim_v)")
  _check_one_half_dtype(q, k, v)
  b, bk, bv = q.shape[0], k.shape[0], v.shape[0]
  if bk != b or bv != b:
    raise ValueError(f"q, k and v must have the same batch size, got q={b}, k={bk}, v={bv}")
  _check_heads_and_head_dims(q, k, v, "seqlen_k")
  check_seqlen("seqlen_q", q.shape[1])
  check_seqlen("seqlen_k", k.shape[1])


def check_varlen_qkv(q, k, v) -> None:
  """Shapes (total, heads, head_dim) (sequences packed back to back), dtypes, GQA divisibility and head dims of
  flash_attn_varlen_func's q, k, v."""
  check_array("q", q, 3, "(total_q, heads, head_dim)")
  check_array("k", k, 3, "(total_k, kv_heads, head_dim)")
  check_array("v", v, 3, "(total_k, kv_heads, head_dim_v)")
  _check_one_half_dtype(q, k, v)
  _check_heads_and_head_dims(q, k, v, "total_k")
  for name, rows in (("total_q (rows of q)", q.shape[0]), ("total_k (rows of k and v)", k.shape[0])):
    if rows > MAX_TOTAL:
      raise ValueError(f"{name} must be at most 2**31 - 1 = {MAX_TOTAL} (cu_seqlens are int32), got {rows}")


def check_qkvpacked(qkv) -> None:
  """qkv (batch, seqlen, 3, heads, head_dim) float16 | bfloat16, named as qkv in every message."""
  check_array("qkv", qkv, 5, "(batch, seqlen, 3, heads, head_dim)")
  if qkv.shape[2] != 3:
    raise ValueError(f"qkv must have shape (batch, seqlen, 3, heads, head_dim), got dim 2 = {qkv.shape[2]} "
                     f"(shape {tuple(qkv.shape)})")
  check_half_dtype("qkv", qkv)
  check_head_dim(qkv.shape[-1], "head_dim of qkv")
  check_seqlen("seqlen of qkv", qkv.shape[1])


def check_seq_lengths(name: str, lengths, batch: int):
  """None, or per-example lengths as an int32 array of shape (batch,) (traced values are fine)."""
  if lengths is None:
    return None
  lengths = jnp.asarray(as_array(name, lengths))
  if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
    raise ValueError(f"{name} must be an int32 array of shape (batch,) = ({batch},), got {lengths.dtype} "
                     f"{tuple(lengths.shape)}")
  return lengths


def _int_vector(name: str, x, length: int | None, layout: str):
  """x as a 1-dim integer array of `length` elements (None: at least one), concrete values within int32; traced
  values stay traced. Nested lists are converted."""
  x = as_array(name, x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an int32 array, got {_dtype_name(x)}")
  if x.ndim != 1 or (x.shape[0] < 1 if length is None else x.shape[0] != length):
    raise ValueError(f"{name} must have shape {layout}, got shape {tuple(x.shape)}")
  _check_int32_values(name, _known(x))
  return x


def _check_int32_values(name: str, known: np.ndarray | None) -> None:
  int32 = np.iinfo(np.int32)
  if known is not None and known.size and (known.min() < int32.min or known.max() > int32.max):
    raise ValueError(f"{name} must hold int32 values, got values in [{known.min()}, {known.max()}]")


def _known(x) -> np.ndarray | None:
  """x's values where they are known at trace time (NumPy or non-traced arrays), else None."""
  return None if x is None or isinstance(x, jax.core.Tracer) else np.asarray(x).astype(np.int64)


def _first(bad: np.ndarray) -> int:
  return int(np.argmax(bad))


def _check_known_sequences(side: str, cu, used, max_seqlen: int, total: int) -> None:
  """The documented preconditions of one side, where cu_seqlens / seqused are known at trace time (traced values
  cannot be checked; the kernels clamp them instead)."""
  cu_name, used_name = f"cu_seqlens_{side}", f"seqused_{side}"
  c, u = _known(cu), _known(used)
  if c is not None:
    if c[0] != 0:
      raise ValueError(f"{cu_name} must start at 0, got {cu_name}[0] = {c[0]}")
    allotments = np.diff(c)
    if (allotments < 0).any():
      i = _first(allotments < 0)
      raise ValueError(f"{cu_name} must be nondecreasing, got {cu_name}[{i}] = {c[i]} > {cu_name}[{i + 1}] = "
                       f"{c[i + 1]}")
    if c[-1] > total:
      raise ValueError(f"{cu_name}[-1] must be at most total_{side} = {total}, the rows of "
                       f"{'q' if side == 'q' else 'k and v'}, got {c[-1]}")
  if u is not None:
    if (u < 0).any():
      i = _first(u < 0)
      raise ValueError(f"{used_name} must be >= 0, got {used_name}[{i}] = {u[i]}")
    if c is not None and (u > allotments).any():
      i = _first(u > allotments)
      raise ValueError(f"{used_name}[{i}] = {u[i]} exceeds sequence {i}'s allotment {cu_name}[{i + 1}] - "
                       f"{cu_name}[{i}] = {allotments[i]}")
  # A sequence's length is its seqused if given, else its allotment.
  lengths, source = (u, used_name) if used is not None else (None if c is None else allotments, "the allotment")
  if lengths is not None and (lengths > max_seqlen).any():
    i = _first(lengths > max_seqlen)
    raise ValueError(f"max_seqlen_{side} = {max_seqlen} must bound every sequence's length, got sequence {i} with "
                     f"{lengths[i]} rows ({source})")


def sequence_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, total_q: int,
                    total_k: int) -> SequenceLayout:
  """The checked SequenceLayout of a variable-length call (both sides packed, total_q / total_k rows): cu_seqlens
  (batch + 1,) and seqused (batch,) integer arrays, converted to int32, and static max_seqlen ints in
  [1, MAX_SEQLEN]. Values known at trace time must be well-formed (start at 0, nondecreasing, within the rows,
  seqused within each allotment, lengths within max_seqlen)."""
  cu_q = _int_vector("cu_seqlens_q", cu_seqlens_q, None, "(batch + 1,)")
  batch = cu_q.shape[0] - 1
  cu_k = _int_vector("cu_seqlens_k", cu_seqlens_k, batch + 1,
                     f"(batch + 1,) = ({batch + 1},) like cu_seqlens_q (both sides have the same batch)")
  used = [None if x is None else _int_vector(name, x, batch, f"(batch,) = ({batch},), the batch of cu_seqlens_q")
          for name, x in (("seqused_q", seqused_q), ("seqused_k", seqused_k))]
  bounds = [check_int(name, x, 1) for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k))]
  for side, cu, u, bound, total in zip("qk", (cu_q, cu_k), used, bounds, (total_q, total_k)):
    check_seqlen(f"max_seqlen_{side}", bound)
    _check_known_sequences(side, cu, u, bound, total)
  cu_q, cu_k, used_q, used_k = (None if x is None else jnp.asarray(x, jnp.int32) for x in (cu_q, cu_k, *used))
  return SequenceLayout(cu_q, cu_k, used_q, used_k, max_seqlen_q=bounds[0], max_seqlen_k=bounds[1])


def _run_ids(row: np.ndarray) -> np.ndarray:
  """The ids of a row's runs of equal non-negative ids, in order."""
  first = (row >= 0) & np.concatenate([[True], row[1:] != row[:-1]])
  return row[first]


def _check_known_segment_ids(name: str, ids: np.ndarray, max_segments: int) -> list[np.ndarray]:
  """Each row's run ids, after checking that every id forms one run and that max_segments bounds the runs."""
  runs = [_run_ids(row) for row in ids]
  for b, r in enumerate(runs):
    unique, counts = np.unique(r, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"{name} must hold each segment's id in one contiguous run per batch row, got id "
                       f"{unique[_first(counts > 1)]} in {counts.max()} runs in row {b}")
    if len(r) > max_segments:
      raise ValueError(f"max_segments = {max_segments} must bound the segments of every batch row, got {len(r)} "
                       f"segments in row {b} of {name}")
  return runs


def segment_ids(q_segment_ids, kv_segment_ids, max_segments, batch: int, seqlen_q: int, seqlen_k: int):
  """None without segment ids, else (q_ids (batch, seqlen_q), kv_ids (batch, seqlen_k), max_segments): int32 arrays
  (one object for both when only one was given, which needs seqlen_q == seqlen_k) and the static bound, by default
  max(seqlen_q, seqlen_k), which no row can exceed. Ids known at trace time are checked: each id one contiguous
  run per row, at most max_segments runs, and ids shared by q_segment_ids and kv_segment_ids in the same order."""
  if kv_segment_ids is q_segment_ids and seqlen_q == seqlen_k:
    kv_segment_ids = None  # the same ids for both: self-attention
  if q_segment_ids is None and kv_segment_ids is None:
    if max_segments is not None:
      raise ValueError(f"max_segments bounds the segments of q_segment_ids / kv_segment_ids, but neither was given; "
                       f"got max_segments={max_segments!r}")
    return None
  if (q_segment_ids is None or kv_segment_ids is None) and seqlen_q != seqlen_k:
    given = "q_segment_ids" if kv_segment_ids is None else "kv_segment_ids"
    raise ValueError(f"{given} alone serves queries and keys only when seqlen_q == seqlen_k; pass both "
                     f"q_segment_ids (batch, seqlen_q) and kv_segment_ids (batch, seqlen_k), got seqlen_q={seqlen_q}, "
                     f"seqlen_k={seqlen_k}")
  max_segments = (max(seqlen_q, seqlen_k) if max_segments is None
                  else check_int("max_segments", max_segments, 1))
  checked = []
  for name, ids, seqlen in (("q_segment_ids", q_segment_ids, seqlen_q), ("kv_segment_ids", kv_segment_ids, seqlen_k)):
    if ids is None:
      checked.append(None)
      continue
    ids = as_array(name, ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name} must be an int32 array, got {_dtype_name(ids)}")
    if tuple(ids.shape) != (batch, seqlen):
      side = "q" if name.startswith("q") else "k"
      raise ValueError(f"{name} must have shape (batch, seqlen_{side}) = {(batch, seqlen)}, got shape "
                       f"{tuple(ids.shape)}")
    if batch * seqlen >= MAX_TOTAL:
      raise ValueError(f"{name}: batch * seqlen must be below 2**31 - 1 = {MAX_TOTAL} (the rows run packed, with "
                       f"int32 offsets), got {batch} * {seqlen} = {batch * seqlen}")
    known = _known(ids)
    _check_int32_values(name, known)
    runs = None if known is None else _check_known_segment_ids(name, known, max_segments)
    checked.append((jnp.asarray(ids, jnp.int32), runs))
  if None in checked:  # one array for both, as one object: self-attention needs no matching of key runs
    (q_ids, _), = [c for c in checked if c is not None]
    return q_ids, q_ids, max_segments
  (q_ids, runs_q), (kv_ids, runs_k) = checked
  if runs_q is not None and runs_k is not None:
    for b, (rq, rk) in enumerate(zip(runs_q, runs_k)):
      shared_q, shared_k = rq[np.isin(rq, rk)], rk[np.isin(rk, rq)]
      if (shared_q != shared_k).any():
        raise ValueError(f"kv_segment_ids must list the segments it shares with q_segment_ids in the same order, got "
                         f"ids {shared_k.tolist()} in row {b} where q_segment_ids has {shared_q.tolist()}")
  return q_ids, kv_ids, max_segments


def check_broadcastable(name: str, x, shape: tuple):
  """x (4 dims) broadcastable to `shape` = (B, N, T, S) dimension by dimension, as jax.nn requires."""
  if x.ndim != 4 or any(d not in (1, e) for d, e in zip(x.shape, shape)):
    raise ValueError(f"{name} must be broadcastable to (B, N, T, S) = {shape}, got shape {tuple(x.shape)}")
  return x


def check_axis_name(axis_name) -> tuple[tuple[str, ...], int]:
  """(the mesh axis names, their total size) of `axis_name`, a name or a tuple/list of distinct names, each bound by
  the enclosing jax.shard_map (or any enclosing named axis, such as vmap's axis_name)."""
  names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  bound = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  where = f"the enclosing shard_map's axes are {bound}" if bound else "no jax.shard_map encloses this call"
  expected = "axis_name must be a mesh axis of the enclosing jax.shard_map (a str, or a tuple of distinct ones)"
  if not all(isinstance(a, str) for a in names):
    raise TypeError(f"{expected}, got {axis_name!r}; {where}")
  if not names or len(set(names)) != len(names):
    raise ValueError(f"{expected}, got {axis_name!r}; {where}")
  try:
    sizes = [jax.lax.axis_size(a) for a in names]
  except NameError:
    raise ValueError(f"{expected}, got {axis_name!r}, which is not bound here; {where}") from None
  return names, math.prod(int(s) for s in sizes)


# ---- attention options ---------------------------------------------------------------------------------------

def max_softmax_scale(head_dim: int) -> float:
  """The largest softmax_scale whose scores cannot overflow float32 for inputs within float16's range."""
  return _F32_MAX / (max(head_dim, 1) * _MAX_HALF_INPUT**2 * _LOG2_E)


def check_softmax_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
  """The scale to use: 1/sqrt(head_dim) by default; else a static number in [float32's smallest normal number,
  max_softmax_scale(head_dim)] (the kernels take it as a float32 and scale scores by it in float32)."""
  if softmax_scale is None:
    return 1.0 / math.sqrt(head_dim)
  if not _is_number(softmax_scale):
    raise TypeError(f"{name} must be a Python float or None (a kernel compile-time constant), got "
                    f"{_got(softmax_scale)}")
  scale = _as_float(softmax_scale)
  bound = max_softmax_scale(head_dim)
  if not _F32_TINY <= scale <= bound:  # also rejects NaN
    raise ValueError(f"{name} must be a number in [{_F32_TINY:.3g}, {bound:.3g}] for head_dim={head_dim} "
                     f"(float32's smallest normal number up to float32_max / (head_dim * 65504**2 * log2(e)), above "
                     f"which scores of inputs within float16's range could overflow float32), got {softmax_scale}")
  return scale


def check_softcap(softcap) -> float:
  """0 (off), or a static number in float32's normal range (the kernels compute softcap * log2(e) in float32)."""
  if not _is_number(softcap):
    raise TypeError(f"softcap must be a Python float, got {_got(softcap)}")
  cap = _as_float(softcap)
  bound = _F32_MAX / _LOG2_E
  if cap != 0 and not _F32_TINY <= cap <= bound:  # also rejects NaN
    raise ValueError(f"softcap must be 0 (off) or a number in [{_F32_TINY:.3g}, {bound:.3g}] (float32's normal "
                     f"range: the kernels take it as a float32), got {softcap}")
  return cap


def check_scale_and_softcap(softmax_scale, softcap, head_dim: int, scale_name: str = "softmax_scale"):
  """(scale, softcap), each checked, and with softcap on their ratio: the kernels form softmax_scale / softcap in
  float32 as the tanh's argument scale, and an infinite one turns zero scores into NaN."""
  scale = check_softmax_scale(softmax_scale, head_dim, scale_name)
  cap = check_softcap(softcap)
  if cap > 0 and scale / cap > _F32_MAX:
    raise ValueError(f"{scale_name} / softcap must be at most float32's largest value {_F32_MAX:.3g} (the kernels "
                     f"compute it in float32), got {scale_name}={scale}, softcap={cap}")
  return scale, cap


def _unbounded_if_longer_than_any_sequence(w: int) -> int:
  """-1 (unbounded) for windows that reach past MAX_SEQLEN: no sequence is longer, so they exclude nothing."""
  return -1 if w >= MAX_SEQLEN else w


def check_window(window_size, causal) -> tuple[int, int]:
  """Returns (left, right) in FlashAttention's convention (-1 = unbounded), with causal folded in (right = 0)."""
  causal = check_bool("causal", causal)
  if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
      or not all(_is_int(w) for w in window_size)):
    raise TypeError(f"window_size must be a pair of ints (left, right), got {_shown(window_size)}")
  left, right = (int(w) for w in window_size)
  if left < -1 or right < -1:
    raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {(left, right)}")
  if causal:
    if right > 0:
      raise ValueError(f"causal=True allows no keys to the right of the diagonal, but window_size has right={right};"
                       f" pass window_size=({left}, 0) or ({left}, -1) with causal=True, or causal=False")
    right = 0
  return _unbounded_if_longer_than_any_sequence(left), _unbounded_if_longer_than_any_sequence(right)


def check_local_window_size(local_window_size) -> tuple[int | None, int | None]:
  """jax.nn's local_window_size: None (no window), an int w (= (w, w)) or a pair (left, right) of ints >= 0."""
  if local_window_size is None:
    return None, None
  pair = (local_window_size, local_window_size) if _is_int(local_window_size) else local_window_size
  if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_int(w) for w in pair):
    raise TypeError(f"local_window_size must be None, an int or a pair (left, right) of ints, got "
                    f"{_shown(local_window_size)}")
  if pair[0] < 0 or pair[1] < 0:
    raise ValueError(f"local_window_size must be None, an int >= 0 or a pair (left, right) of ints >= 0, got "
                     f"{local_window_size!r}")
  return int(pair[0]), int(pair[1])


def check_attention_chunk(attention_chunk) -> int:
  """A static int >= 0 (0: no chunks). Chunks longer than MAX_SEQLEN become MAX_SEQLEN, which has the same
  effect (one chunk holds every key, and rows at negative positions see none) and keeps the chunk arithmetic
  within int32."""
  return min(check_int("attention_chunk", attention_chunk, 0), MAX_SEQLEN)


def check_sinks(sinks, heads: int):
  """None, or the learnable sink logits: a floating (heads,) array (traced or not), as float32 (its gradient
  converts back to the given dtype)."""
  if sinks is None:
    return None
  check_is_array("sinks", sinks)
  if not jnp.issubdtype(sinks.dtype, jnp.floating) or tuple(sinks.shape) != (heads,):
    raise ValueError(f"sinks must be a floating array of shape (heads,) = ({heads},) (one logit per query head), "
                     f"got {_dtype_name(sinks)} {tuple(sinks.shape)}")
  return jnp.asarray(sinks).astype(jnp.float32)


def attention_config(head_dim: int, softmax_scale, causal, window_size, softcap, deterministic,
                     attention_chunk=0) -> AttentionConfig:
  """The checked AttentionConfig for FlashAttention-style arguments (window -1 = unbounded, causal = right 0)."""
  left, right = check_window(window_size, causal)
  scale, cap = check_scale_and_softcap(softmax_scale, softcap, head_dim)
  return AttentionConfig(softmax_scale=scale, window_left=None if left < 0 else left,
                         window_right=None if right < 0 else right, softcap=cap,
                         deterministic=check_bool("deterministic", deterministic),
                         attention_chunk=check_attention_chunk(attention_chunk))


# ---- transformations -----------------------------------------------------------------------------------------

def first_order_only(fn):
  """fn, the computation of a custom_vjp's forward or backward rule, wrapped so that differentiating it raises
  NotImplementedError.

  grad of grad, jvp / jacfwd of grad and hessians differentiate those rules, whose kernels (and their
  custom_partitioning wrappers) have no derivative rules; without this they fail deep inside JAX. A custom_jvp
  rule is consulted by every form of differentiation, under jit too, and costs nothing otherwise.
  """
  wrapped = jax.custom_jvp(fn)

  @wrapped.defjvp
  def _second_order(primals, tangents):
    raise NotImplementedError(
        "second-order derivatives of fa3_jax attention (jax.grad of jax.grad, jax.jvp / jacfwd of jax.grad, "
        "jax.hessian) are not supported: the kernels and their partitioning wrappers have first-order rules only. "
        "Differentiate attention once, or use jax.nn.dot_product_attention where higher-order derivatives are "
        "needed")

  return wrapped
