"""context_parallel_attention inside jax.shard_map over a sequence axis of 4 fake CPU devices: ring and all-gather
strategies, contiguous and zig-zag layouts, causal, windows and GQA against the unsharded oracles (forward and
gradients), the collectives it issues, and composition with vmap / jit / grad."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import _extension
from fa3_jax import context_parallel as cp
from oracle import dense_attention, numpy_attention, random_qkv

N = 4


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, N), ("dp", "sp"), axis_types=(AxisType.Auto,) * 2)


def assert_close(got, want, rel=2e-3):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, atol=rel * max(1.0, float(np.abs(want).max())), rtol=0)


def sharded(mesh, layout, **kwargs):
  """Global (natural order) -> global attention, computed with the sequence sharded over 'sp' (batch over 'dp')."""
  spec = P("dp", "sp")
  f = jax.shard_map(lambda q, k, v: cp.context_parallel_attention(q, k, v, "sp", layout=layout, **kwargs),
                    mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
  if layout == "contiguous":
    return f
  return lambda q, k, v: cp.zigzag_restore(f(*(cp.zigzag_reorder(x, N) for x in (q, k, v))), N)


CASES = [  # (strategy, layout, causal, window, heads, kv_heads, seqlen_q, seqlen_k)
    ("ring", "contiguous", True, (-1, -1), 4, 4, 32, 32),
    ("ring", "zigzag", True, (-1, -1), 4, 2, 32, 32),
    ("ring", "zigzag", False, (6, 3), 4, 1, 32, 32),
    ("ring", "contiguous", False, (-1, -1), 4, 2, 16, 32),
    ("allgather", "zigzag", True, (9, -1), 4, 1, 32, 32),
    ("allgather", "contiguous", False, (-1, -1), 4, 2, 32, 16),
]


@pytest.mark.parametrize("strategy,layout,causal,window,heads,kv_heads,seqlen_q,seqlen_k", CASES)
def test_matches_unsharded_attention_and_gradients(mesh, strategy, layout, causal, window, heads, kv_heads,
                                                   seqlen_q, seqlen_k):
  q, k, v = random_qkv(7, 2, seqlen_q, seqlen_k, heads, kv_heads, 16)
  kwargs = dict(causal=causal, window_size=window)
  f = sharded(mesh, layout, strategy=strategy, **kwargs)
  assert_close(jax.jit(f)(q, k, v), numpy_attention(q, k, v, causal=causal, window=window)[0])

  dout = jax.random.normal(jax.random.PRNGKey(8), q.shape, jnp.float32)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * dout), argnums=(0, 1, 2)))(
      q, k, v)
  oracle = lambda q, k, v: jnp.sum(dense_attention(q, k, v, causal=causal, window=window) * dout)
  want = jax.grad(oracle, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
  for g, w, x in zip(grads, want, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype
    assert_close(g, w)


def test_zigzag_reorder_places_chunks_r_and_2n_minus_1_minus_r():
  x = jnp.arange(16)[None, :]
  z = cp.zigzag_reorder(x, 4)
  # 8 chunks of 2 tokens; shard r holds chunks r and 7 - r.
  assert z[0].reshape(4, 4).tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
  np.testing.assert_array_equal(cp.zigzag_restore(z, 4), x)


def compiled_ring_hlo(mesh, **kwargs):
  q, k, v = random_qkv(9, 2, 32, 32, 4, 2, 16, dtype=jnp.bfloat16)
  f = sharded(mesh, "contiguous", **kwargs)
  loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()


def test_ring_permutes_one_dtype_per_collective_and_never_gathers(mesh):
  hlo = compiled_ring_hlo(mesh, causal=True)
  permutes = re.findall(r"= (\S+) collective-permute(?:-start)?\(", hlo)
  assert permutes and not re.search(r"\ball-gather|\ball-to-all", hlo)
  for result_type in permutes:  # bf16 K/V and f32 dK/dV all travel as u16
    assert set(re.findall(r"\b(bf16|f16|f32|u16|u32|s32)\[", result_type)) == {"u16"}, result_type
  # causal chunk pairs are chosen per step at run time: skip / diagonal / full
  assert "conditional(" in hlo


def test_allgather_strategy_gathers_kv_and_reduce_scatters_grads(mesh):
  hlo = compiled_ring_hlo(mesh, causal=True, strategy="allgather")
  assert re.search(r"\ball-gather", hlo) and re.search(r"\breduce-scatter", hlo)
  assert "collective-permute" not in hlo


def test_vmap_jit_grad_compose(mesh):
  q, k, v = random_qkv(10, 2, 32, 32, 4, 2, 16)
  f = sharded(mesh, "zigzag", causal=True)
  stack = lambda x: jnp.stack([x, x[:, ::-1]])
  loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
  got = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(stack(q), stack(k), stack(v))
  for i in range(2):
    xs = [stack(x)[i].astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(lambda q, k, v: jnp.sum(dense_attention(q, k, v, causal=True) ** 2), argnums=(0, 1, 2))(*xs)
    for g, w in zip(got, want):
      assert_close(g[i], w)


def test_lse_is_returned_and_differentiable(mesh):
  q, k, v = random_qkv(11, 2, 32, 32, 2, 2, 16)
  spec = P("dp", "sp")
  body = lambda q, k, v: cp.context_parallel_attention(q, k, v, "sp", causal=True, return_lse=True)
  f = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, P("dp", None, "sp")))
  out, lse = jax.jit(f)(q, k, v)
  want_out, want_lse = numpy_attention(q, k, v, causal=True)
  assert_close(out, want_out)
  np.testing.assert_allclose(lse, want_lse, atol=1e-3)
  g = jax.jit(jax.grad(lambda q: jnp.sum(f(q, k, v)[1])))(q)
  g_ref = jax.grad(lambda q: jnp.sum(fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True)[1]))(q)
  assert_close(g, g_ref)


def test_arguments_are_validated(mesh):
  q, k, v = random_qkv(12, 2, 32, 32, 2, 2, 16)
  for kwargs, error in ((dict(layout="spiral"), "layout must be one of"),
                        (dict(strategy="tree"), "strategy must be one of")):
    f = jax.shard_map(lambda q, k, v: cp.context_parallel_attention(q, k, v, "sp", **kwargs), mesh=mesh,
                      in_specs=(P("dp", "sp"),) * 3, out_specs=P("dp", "sp"))
    with pytest.raises(ValueError, match=error):
      jax.jit(f)(q, k, v)


def test_ring_lowers_to_our_kernels_with_static_pair_windows(monkeypatch, mesh):
  kernels = frozenset((t, 64, 64) for t in ("bfloat16", "float16"))
  monkeypatch.setattr(_extension, "compiled_kernels", lambda direction: kernels)
  avals = [jax.ShapeDtypeStruct((2, 64, 4, 64), jnp.bfloat16)] * 3
  f = sharded(mesh, "zigzag", causal=True)
  loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"stablehlo.custom_call @(fa3_jax_\w+)\((.*)", text)
  assert {c[0] for c in calls} == {"fa3_jax_fwd", "fa3_jax_bwd"}
  # zig-zag chunks of 64 / 4 / 2 = 8 tokens: each pair is either full (8, 8) or the causal diagonal (8, 0).
  windows = {tuple(re.findall(r"window_(?:left|right) = (-?\d+) : i64", c[1])) for c in calls}
  assert windows == {("8", "8"), ("8", "0")}
  assert all("tensor<1x8x4x64xbf16>" in c[1] for c in calls)  # batch 2 / dp 2, one 8-token chunk


def test_multi_gpu_benchmark_script_runs_on_fake_cpu_devices(tmp_path):
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "benchmarks", "multi_gpu.py"), "--out", str(tmp_path),
         "--cpu-devices", "4", "--seqlens", "64", "--iters", "1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": root})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / "multi_gpu.json").read_text())
  assert result["env"]["devices"] == 4 and len(result["correctness"]) == 5
  assert all(r["passed"] for r in result["correctness"])
  batch_heads = result["correctness"][0]
  assert sum(batch_heads["fwd_collectives"].values()) == sum(batch_heads["grad_collectives"].values()) == 0
  assert [(r["seqlen"], r["causal"]) for r in result["timing"]] == [(64, True), (64, False)]
  assert "| 64 | True (zigzag) |" in (tmp_path / "multi_gpu.md").read_text()


# ---- argument checks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [cp.zigzag_reorder, cp.zigzag_restore])
def test_zigzag_negative_axis_and_numpy_input(fn):
  x = np.arange(2 * 16 * 3).reshape(2, 16, 3)
  want = fn(jnp.asarray(x), 4, axis=1)
  np.testing.assert_array_equal(fn(x, 4, axis=-2), want)
  np.testing.assert_array_equal(fn(np.swapaxes(x, 1, 2), 4, axis=-1), np.swapaxes(want, 1, 2))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_shards=0), ValueError, "num_shards must be an int >= 1, got 0"),
    (dict(num_shards=-2), ValueError, "num_shards must be an int >= 1, got -2"),
    (dict(num_shards=1.5), TypeError, "num_shards must be an int, got float"),
    (dict(num_shards=True), TypeError, "num_shards must be an int, got bool"),
    (dict(num_shards=2, axis=2), ValueError, r"axis must be an int in \[-2, 2\) for an array of 2 dims, got 2"),
    (dict(num_shards=2, axis=-3), ValueError, r"axis must be an int in \[-2, 2\)"),
    (dict(num_shards=2, axis=1.0), TypeError, "axis must be an int, got float"),
    (dict(num_shards=3), ValueError, r"x.shape\[1\] \(the sequence axis\) must be divisible by 2 \* num_shards = 6"),
])
@pytest.mark.parametrize("fn", [cp.zigzag_reorder, cp.zigzag_restore])
def test_zigzag_arguments_are_validated(fn, kwargs, error, match):
  with pytest.raises(error, match=match):
    fn(jnp.zeros((2, 8)), **kwargs)


@pytest.mark.parametrize("x", [[[1, 2, 3, 4]], None, 3.0])
def test_zigzag_rejects_non_arrays(x):
  with pytest.raises(TypeError, match="x must be an array"):
    cp.zigzag_reorder(x, 1)


def sharded_call(mesh, axis_name, q, k=None, v=None, **kwargs):
  k = q if k is None else k
  v = k if v is None else v
  spec = P("dp", "sp")
  f = jax.shard_map(lambda q, k, v: cp.context_parallel_attention(q, k, v, axis_name, return_lse=True, **kwargs),
                    mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, P("dp", None, "sp")))
  return jax.jit(f)(q, k, v)


@pytest.mark.parametrize("axis_name,error,match", [
    ("tp", ValueError, r"got 'tp', which is not bound here; the enclosing shard_map's axes are \('dp', 'sp'\)"),
    (None, TypeError, "got None"),
    (1, TypeError, "got 1"),
    ((), ValueError, r"got \(\)"),
    (("sp", "sp"), ValueError, r"got \('sp', 'sp'\)"),
])
def test_axis_name_must_be_an_axis_of_the_enclosing_shard_map(mesh, axis_name, error, match):
  q = jnp.zeros((2, 32, 2, 16), jnp.float16)
  with pytest.raises(error, match="axis_name must be a mesh axis of the enclosing jax.shard_map .*" + match):
    sharded_call(mesh, axis_name, q)


def test_outside_shard_map_the_error_says_so():
  q = jnp.zeros((1, 8, 2, 16), jnp.float16)
  for f in (cp.context_parallel_attention, jax.jit(cp.context_parallel_attention, static_argnums=3)):
    with pytest.raises(ValueError, match="axis_name must be a mesh axis .* no jax.shard_map encloses this call"):
      f(q, q, q, "sp")


def test_global_seqlen_above_max_is_rejected(mesh):
  spec = P(None, "sp")
  f = jax.shard_map(lambda q, k, v: cp.context_parallel_attention(q, k, v, "sp"), mesh=mesh, in_specs=(spec,) * 3,
                    out_specs=spec)
  q = jax.ShapeDtypeStruct((1, 2**29 + N, 1, 16), jnp.float16)  # every local shard is below the limit
  k = jax.ShapeDtypeStruct((1, 8, 1, 16), jnp.float16)
  with pytest.raises(ValueError, match=rf"the global seqlen_q \({N} shards x .*\) must be at most MAX_SEQLEN"):
    jax.eval_shape(f, q, k, k)


@pytest.mark.parametrize("shape_q,shape_k", [((0, 32, 2, 16), (0, 32, 2, 16)), ((2, 0, 2, 16), (2, 32, 2, 16)),
                                             ((2, 32, 2, 16), (2, 0, 2, 16)), ((2, 32, 0, 16), (2, 32, 0, 16))])
def test_empty_shards_give_zero_outputs_and_minus_inf_lse(mesh, shape_q, shape_k):
  q, k = jnp.ones(shape_q, jnp.float16), jnp.ones(shape_k, jnp.float16)
  out, lse = sharded_call(mesh, "sp", q, k, layout="zigzag")
  assert out.shape == shape_q and lse.shape == (shape_q[0], shape_q[2], shape_q[1])
  assert not np.asarray(out, np.float32).any() and (np.asarray(lse) == -np.inf).all()


def test_second_order_derivatives_raise_not_implemented(mesh):
  q, k, v = random_qkv(13, 2, 32, 32, 2, 2, 16)
  loss = lambda q: jnp.sum(sharded_call(mesh, "sp", q, k, v, causal=True)[0].astype(jnp.float32))
  with pytest.raises(NotImplementedError, match="second-order derivatives"):
    jax.grad(lambda q: jnp.sum(jax.grad(loss)(q).astype(jnp.float32)))(q)
