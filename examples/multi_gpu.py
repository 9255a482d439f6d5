"""Multi-device attention with fa3_jax: a data + head parallel training step, and a context-parallel (ring)
long-sequence forward/backward, each checked against the same computation on one device. Runs on 1..N GPUs, or on
fake CPU devices (pure-JAX reference path, small sizes that finish in seconds):

  python examples/multi_gpu.py                                                      # all visible GPUs
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/multi_gpu.py   # 8 fake CPU devices
  python examples/multi_gpu.py --cpu-devices 8                                      # the same, from a GPU machine

Prints PASS or FAIL per check and overall; exits 1 on FAIL.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import context_parallel
from fa3_jax import testing

# The sharded step runs the same per-head math as the single-device one; only float32 reduction order may differ.
LOSS_RTOL = 1e-3
START = time.perf_counter()


def log(message: str) -> None:
  print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def verdict(passed: bool, message: str) -> bool:
  log(f"  {'PASS' if passed else 'FAIL'} {message}")
  return passed


def init_params(key, d_model, heads, kv_heads, head_dim):
  ks = jax.random.split(key, 4)
  w = lambda k, shape: jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(shape[0])
  return dict(wq=w(ks[0], (d_model, heads, head_dim)), wk=w(ks[1], (d_model, kv_heads, head_dim)),
              wv=w(ks[2], (d_model, kv_heads, head_dim)), wo=w(ks[3], (heads, head_dim, d_model)))


def attention_layer(params, x):
  """x: (batch, seq, d_model) -> (batch, seq, d_model); causal GQA self-attention in bfloat16."""
  proj = lambda w: jnp.einsum("bsm,mhd->bshd", x, w).astype(jnp.bfloat16)
  out = fa3_jax.flash_attn_func(proj(params["wq"]), proj(params["wk"]), proj(params["wv"]), causal=True)
  return jnp.einsum("bshd,hdm->bsm", out.astype(jnp.float32), params["wo"])


def data_and_head_parallel_step(n, seqlen) -> bool:
  """Batch sharded over 'dp', heads over 'tp': plain jit, the attention runs on local shards with no gathering.
  x: (2 * dp, seqlen, d_model); the losses of 3 steps must match the same steps on one device to LOSS_RTOL."""
  dp = 2 if n % 2 == 0 else 1
  tp = n // dp
  mesh = jax.make_mesh((dp, tp), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
  heads, kv_heads, head_dim, d_model = 4 * tp, 2 * tp, 64, 256
  log(f"  mesh dp={dp} x tp={tp}: batch {2 * dp}, seqlen {seqlen}, {heads} heads ({kv_heads} kv heads), "
      f"d_model {d_model}")
  params = init_params(jax.random.PRNGKey(0), d_model, heads, kv_heads, head_dim)
  x = jax.random.normal(jax.random.PRNGKey(1), (2 * dp, seqlen, d_model))
  head_sharded = {"wq": P(None, "tp"), "wk": P(None, "tp"), "wv": P(None, "tp"), "wo": P("tp")}

  @jax.jit
  def step(params, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((attention_layer(p, x) - x) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads), loss

  def run(params, x, where):
    losses = []
    for i in range(3):
      params, loss = step(params, x)
      losses.append(float(loss))
      log(f"  {where} step {i}: loss {losses[-1]:.4f}" + (" (includes compilation)" if i == 0 else ""))
    return params, np.array(losses)

  sharded, losses = run({k: jax.device_put(v, NamedSharding(mesh, head_sharded[k])) for k, v in params.items()},
                        jax.device_put(x, NamedSharding(mesh, P("dp"))), "sharded")
  log(f"  wq sharding after the steps: {sharded['wq'].sharding.spec}")
  device = jax.devices()[0]
  _, single = run(jax.device_put(params, device), jax.device_put(x, device), "one-device")
  err = float(np.max(np.abs(losses - single) / np.abs(single)))
  return verdict(err <= LOSS_RTOL, f"sharded losses vs one device: max relative difference {err:.2e} "
                                   f"(allowed {LOSS_RTOL:.0e})")


def context_parallel_forward_backward(n, seqlen) -> bool:
  """The sequence sharded over 'sp' with zig-zag load balancing; K/V travel around the ring. q (1, seqlen, 8, 64),
  k/v (1, seqlen, 2, 64), bfloat16. out, dq, dk, dv are checked with FlashAttention-3's rule against float32
  attention on the whole sequence, with flash_attn_func on one device as the baseline: the ring's error may be at
  most 2x the single-device error plus bfloat16's rounding noise."""
  mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
  heads, kv_heads, head_dim = 8, 2, 64
  log(f"  seqlen {seqlen} over {n} devices ({seqlen // n} tokens each), {heads} heads ({kv_heads} kv heads), "
      f"head_dim {head_dim}")
  ks = jax.random.split(jax.random.PRNGKey(2), 4)
  q = jax.random.normal(ks[0], (1, seqlen, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, seqlen, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, seqlen, kv_heads, head_dim), jnp.bfloat16)
  dout = jax.random.normal(ks[3], (1, seqlen, heads, head_dim), jnp.float32)
  # Reorder once at the model input (in a real model: token ids and positions), then shard the sequence.
  seq = NamedSharding(mesh, P(None, "sp"))
  reorder = lambda x: jax.device_put(context_parallel.zigzag_reorder(x, n), seq)
  restore = lambda x: context_parallel.zigzag_restore(x, n)  # back to natural order

  ring = jax.shard_map(
      lambda q, k, v: context_parallel.context_parallel_attention(q, k, v, "sp", causal=True, layout="zigzag"),
      mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))

  def out_and_grads(attention, q, k, v, dout):
    """attention(q, k, v) and the gradients of sum(out * dout) with respect to q, k, v."""
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(dout.astype(out.dtype)))

  log("  ring attention, forward and backward (compiling, then running)")
  results = jax.jit(lambda *xs: out_and_grads(ring, *xs))(*(reorder(x) for x in (q, k, v, dout)))
  log(f"  done: out {results[0].shape} {results[0].dtype}, dk sharding {results[2].sharding.spec}")
  results = [restore(x) for x in results]
  log("  the same on one device, and the float32 reference")
  single = jax.jit(lambda *xs: out_and_grads(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True), *xs))
  baseline = single(q, k, v, dout)
  f32 = lambda x: x.astype(jnp.float32)
  reference = lambda q, k, v: fa3_jax.dot_product_attention(f32(q), f32(k), f32(v), is_causal=True)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(lambda *xs: out_and_grads(reference, *xs))(q, k, v, dout)
  checks = [testing.fa3_check(name, got, r, b, softcap=False, gradient=name != "out")
            for name, got, r, b in zip(("out", "dq", "dk", "dv"), results, ref, baseline)]
  return all([verdict(passed, f"ring {message}") for passed, message in checks])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cpu-devices", type=int, default=0, help="use this many fake CPU devices")
  parser.add_argument("--seqlen", type=int, default=0,
                      help="context-parallel sequence length (default 32768 on GPUs, 512 otherwise)")
  args = parser.parse_args(argv)
  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  on_gpu = jax.default_backend() == "gpu"
  n = len(jax.devices())
  log(f"{n} x {jax.devices()[0].device_kind}; CUDA kernels built: {fa3_jax.kernel_available(jnp.bfloat16, 64)}"
      + ("" if on_gpu else " (no GPU: the pure-JAX reference path, at small sizes)"))
  log("data + head parallel training step:")
  passed = data_and_head_parallel_step(n, seqlen=256)
  log("context-parallel forward/backward:")
  passed &= context_parallel_forward_backward(n, args.seqlen or (32768 if on_gpu else 512))
  print("PASS" if passed else "FAIL")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
