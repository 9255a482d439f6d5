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
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fa3_jax import _ops
from fa3_jax import context_parallel
from fa3_jax._config import AttentionConfig

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
  """Mesh axes over which batch, sequence, q heads and kv heads are sharded, plus the mesh axis sizes."""
  batch: tuple[str, ...]
  seq: tuple[str, ...]
  heads: tuple[str, ...]
  kv_heads: tuple[str, ...]
  sizes: tuple[tuple[str, int], ...]

  def size(self, axes) -> int:
    sizes = dict(self.sizes)
    return math.prod(sizes[a] for a in axes)

  @property
  def q_spec(self):
    return P(_entry(self.batch), _entry(self.seq), _entry(self.heads), None)

  @property
  def kv_spec(self):
    return P(_entry(self.batch), _entry(self.seq), _entry(self.kv_heads), None)

  @property
  def lse_spec(self):
    return P(_entry(self.batch), _entry(self.heads), _entry(self.seq))

  @property
  def trivial(self) -> bool:
    return not (self.batch or self.seq or self.heads)


def plan(q_spec, mesh_shape, q_shape, k_shape) -> Layout:
  """Layout from q's partition spec: axes that do not divide their dimension are dropped (XLA then gathers that
  dimension), a sharded head_dim is gathered, and K/V heads follow q's heads when they divide evenly."""
  spec = tuple(q_spec) + (None,) * (4 - len(tuple(q_spec)))
  sizes = {a: int(s) for a, s in dict(mesh_shape).items()}
  b, sq, h, _ = q_shape
  sk, hk = k_shape[1], k_shape[2]

  def take(entry, *dims):
    axes = tuple(a for a in _entry_axes(entry) if sizes.get(a, 1) > 1)
    n = math.prod(sizes[a] for a in axes)
    return axes if all(d % n == 0 for d in dims) else ()

  batch = take(spec[0], b)
  seq = take(spec[1], sq, sk)
  heads = take(spec[2], h)
  kv_heads = heads if hk % math.prod(sizes[a] for a in heads) == 0 else ()
  return Layout(batch, seq, heads, kv_heads, tuple(sorted(sizes.items())))


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


def _select_kv(x, layout: Layout, sel: _KvSelection):
  if sel.expand > 1:
    x = jnp.repeat(x, sel.expand, axis=2)
  return jax.lax.dynamic_slice_in_dim(x, _kv_start(layout, sel), sel.count, axis=2)


def _unselect_kv_grad(dx, like, layout: Layout, sel: _KvSelection):
  b, t, hk, d = like.shape
  full = jnp.zeros((b, t, hk * sel.expand, d), jnp.float32)
  full = jax.lax.dynamic_update_slice_in_dim(full, dx.astype(jnp.float32), _kv_start(layout, sel), axis=2)
  if sel.expand > 1:
    full = full.reshape(b, t, hk, sel.expand, d).sum(axis=3)
  return jax.lax.psum(full, layout.heads).astype(like.dtype)


def _seq_axis(layout: Layout):
  return _entry(layout.seq)


def local_fwd(q, k, v, cfg: AttentionConfig, layout: Layout):
  """(out, lse) of one shard."""
  sel = _kv_selection(layout, q.shape[2] * layout.size(layout.heads), k.shape[2])
  if sel is not None:
    k, v = _select_kv(k, layout, sel), _select_kv(v, layout, sel)
  if layout.seq:
    return context_parallel.sequence_parallel_forward(q, k, v, cfg, _seq_axis(layout))
  return _ops.attention_fwd(q, k, v, cfg)


def local_bwd(dout, q, k, v, out, lse, dlse, cfg: AttentionConfig, layout: Layout):
  """(dq, dk, dv) of one shard; dlse (lse's cotangent) may be None."""
  sel = _kv_selection(layout, q.shape[2] * layout.size(layout.heads), k.shape[2])
  ks, vs = (k, v) if sel is None else (_select_kv(k, layout, sel), _select_kv(v, layout, sel))
  if layout.seq:
    dq, dk, dv = context_parallel.sequence_parallel_backward(dout, q, ks, vs, out, lse, cfg, _seq_axis(layout),
                                                             dlse=dlse)
  else:
    dq, dk, dv = _ops.attention_bwd(dout, q, ks, vs, out, lse, cfg, dlse=dlse)
  if sel is not None:
    dk, dv = _unselect_kv_grad(dk, k, layout, sel), _unselect_kv_grad(dv, v, layout, sel)
  return dq, dk, dv


# ---- Explicit mesh axes: shard_map with specs from the types ---------------------------------------------------

def _explicit_layout(q, k):
  """The Layout when q's type carries Explicit-axis sharding, else None."""
  t = jax.typeof(q)
  mesh = t.sharding.mesh
  if mesh.empty or not mesh._any_axis_explicit:
    return None
  explicit = set(mesh.explicit_axes)
  spec = tuple(P(*[tuple(a for a in _entry_axes(e) if a in explicit) or None for e in t.sharding.spec]))
  layout = plan(spec, mesh.shape, q.shape, k.shape)
  return None if layout.trivial else (mesh, layout)


def _reshard(x, spec):
  return x if jax.typeof(x).sharding.spec == spec else jax.sharding.reshard(x, spec)


def _explicit_fwd(mesh, layout, q, k, v, cfg):
  body = functools.partial(local_fwd, cfg=cfg, layout=layout)
  q, k, v = _reshard(q, layout.q_spec), _reshard(k, layout.kv_spec), _reshard(v, layout.kv_spec)
  return jax.shard_map(body, mesh=mesh, in_specs=(layout.q_spec, layout.kv_spec, layout.kv_spec),
                       out_specs=(layout.q_spec, layout.lse_spec))(q, k, v)


def _explicit_bwd(mesh, layout, dout, q, k, v, out, lse, dlse, cfg):
  originals = [jax.typeof(x).sharding.spec for x in (q, k, v)]
  specs = [layout.q_spec, layout.q_spec, layout.kv_spec, layout.kv_spec, layout.q_spec, layout.lse_spec]
  args = [_reshard(x, s) for x, s in zip((dout, q, k, v, out, lse), specs)]
  if dlse is not None:
    args.append(_reshard(dlse, layout.lse_spec))
    specs.append(layout.lse_spec)
  body = lambda *a: local_bwd(*a[:6], a[6] if len(a) > 6 else None, cfg=cfg, layout=layout)
  grads = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs),
                        out_specs=(layout.q_spec, layout.kv_spec, layout.kv_spec))(*args)
  # Cotangents must carry their primals' types (shardings included).
  return tuple(_reshard(g, s) for g, s in zip(grads, originals))


# ---- Auto mesh axes: custom_partitioning with a Shardy rule ------------------------------------------------

def _named(sharding):
  """A NamedSharding's spec, or None for anything else (then the call is planned as unsharded)."""
  return sharding.spec if isinstance(sharding, NamedSharding) else None


def _layout_from(mesh, arg_shapes):
  spec = _named(arg_shapes[0].sharding)
  return plan(spec if spec is not None else P(), mesh.shape, arg_shapes[0].shape, arg_shapes[1].shape)


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


def _fwd_rule(cfg, mesh, operand_types, result_types):
  hq, hkv, sizes = _heads_factors(mesh, operand_types[0].shape[2], operand_types[1].shape[2])
  # Special factors must be listed in order of first appearance (docs/integration.md §5.5).
  return (f"b s {hq} d, b t {hkv} d, b t {hkv} e -> b s {hq} e, b {hq} s",
          {**sizes, "need_replication_factors": ("d", "e")})


def _fwd_partition(cfg, mesh, arg_shapes, result_shape):
  layout = _layout_from(mesh, arg_shapes)
  s = lambda spec: NamedSharding(mesh, spec)
  lower = functools.partial(local_fwd, cfg=cfg, layout=layout)
  return (mesh, lower, (s(layout.q_spec), s(layout.lse_spec)),
          (s(layout.q_spec), s(layout.kv_spec), s(layout.kv_spec)))


def _partitioned_fwd(cfg, q, k, v):
  return tuple(local_fwd(q, k, v, cfg, plan(P(), {}, q.shape, k.shape)))


_partitioned_fwd = custom_partitioning(_partitioned_fwd, static_argnums=(0,))
_partitioned_fwd.def_partition(_fwd_partition, sharding_rule=_fwd_rule)


def _bwd_rule(cfg, with_dlse, mesh, operand_types, result_types):
  # operands: dout, q, k, v, out, lse[, dlse]; results: dq, dk, dv
  hq, hkv, sizes = _heads_factors(mesh, operand_types[1].shape[2], operand_types[2].shape[2])
  operands = f"b s {hq} e, b s {hq} d, b t {hkv} d, b t {hkv} e, b s {hq} e, b {hq} s"
  if with_dlse:
    operands += f", b {hq} s"
  return (operands + f" -> b s {hq} d, b t {hkv} d, b t {hkv} e",
          {**sizes, "need_replication_factors": ("e", "d")})


def _bwd_partition(cfg, with_dlse, mesh, arg_shapes, result_shape):
  layout = _layout_from(mesh, arg_shapes[1:])
  s = lambda spec: NamedSharding(mesh, spec)
  q_s, kv_s, lse_s = s(layout.q_spec), s(layout.kv_spec), s(layout.lse_spec)

  def lower(dout, q, k, v, out, lse, *dlse):
    return local_bwd(dout, q, k, v, out, lse, dlse[0] if dlse else None, cfg, layout)

  args = (q_s, q_s, kv_s, kv_s, q_s, lse_s) + ((lse_s,) if with_dlse else ())
  return mesh, lower, (q_s, kv_s, kv_s), args


def _partitioned_bwd(cfg, with_dlse, dout, q, k, v, out, lse, *dlse):
  return tuple(local_bwd(dout, q, k, v, out, lse, dlse[0] if dlse else None, cfg, plan(P(), {}, q.shape, k.shape)))


_partitioned_bwd = custom_partitioning(_partitioned_bwd, static_argnums=(0, 1))
_partitioned_bwd.def_partition(_bwd_partition, sharding_rule=_bwd_rule)


# ---- entry points used by the custom_vjps -------------------------------------------------------------------

def _inside_shard_map() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and bool(mesh.manual_axes)


def attention_fwd(q, k, v, cfg: AttentionConfig):
  """(out, lse) of the global problem, computed shard by shard wherever the inputs are sharded."""
  if not ENABLED or _inside_shard_map():
    return _ops.attention_fwd(q, k, v, cfg)
  explicit = _explicit_layout(q, k)
  if explicit is not None:
    return _explicit_fwd(*explicit, q, k, v, cfg)
  # custom_partitioning has no batching rule: fold vmap into batch / heads around it (docs/integration.md §4.5).
  op = _ops.fold_vmap(functools.partial(_partitioned_fwd, cfg), _ops.fwd_fold_into_heads)
  return tuple(op(q, k, v))


def attention_bwd(dout, q, k, v, out, lse, cfg: AttentionConfig, dlse=None):
  """(dq, dk, dv) of the global problem, shard by shard; dlse (the lse cotangent) is optional."""
  if not ENABLED or _inside_shard_map():
    return _ops.attention_bwd(dout, q, k, v, out, lse, cfg, dlse=dlse)
  explicit = _explicit_layout(q, k)
  if explicit is not None:
    return _explicit_bwd(*explicit, dout, q, k, v, out, lse, dlse, cfg)
  args = (dout, q, k, v, out, lse) + (() if dlse is None else (dlse,))
  op = _ops.fold_vmap(functools.partial(_partitioned_bwd, cfg, dlse is not None))
  return tuple(op(*args))
