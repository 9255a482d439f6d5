"""fa3_jax in a few lines: causal GQA attention, its lse, and gradients, checked against jax.nn."""

import jax
import jax.numpy as jnp

import fa3_jax

batch, seqlen, heads, kv_heads, head_dim = 2, 512, 8, 2, 128
kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(kq, (batch, seqlen, heads, head_dim), jnp.bfloat16)
k = jax.random.normal(kk, (batch, seqlen, kv_heads, head_dim), jnp.bfloat16)
v = jax.random.normal(kv, (batch, seqlen, kv_heads, head_dim), jnp.bfloat16)

out, lse = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True))(q, k, v)
print("out", out.shape, out.dtype, "| lse", lse.shape, lse.dtype)
print("kernel available here:", fa3_jax.kernel_available(q.dtype, head_dim),
      "| backend:", jax.default_backend())

# Same result as jax.nn (seqlen_q == seqlen_k, so top-left and bottom-right causal agree).
expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
print("max |fa3_jax - jax.nn| =", float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32)))))

loss = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True).astype(jnp.float32).sum()
dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
print("grads", dq.shape, dk.shape, dv.shape)
