"""Backward with and without an lse cotangent (the dlse term in the preprocess), same run, interleaved."""
import jax, jax.numpy as jnp, fa3_jax
from fa3_jax import benchmark

def plain(q, k, v, causal):
  return fa3_jax.flash_attn_func(q, k, v, causal=causal)

def with_lse(q, k, v, causal):
  out, lse = fa3_jax.flash_attn_func(q, k, v, causal=causal, return_lse=True)
  # the cotangent reaches lse through this (cheap) elementwise term
  return out + lse.transpose(0, 2, 1)[..., None].astype(out.dtype)

for seqlen in (2048, 8192):
  for causal in (False, True):
    for rnd in range(2):
      for name, fn in (("plain", plain), ("with_lse", with_lse)):
        r = benchmark.measure(name, fn, 16384 // seqlen, seqlen, 16, 128, causal, calls=20, repeats=5)
        print(f"r{rnd} s={seqlen} causal={causal} {name:9s} fwd {r.fwd_ms:.3f} ms  bwd {r.bwd_ms:.3f} ms "
              f"{r.bwd_tflops:.0f} TFLOP/s {r.error or ''}", flush=True)
