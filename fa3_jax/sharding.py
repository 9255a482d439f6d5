"""Sharded attention without gathering: the ops run on local shards over batch and heads, and a sharded sequence
axis switches to context parallelism (ring attention, see context_parallel.py).

A bare custom call is opaque to XLA's partitioner, which all-gathers every operand and runs the whole problem on
every device (docs/integration.md §5.1). Three situations, decided at trace time:

- Inside a user's `shard_map` (manual axes): the operands already are local shards; call the ops directly.
- Explicit mesh axes (`jax.make_mesh` default) on q's type: the specs are known while tracing; `shard_map` the
  local computation with specs derived from q's (K/V are resharded to match, which is a local slice when they
  arrive replicated).
- Otherwise (Auto axes, `jit(in_shardings=...)`): `custom_partitioning` with a Shardy `sharding_rule`; the
  `partition` callback sees the operands' shardings at compile time, derives K/V's from q's rather than trusting
  them, and lowers the same local computation per shard.

GQA/MQA under head sharding: K/V heads are sharded with q's heads when kv_heads divides evenly over the head shards;
otherwise K/V stay replicated over those axes and every shard slices (or, for groups split unevenly, expands) the
kv heads its query heads read, by `axis_index`; their gradients are summed over the head axes (a reduction that
any layout needs, since several shards then read the same kv head).

Packed calls (cu_seqlens on a side) shard over heads only: their sequences run along the token axes, so those, the
batch and the cu_seqlens / seqused arrays stay replicated (docs/integration.md §4.8). Layouts that keep sequence b
in batch entry b on both sides (`SequenceLayout.batch_aligned`: seqused only, as jax.nn's lengths and KV caches
give, or segment ids) shard over batch and heads, their arrays split with the batch; a segmented shard packs its own
rows (`_ops.attention_fwd`). Paged layouts (KV caches in pages that any sequence may own) shard over heads only,
the pages and their table replicated. Only uniform calls without attention_chunk shard the sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fa3_jax import _ops
from fa3_jax import context_parallel
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout

# Private switch for tests and debugging: False runs the ops unpartitioned (XLA then gathers, docs/integration.md §5.1).
ENABLED = True


# ---- the plan: which mesh axes shard batch, sequence and heads -----------------------------------------------

def _entry_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class Layout:
  """Mesh axes over which batch, sequence, q heads and kv heads are sharded, plus the mesh axis sizes. A packed
  side ((total, heads, dim), lse (heads, total)) has no batch or sequence axes."""
  batch: tuple[str, ...]
  seq: tuple[str, ...]
  heads: tuple[str, ...]
  kv_heads: tuple[str, ...]
  sizes: tuple[tuple[str, int], ...]
  packed_q: bool = False
  packed_k: bool = False

  def size(self, axes) -> int:
    sizes = dict(self.sizes)
    return math.prod(sizes[a] for a in axes)

  @property
  def q_spec(self):
    if self.packed_q:
      return P(None, _entry(self.heads), None)
    return P(_entry(self.batch), _entry(self.seq), _entry(self.heads), None)

  @property
  def kv_spec(self):
    if self.packed_k:
      return P(None, _entry(self.kv_heads), None)
    return P(_entry(self.batch), _entry(self.seq), _entry(self.kv_heads), None)

  @property
  def lse_spec(self):
    if self.packed_q:
      return P(_entry(self.heads), None)
    return P(_entry(self.batch), _entry(self.heads), _entry(self.seq))

  def spec_of(self, name: str):
    """The spec of the tensor an op table names (`_ops.TENSOR_KINDS`)."""
    kind = _ops.TENSOR_KINDS[name][0]
    return self.lse_spec if kind == "lse" else self.q_spec if kind == "q" else self.kv_spec

  @property
  def sequences_spec(self):
    """The sequence layout's arrays: split with the batch where it shards (batch-aligned layouts: seqused (batch,),
    segment ids (batch, seqlen)), else replicated (a packed layout never shards the batch)."""
    return P(_entry(self.batch)) if self.batch else P()

  @property
  def trivial(self) -> bool:
    return not (self.batch or self.seq or self.heads)


def sequence_shardable(cfg: AttentionConfig, sequences: SequenceLayout) -> bool:
  """Whether the sequence axis may shard (context parallelism): uniform layouts without chunks only. The ring's
  per-pair windows cannot express chunk boundaries, so a chunked call gathers the sequence instead."""
  return sequences.uniform and not cfg.attention_chunk


def plan(q_spec, mesh_shape, q_shape, k_shape, sequences: SequenceLayout, cfg: AttentionConfig) -> Layout:
  """Layout from q's partition spec: axes that do not divide their dimension are dropped (XLA then gathers that
  dimension), a sharded head_dim is gathered, and K/V heads follow q's heads when they divide evenly. Only
  sequence_shardable calls shard the sequence, and a packed layout shards only the heads."""
  spec = tuple(q_spec) + (None,) * (len(q_shape) - len(tuple(q_spec)))
  sizes = {a: int(s) for a, s in dict(mesh_shape).items()}
  h, hk = q_shape[-2], k_shape[-2]

  def take(entry, *dims):
    axes = tuple(a for a in _entry_axes(entry) if sizes.get(a, 1) > 1)
    n = math.prod(sizes[a] for a in axes)
    return axes if all(d % n == 0 for d in dims) else ()

  shardable = sequence_shardable(cfg, sequences)
  batch = take(spec[0], q_shape[0]) if sequences.batch_aligned else ()
  seq = take(spec[1], q_shape[1], k_shape[1]) if shardable else ()
  heads = take(spec[-2], h)
  kv_heads = heads if hk % math.prod(sizes[a] for a in heads) == 0 else ()
  return Layout(batch, seq, heads, kv_heads, tuple(sorted(sizes.items())), sequences.packed_q, sequences.packed_k)


# ---- the local computation (one shard), shared by the shard_map and custom_partitioning layers -------------

@dataclasses.dataclass(frozen=True)
class _KvSelection:
  """How a head shard picks its kv heads from replicated K/V: repeat each kv head `expand` times, then take `count`
  heads starting at (shard * local_heads) // group."""
  expand: int
  group: int
  count: int
  local_heads: int


def _kv_selection(layout: Layout, heads: int, kv_heads: int) -> _KvSelection | None:
  if not layout.heads or layout.kv_heads:
    return None
  local = heads // layout.size(layout.heads)
  g = heads // kv_heads
  expand = 1 if g % local == 0 else g  # a shard's q heads within one group: one kv head; else go per-head (MHA)
  group = heads // (kv_heads * expand)
  return _KvSelection(expand, group, max(1, local // group), local)


def _kv_start(layout: Layout, sel: _KvSelection):
  return (jax.lax.axis_index(layout.heads) * sel.local_heads) // sel.group


# K/V's heads are their second-to-last axis, BSHD or packed.

def _select_kv(x, layout: Layout, sel: _KvSelection):
  if sel.expand > 1:
    x = jnp.repeat(x, sel.expand, axis=-2)
  return jax.lax.dynamic_slice_in_dim(x, _kv_start(layout, sel), sel.count, axis=x.ndim - 2)


def _unselect_kv_grad(dx, like, layout: Layout, sel: _KvSelection):
  *rows, hk, d = like.shape
  full = jnp.zeros((*rows, hk * sel.expand, d), jnp.float32)
  full = jax.lax.dynamic_update_slice_in_dim(full, dx.astype(jnp.float32), _kv_start(layout, sel), axis=len(rows))
  if sel.expand > 1:
    full = full.reshape(*rows, hk, sel.expand, d).sum(axis=-2)
  return jax.lax.psum(full, layout.heads).astype(like.dtype)


def _seq_axis(layout: Layout):
  return _entry(layout.seq)


def local_fwd(q, k, v, sequences: SequenceLayout, cfg: AttentionConfig, layout: Layout):
  """(out, lse) of one shard."""
  sel = _kv_selection(layout, q.shape[-2] * layout.size(layout.heads), k.shape[-2])
  if sel is not None:
    k, v = _select_kv(k, layout, sel), _select_kv(v, layout, sel)
  if layout.seq:
    return context_parallel.sequence_parallel_forward(q, k, v, cfg, _seq_axis(layout))
  return _ops.attention_fwd(q, k, v, cfg, sequences)


def local_bwd(dout, q, k, v, out, lse, dlse, sequences: SequenceLayout, cfg: AttentionConfig, layout: Layout):
  """(dq, dk, dv) of one shard; dlse (lse's cotangent) may be None."""
  sel = _kv_selection(layout, q.shape[-2] * layout.size(layout.heads), k.shape[-2])
  ks, vs = (k, v) if sel is None else (_select_kv(k, layout, sel), _select_kv(v, layout, sel))
  if layout.seq:
    dq, dk, dv = context_parallel.sequence_parallel_backward(dout, q, ks, vs, out, lse, cfg, _seq_axis(layout),
                                                             dlse=dlse)
  else:
    dq, dk, dv = _ops.attention_bwd(dout, q, ks, vs, out, lse, cfg, dlse=dlse, sequences=sequences)
  if sel is not None:
    dk, dv = _unselect_kv_grad(dk, k, layout, sel), _unselect_kv_grad(dv, v, layout, sel)
  return dq, dk, dv


# ---- Explicit mesh axes: shard_map with specs from the types ---------------------------------------------------

def _explicit_layout(q, k, sequences: SequenceLayout, cfg: AttentionConfig):
  """The Layout when q's type carries Explicit-axis sharding, else None."""
  t = jax.typeof(q)
  mesh = t.sharding.mesh
  if mesh.empty or not mesh._any_axis_explicit:
    return None
  explicit = set(mesh.explicit_axes)
  spec = tuple(P(*[tuple(a for a in _entry_axes(e) if a in explicit) or None for e in t.sharding.spec]))
  layout = plan(spec, mesh.shape, q.shape, k.shape, sequences, cfg)
  return None if layout.trivial else (mesh, layout)


def _reshard(x, spec, mesh):
  """x with the given spec on the mesh (P(None) and P() alike: a spec's missing trailing entries are None)."""
  have = tuple(jax.typeof(x).sharding.spec)
  pad = lambda s: tuple(s) + (None,) * (x.ndim - len(tuple(s)))
  return x if pad(have) == pad(spec) else jax.sharding.reshard(x, NamedSharding(mesh, spec))


def _resharded_sequences(sequences: SequenceLayout, layout: Layout, mesh) -> SequenceLayout:
  return jax.tree.map(lambda x: _reshard(x, layout.sequences_spec, mesh), sequences)


def _specs(layout: Layout, names) -> tuple:
  return tuple(layout.spec_of(n) for n in names)


# The backward's tensor operands: the table's, then its optional tensors (the lse cotangent), before the layout's.
_BWD_TENSORS = (*_ops.BWD.operands, *(n for n in _ops.BWD.optional if n in _ops.TENSOR_KINDS))


def _explicit_fwd(mesh, layout, q, k, v, sequences, cfg):
  body = functools.partial(local_fwd, cfg=cfg, layout=layout)
  specs = _specs(layout, _ops.FWD.operands)
  args = [_reshard(x, s, mesh) for x, s in zip((q, k, v), specs)]
  return jax.shard_map(body, mesh=mesh, in_specs=(*specs, layout.sequences_spec),
                       out_specs=_specs(layout, _ops.FWD.outputs))(*args, _resharded_sequences(sequences, layout, mesh))


def _explicit_bwd(mesh, layout, dout, q, k, v, out, lse, dlse, sequences, cfg):
  originals = [jax.typeof(x).sharding.spec for x in (q, k, v)]
  specs = _specs(layout, _BWD_TENSORS)
  args = [None if x is None else _reshard(x, s, mesh) for x, s in zip((dout, q, k, v, out, lse, dlse), specs)]
  body = functools.partial(local_bwd, cfg=cfg, layout=layout)
  grads = jax.shard_map(body, mesh=mesh, in_specs=(*specs, layout.sequences_spec),
                        out_specs=_specs(layout, _ops.BWD.outputs))(*args, _resharded_sequences(sequences, layout, mesh))
  # Cotangents must carry their primals' types (shardings included).
  return tuple(_reshard(g, s, mesh) for g, s in zip(grads, originals))


# ---- Auto mesh axes: custom_partitioning with a Shardy rule ------------------------------------------------

def _named(sharding):
  """A NamedSharding's spec, or None for anything else (then the call is planned as unsharded)."""
  return sharding.spec if isinstance(sharding, NamedSharding) else None


def _layout_from(mesh, q, k, sequences: SequenceLayout, cfg: AttentionConfig):
  """The Layout from q's sharding at compile time (q, k: the operands' shapes / shardings)."""
  spec = _named(q.sharding)
  return plan(spec if spec is not None else P(), mesh.shape, q.shape, k.shape, sequences, cfg)


def _heads_factors(mesh, h: int, hk: int):
  """Rule fragments (q heads, kv heads) and factor sizes. The compound "(hk g)" lets Shardy propagate head
  sharding between q and K/V, but for kv_heads that some mesh axis does not divide it would shard hk over a
  sub-axis, which partition callbacks cannot decode; then the two are independent factors and `partition` derives
  K/V's sharding from q's."""
  if h == hk:  # MHA: one factor (a compound factor may not have a size-1 part)
    return "h", "h", {}
  if hk % math.prod(int(s) for s in dict(mesh.shape).values()) == 0:
    return "(hk g)", "hk", {"g": h // hk}
  return "h", "hk", {}


@dataclasses.dataclass(frozen=True)
class _Factors:
  """Shardy rule fragments of one call: q-like tensors ("b s H dim", packed "s H dim"), k-like ones (paged:
  "p t H dim", pages of t rows), lse, the sequence-layout operands (cu_seqlens: batch + 1 entries, factor c;
  seqused: the batch factor b; segment ids: "b s" and "b t", q's and k's rows; page_table "b n", n pages per
  sequence), and the factors that need replication: the head dims, and under a non-uniform sequence layout the
  token axes too, and under a packed or paged one all but the heads."""
  hq: str
  hkv: str
  packed_q: bool
  packed_k: bool
  paged: bool
  sequences: tuple[str, ...]
  replicated: frozenset
  sizes: dict

  def q(self, dim: str) -> str:
    return f"{'' if self.packed_q else 'b '}s {self.hq} {dim}"

  def kv(self, dim: str) -> str:
    return f"{'' if self.packed_k else 'p ' if self.paged else 'b '}t {self.hkv} {dim}"

  @property
  def lse(self) -> str:
    return f"{self.hq} s" if self.packed_q else f"b {self.hq} s"

  def of(self, name: str) -> str:
    """The fragment of the tensor an op table names (`_ops.TENSOR_KINDS`)."""
    kind, *dim = _ops.TENSOR_KINDS[name]
    return self.lse if kind == "lse" else self.q(*dim) if kind == "q" else self.kv(*dim)

  def rule(self, operand_names, result_names):
    """The rule of an op's named tensor operands, then the sequence layout's, and its named results."""
    operands = [*(self.of(n) for n in operand_names), *self.sequences]
    rule = f"{', '.join(operands)} -> {', '.join(self.of(n) for n in result_names)}"
    # Special factors must be listed in order of first appearance (docs/integration.md §5.5).
    first = dict.fromkeys(re.findall(r"\w+", rule))
    return rule, {**self.sizes, "need_replication_factors": tuple(f for f in first if f in self.replicated)}


def _factors(mesh, q_type, k_type, sequences: SequenceLayout, cfg: AttentionConfig) -> _Factors:
  hq, hkv, sizes = _heads_factors(mesh, q_type.shape[-2], k_type.shape[-2])
  # One rule fragment per leaf of the layout, in its pytree order (the dataclass's field order).
  kinds = {"cu_seqlens_q": "c", "cu_seqlens_k": "c", "seqused_q": "b", "seqused_k": "b", "segment_ids_q": "b s",
           "segment_ids_k": "b t", "page_table": "b n"}
  operands = tuple(kinds[field.name] for field in dataclasses.fields(sequences)
                   if not field.metadata.get("static") and getattr(sequences, field.name) is not None)
  replicated = ("de" if sequence_shardable(cfg, sequences) else "dest" if sequences.batch_aligned else "debstcpn")
  return _Factors(hq, hkv, sequences.packed_q, sequences.packed_k, sequences.paged, operands, frozenset(replicated),
                  sizes)


# The partitioned functions take an op table's tensor operands (the backward's with the optional lse cotangent after
# them), then the sequence layout flattened: its treedef (static: which arrays are present, the bounds) and arrays.

def _split(names, args, tree):
  """(the tensor operands by name, the sequence layout) of a partitioned function's operands."""
  return dict(zip(names, args)), jax.tree.unflatten(tree, args[len(names):])


def _fwd_rule(cfg, tree, mesh, operand_types, result_types):
  t, sequences = _split(_ops.FWD.operands, operand_types, tree)
  return _factors(mesh, t["q"], t["k"], sequences, cfg).rule(_ops.FWD.operands, _ops.FWD.outputs)


def _fwd_partition(cfg, tree, mesh, arg_shapes, result_shape):
  t, sequences = _split(_ops.FWD.operands, arg_shapes, tree)
  layout = _layout_from(mesh, t["q"], t["k"], sequences, cfg)
  s = lambda spec: NamedSharding(mesh, spec)

  def lower(q, k, v, *leaves):
    return local_fwd(q, k, v, jax.tree.unflatten(tree, leaves), cfg, layout)

  return (mesh, lower, tuple(map(s, _specs(layout, _ops.FWD.outputs))),
          tuple(map(s, _specs(layout, _ops.FWD.operands) + (layout.sequences_spec,) * tree.num_leaves)))


def _partitioned_fwd(cfg, tree, q, k, v, *leaves):
  sequences = jax.tree.unflatten(tree, leaves)
  return tuple(local_fwd(q, k, v, sequences, cfg, plan(P(), {}, q.shape, k.shape, sequences, cfg)))


_partitioned_fwd = custom_partitioning(_partitioned_fwd, static_argnums=(0, 1))
_partitioned_fwd.def_partition(_fwd_partition, sharding_rule=_fwd_rule)


def _bwd_tensors(with_dlse: bool) -> tuple[str, ...]:
  return _BWD_TENSORS if with_dlse else _ops.BWD.operands


def _bwd_rule(cfg, with_dlse, tree, mesh, operand_types, result_types):
  t, sequences = _split(_bwd_tensors(with_dlse), operand_types, tree)
  return _factors(mesh, t["q"], t["k"], sequences, cfg).rule(_bwd_tensors(with_dlse), _ops.BWD.outputs)


def _local_bwd_of(names, args, tree, cfg, layout_of):
  """local_bwd of a partitioned backward's operands; layout_of(t, sequences) gives the shard's Layout."""
  t, sequences = _split(names, args, tree)
  return local_bwd(*(t.get(n) for n in _BWD_TENSORS), sequences, cfg, layout_of(t, sequences))


def _bwd_partition(cfg, with_dlse, tree, mesh, arg_shapes, result_shape):
  names = _bwd_tensors(with_dlse)
  t, sequences = _split(names, arg_shapes, tree)
  layout = _layout_from(mesh, t["q"], t["k"], sequences, cfg)
  s = lambda spec: NamedSharding(mesh, spec)

  def lower(*args):
    return _local_bwd_of(names, args, tree, cfg, lambda *_: layout)

  args = _specs(layout, names) + (layout.sequences_spec,) * tree.num_leaves
  return mesh, lower, tuple(map(s, _specs(layout, _ops.BWD.outputs))), tuple(map(s, args))


def _partitioned_bwd(cfg, with_dlse, tree, *args):
  return tuple(_local_bwd_of(_bwd_tensors(with_dlse), args, tree, cfg,
                             lambda t, sequences: plan(P(), {}, t["q"].shape, t["k"].shape, sequences, cfg)))


_partitioned_bwd = custom_partitioning(_partitioned_bwd, static_argnums=(0, 1, 2))
_partitioned_bwd.def_partition(_bwd_partition, sharding_rule=_bwd_rule)


# ---- entry points used by the custom_vjps -------------------------------------------------------------------

def _inside_shard_map() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and bool(mesh.manual_axes)


def attention_fwd(q, k, v, cfg: AttentionConfig, sequences: SequenceLayout = SequenceLayout()):
  """(out, lse) of the global problem, computed shard by shard wherever the inputs are sharded."""
  if not ENABLED or _inside_shard_map():
    return _ops.attention_fwd(q, k, v, cfg, sequences)
  explicit = _explicit_layout(q, k, sequences, cfg)
  if explicit is not None:
    return _explicit_fwd(*explicit, q, k, v, sequences, cfg)

  def partitioned(q, k, v, sequences):
    leaves, tree = jax.tree.flatten(sequences)
    return _partitioned_fwd(cfg, tree, q, k, v, *leaves)

  # custom_partitioning has no batching rule: fold vmap into batch / heads around it (docs/integration.md §4.5).
  return tuple(_ops.fold_vmap(partitioned, _ops.fold_fwd, _ops.fwd_fold_into_heads)(q, k, v, sequences))


def attention_bwd(dout, q, k, v, out, lse, cfg: AttentionConfig, dlse=None,
                  sequences: SequenceLayout = SequenceLayout()):
  """(dq, dk, dv) of the global problem, shard by shard; dlse (the lse cotangent) is optional."""
  if not ENABLED or _inside_shard_map():
    return _ops.attention_bwd(dout, q, k, v, out, lse, cfg, dlse=dlse, sequences=sequences)
  explicit = _explicit_layout(q, k, sequences, cfg)
  if explicit is not None:
    return _explicit_bwd(*explicit, dout, q, k, v, out, lse, dlse, sequences, cfg)

  def partitioned(dout, q, k, v, out, lse, dlse, sequences):
    leaves, tree = jax.tree.flatten(sequences)
    optional = () if dlse is None else (dlse,)
    return _partitioned_bwd(cfg, dlse is not None, tree, dout, q, k, v, out, lse, *optional, *leaves)

  return tuple(_ops.fold_vmap(partitioned, _ops.fold_bwd)(dout, q, k, v, out, lse, dlse, sequences))
