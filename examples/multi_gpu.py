"""Multi-device attention with fa3_jax: a data + head parallel training step, and a context-parallel (ring)
long-sequence forward/backward. Runs on 1..N GPUs, or on fake CPU devices:

  python examples/multi_gpu.py                    # all visible GPUs
  python examples/multi_gpu.py --cpu-devices 8    # 8 fake CPU devices (pure-JAX reference path)
"""

import argparse
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fa3_jax
from fa3_jax import context_parallel


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


def data_and_head_parallel_step(n):
  """Batch sharded over 'dp', heads over 'tp': plain jit, the attention runs on local shards with no gathering."""
  dp = 2 if n % 2 == 0 else 1
  tp = n // dp
  mesh = jax.make_mesh((dp, tp), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
  heads, kv_heads, head_dim, d_model = 4 * tp, 2 * tp, 64, 256
  params = init_params(jax.random.PRNGKey(0), d_model, heads, kv_heads, head_dim)
  head_sharded = {"wq": P(None, "tp"), "wk": P(None, "tp"), "wv": P(None, "tp"), "wo": P("tp")}
  params = {k: jax.device_put(v, NamedSharding(mesh, head_sharded[k])) for k, v in params.items()}
  x = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (2 * dp, 256, d_model)), NamedSharding(mesh, P("dp")))

  @jax.jit
  def step(params, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((attention_layer(p, x) - x) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads), loss

  for i in range(3):
    params, loss = step(params, x)
    print(f"  step {i}: loss {float(loss):.4f}")
  print(f"  wq sharding after the step: {params['wq'].sharding.spec}")


def context_parallel_forward_backward(n, seqlen):
  """The sequence sharded over 'sp' with zig-zag load balancing; K/V travel around the ring."""
  mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
  heads, kv_heads, head_dim = 8, 2, 64
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(ks[0], (1, seqlen, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(ks[1], (1, seqlen, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(ks[2], (1, seqlen, kv_heads, head_dim), jnp.bfloat16)
  # Reorder once at the model input (in a real model: token ids and positions), then shard the sequence.
  seq = NamedSharding(mesh, P(None, "sp"))
  q, k, v = (jax.device_put(context_parallel.zigzag_reorder(x, n), seq) for x in (q, k, v))

  ring = jax.shard_map(
      lambda q, k, v: context_parallel.context_parallel_attention(q, k, v, "sp", causal=True, layout="zigzag"),
      mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))

  @jax.jit
  def loss_and_grads(q, k, v):
    return jax.value_and_grad(lambda q, k, v: jnp.mean(ring(q, k, v).astype(jnp.float32) ** 2),
                              argnums=(0, 1, 2))(q, k, v)

  loss, (dq, dk, dv) = loss_and_grads(q, k, v)
  out = context_parallel.zigzag_restore(jax.jit(ring)(q, k, v), n)  # back to natural order
  print(f"  seqlen {seqlen} over {n} devices: loss {float(loss):.5f}, out {out.shape} {out.dtype}, "
        f"dk sharding {dk.sharding.spec}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cpu-devices", type=int, default=0, help="use this many fake CPU devices")
  parser.add_argument("--seqlen", type=int, default=0, help="context-parallel sequence length (default 32768; CPU 512)")
  args = parser.parse_args()
  if args.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  n = len(jax.devices())
  print(f"{n} x {jax.devices()[0].device_kind}; CUDA kernels built: {fa3_jax.kernel_available(jnp.bfloat16, 64)}")
  print("data + head parallel training step:")
  data_and_head_parallel_step(n)
  print("context-parallel forward/backward:")
  context_parallel_forward_backward(n, args.seqlen or (512 if args.cpu_devices else 32768))
  return 0


if __name__ == "__main__":
  sys.exit(main())
