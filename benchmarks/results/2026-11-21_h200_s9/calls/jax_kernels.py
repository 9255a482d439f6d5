# Runs one implementation's jitted forward+backward (jax.vjp, as the harness times it) 3 times, for ncu.
import functools, sys
import jax, jax.numpy as jnp
sys.path.insert(0, ".")
from fa3_jax import benchmark
impl, d, s, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
att = benchmark.implementations([impl])[impl]
b, h = 16384 // s, 2048 // d
keys = jax.random.split(jax.random.PRNGKey(0), 4)
q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys)
f = jax.jit(lambda q, k, v, do: jax.vjp(functools.partial(att, causal=causal), q, k, v)[1](do))
for _ in range(3):
  jax.block_until_ready(f(q, k, v, do))
