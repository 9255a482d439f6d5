# One implementation's jitted forward, 3 calls, for ncu (the harness's inputs: 16k tokens, hidden 2048, bf16).
import functools, sys
import jax, jax.numpy as jnp
sys.path.insert(0, ".")
from fa3_jax import benchmark
impl, d, s, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
att = benchmark.implementations([impl])[impl]
b, h = 16384 // s, 2048 // d
keys = jax.random.split(jax.random.PRNGKey(0), 3)
q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys)
f = jax.jit(functools.partial(att, causal=causal))
for _ in range(3):
  jax.block_until_ready(f(q, k, v))
