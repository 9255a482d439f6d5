"""Small split-KV decode for compute-sanitizer: contiguous (seqused_k) and leftpad (packed keys), splits 1 and 5."""
import numpy as np, jax, jax.numpy as jnp
import fa3_jax
rng = np.random.default_rng(2)
b, cap, h, hk, d = 3, 700, 8, 2, 128
q = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.bfloat16)
kc, vc = (jnp.asarray(rng.standard_normal((b, cap, hk, d)), jnp.bfloat16) for _ in range(2))
lens = jnp.asarray([1, 300, 699], jnp.int32)
left = jnp.asarray([0, 7, 200], jnp.int32)
outs = {}
for n in (1, 5):
  for lp in (None, left):
    outs[n, lp is None] = np.asarray(jax.jit(lambda q, kc, vc, lens, lp=lp, n=n: fa3_jax.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=lens, cache_leftpad=lp, causal=True, num_splits=n))(q, kc, vc, lens), np.float32)
ok = all(np.isfinite(o).all() for o in outs.values())
diff = max(float(np.abs(outs[5, c] - outs[1, c]).max()) for c in (True, False))
print("split smoke ok", ok and diff < 2e-2, "max |split - unsplit|", diff)
