# FA3's kernels (flash_attn3_jax), two fwd+bwd calls per case, for Nsight Compute (-k regex:flash, demangled names).
import functools, sys
import jax, jax.numpy as jnp
import flash_attn3_jax
for case in sys.argv[1:]:  # D,S,CAUSAL
  d, s, causal = map(int, case.split(","))
  b, h = 16384 // s, 2048 // d
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys)
  f = functools.partial(flash_attn3_jax.flash_mha, is_causal=bool(causal))
  g = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
  jax.block_until_ready(g(q, k, v, do))
  print("case", case, flush=True)
  jax.block_until_ready(g(q, k, v, do))
