"""fa3_jax in a few lines: causal GQA attention, its lse, and gradients, checked against a float32 jax.nn with
FlashAttention-3's tolerance rule (fa3_jax.testing). Prints PASS or FAIL and exits 1 on FAIL."""

import math
import sys

import jax
import jax.numpy as jnp

import fa3_jax
from fa3_jax import testing
from fa3_jax._config import AttentionConfig

batch, seqlen, heads, kv_heads, head_dim = 2, 512, 8, 2, 128
kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
q = jax.random.normal(kq, (batch, seqlen, heads, head_dim), jnp.bfloat16)
k = jax.random.normal(kk, (batch, seqlen, kv_heads, head_dim), jnp.bfloat16)
v = jax.random.normal(kv, (batch, seqlen, kv_heads, head_dim), jnp.bfloat16)
dout = jax.random.normal(kd, (batch, seqlen, heads, head_dim), jnp.float32)  # the gradient flowing into out

out, lse = jax.jit(lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True, return_lse=True))(q, k, v)
print("out", out.shape, out.dtype, "| lse", lse.shape, lse.dtype)
print("kernel available here:", fa3_jax.kernel_available(q.dtype, head_dim), "| backend:", jax.default_backend())


def grads(attention):
  """dq, dk, dv of sum(attention(q, k, v) * dout), in q's dtype."""
  loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * dout)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


ours = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True)
# The reference: jax.nn in float32 at full matmul precision (seqlen_q == seqlen_k, so its top-left causal mask is
# our bottom-right one). The baseline of the rule: plain attention rounded to bfloat16 after every step.
reference = lambda q, k, v: jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
cfg = AttentionConfig(softmax_scale=1 / math.sqrt(head_dim), window_right=0)
baseline = lambda q, k, v: testing.same_precision_attention(q, k, v, cfg)
with jax.default_matmul_precision("highest"):
  ref_out, ref_grads = jax.jit(reference)(q, k, v), grads(reference)
checks = [testing.fa3_check("out", out, ref_out, jax.jit(baseline)(q, k, v), softcap=False)]
for name, g, r, b in zip(("dq", "dk", "dv"), grads(ours), ref_grads, grads(baseline)):
  checks.append(testing.fa3_check(name, g, r, b, softcap=False, gradient=True))
print("error against float32 jax.nn; allowed: 2 x the error of plain bfloat16 attention + 2 x bfloat16's rounding "
      "noise (FlashAttention-3's rule):")
for passed, message in checks:
  print(f"  {'PASS' if passed else 'FAIL'} {message}")
passed = all(p for p, _ in checks)
print("PASS" if passed else "FAIL")
sys.exit(0 if passed else 1)
