"""Generate text with a small decoder-only LM (flax.nnx) and a KV cache: prefill prompts of different lengths, then
decode one token per step, on fa3_jax's flash_attn_with_kvcache (Hopper kernels on GPU, the reference path on CPU).

  python examples/generate.py                       # paged cache (page 16), fa3_jax attention
  python examples/generate.py --page-size 0         # contiguous cache
  python examples/generate.py --compare             # also the same model on jax.nn.dot_product_attention

Each layer's attention is fa3_jax.flax.nnx.MultiHeadAttention called with kv_cache=, a fa3_jax.KVCache carried
from step to step and donated under jit (the append is in place). Prompts are right-padded into one batch, with
query_seq_lengths giving their lengths, and sampling is greedy. Printed: tokens/s of the decode steps and the
attention share of a step (the layers' cache calls timed alone), and a check that the decode logits agree with a
full recompute (the model without a cache over each whole sequence): PASS or FAIL against a stated tolerance (exit
status 1 on FAIL). With matplotlib, --plot writes the time per decode step.

The weights are random: the text is nonsense, the mechanics are what is shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fa3_jax
import fa3_jax.flax.nnx as fa3_nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaxNnCache(fa3_jax.KVCache):
  """The baseline: the same contiguous cache, appended by a scatter, attended by jax.nn.dot_product_attention
  (cuDNN on a GPU where it applies, else XLA). A KVCache subclass, so the fa3 module takes it as it is."""

  def attend(self, q, k, v, num_new=None, causal=True, window_size=(-1, -1), softmax_scale=None, softcap=0.0):
    assert causal or window_size[1] == 0, "the example's model is causal"
    positions = self.lengths[:, None] + jnp.arange(k.shape[1])  # (batch, new)
    append = jax.vmap(lambda cache, rows, pos: cache.at[pos].set(rows, mode="drop"))
    k_cache, v_cache = append(self.k, k, positions), append(self.v, v, positions)
    if q.shape[1] == 1:  # decode: the keys before and at the new token
      out = jax.nn.dot_product_attention(q, k_cache, v_cache, scale=softmax_scale,
                                         key_value_seq_lengths=self.lengths + 1)
    else:  # prefill: causal at the new tokens' positions
      mask = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]
      out = jax.nn.dot_product_attention(q, k_cache, v_cache, scale=softmax_scale, mask=mask[:, None])
    added = k.shape[1] if num_new is None else num_new
    return out, dataclasses.replace(self, k=k_cache, v=v_cache, lengths=self.lengths + added)


class Block(nnx.Module):
  def __init__(self, dim, heads, kv_heads, dtype, rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
    self.attn = fa3_nnx.MultiHeadAttention(heads, dim, num_kv_heads=kv_heads, causal=True, rope_theta=10000.0,
                                           dtype=dtype, use_bias=False, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.mlp2 = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, cache=None, lengths=None):
    """x (batch, seq, dim). Without a cache: causal self-attention over x. With one: x's tokens join it (lengths:
    the real ones of right-padded rows); returns (x, cache)."""
    h = self.ln1(x)
    if cache is None:
      a = self.attn(h)
    else:
      a, cache = self.attn(h, kv_cache=cache, query_seq_lengths=lengths)
    x = x + a.astype(x.dtype)
    x = x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x)))).astype(x.dtype)
    return x if cache is None else (x, cache)


class LM(nnx.Module):
  def __init__(self, vocab, dim, depth, heads, kv_heads, dtype, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, kv_heads, dtype, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens, caches=None, lengths=None):
    """tokens (batch, seq) -> logits (batch, seq, vocab) float32; with caches (one per layer), also the updated
    caches."""
    x = self.embed(tokens)
    new = []
    for i, block in enumerate(self.blocks):
      if caches is None:
        x = block(x)
      else:
        x, cache = block(x, caches[i], lengths)
        new.append(cache)
    logits = self.embed.attend(self.ln(x)).astype(jnp.float32)
    return logits if caches is None else (logits, new)


def new_caches(args, kind):
  head_dim = args.dim // args.heads
  if kind == "jax.nn":
    zeros = lambda *shape: jnp.zeros(shape, args.dtype)  # a buffer each: the steps donate them
    return [JaxNnCache(zeros(args.batch, args.capacity, args.kv_heads, head_dim),
                       zeros(args.batch, args.capacity, args.kv_heads, head_dim),
                       jnp.zeros((args.batch,), jnp.int32)) for _ in range(args.depth)]
  page_size = args.page_size or None
  return [fa3_jax.KVCache.create(args.batch, args.capacity, args.kv_heads, head_dim, args.dtype,
                                 page_size=page_size) for _ in range(args.depth)]


def timed(f, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(*args))
  return out, time.perf_counter() - t0


def generate(model, prompts, lengths, caches, steps):
  """Greedy decoding. Returns (tokens (batch, steps), the logits of each step (batch, steps, vocab), seconds per
  decode step (the first, which compiles, excluded), the final caches)."""
  graph, state = nnx.split(model)
  forward = lambda state, tokens, caches, lengths: nnx.merge(graph, state)(tokens, caches, lengths)
  prefill = jax.jit(forward, donate_argnums=(2,))
  step = jax.jit(lambda state, tokens, caches: forward(state, tokens, caches, None), donate_argnums=(2,))
  logits, caches = prefill(state, prompts, caches, lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # at each prompt's last token
  tokens, all_logits, seconds = [], [], []
  for _ in range(steps):
    token = jnp.argmax(last, axis=-1).astype(jnp.int32)
    tokens.append(token)
    all_logits.append(last)
    (logits, caches), dt = timed(step, state, token[:, None], caches)
    seconds.append(dt)
    last = logits[:, 0]
  return jnp.stack(tokens, 1), jnp.stack(all_logits, 1), seconds[1:], caches


def attention_seconds(caches, args):
  """One decode step's attention calls (append + attend, every layer, in one jitted call as in the step) timed
  alone at the final cache lengths."""
  head_dim = args.dim // args.heads
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((args.batch, 1, args.heads, head_dim)), args.dtype)
  kv = jnp.asarray(rng.standard_normal((args.batch, 1, args.kv_heads, head_dim)), args.dtype)
  attend = jax.jit(lambda caches: tuple(zip(*[cache.attend(q, kv, kv, causal=True) for cache in caches])),
                   donate_argnums=(0,))
  _, caches = attend(caches)  # compiles
  times = []
  for _ in range(5):
    (_, caches), dt = timed(attend, caches)
    times.append(dt)
  return float(np.median(times))


def recompute_error(model, prompts, lengths, tokens, logits):
  """Max |decode logits - full-recompute logits| over every sequence and step, and the logits' largest magnitude."""
  worst = 0.0
  for i, n in enumerate(np.asarray(lengths)):
    sequence = jnp.concatenate([prompts[i, :n], tokens[i]])[None]
    full = model(sequence)[0, n - 1:n - 1 + tokens.shape[1]]  # the logits that chose each generated token
    worst = max(worst, float(jnp.max(jnp.abs(full - logits[i]))))
  return worst, float(jnp.max(jnp.abs(logits)))


def run(args, kind, model, prompts, lengths):
  print(f"[{kind}] {args.batch} prompts of {', '.join(map(str, np.asarray(lengths)))} tokens, {args.steps} decode "
        f"steps, {args.depth} layers, cache "
        f"{'contiguous' if kind == 'jax.nn' or not args.page_size else f'paged ({args.page_size})'} of "
        f"{args.capacity} keys", flush=True)
  tokens, logits, seconds, caches = generate(model, prompts, lengths, new_caches(args, kind), args.steps)
  step = float(np.median(seconds))
  attention = attention_seconds(caches, args)
  print(f"[{kind}] {args.batch / step:,.0f} tokens/s ({step * 1e3:.2f} ms per step), attention "
        f"{min(attention / step, 1):.0%} of a step ({attention * 1e3:.2f} ms)")
  error, scale = recompute_error(model, prompts, lengths, tokens, logits)
  return dict(tokens=tokens, seconds=seconds, error=error, scale=scale)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--max-prompt", type=int, default=24, help="prompt lengths are drawn from 1 .. this")
  p.add_argument("--steps", type=int, default=16, help="tokens to decode per prompt")
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--vocab", type=int, default=256)
  p.add_argument("--page-size", type=int, default=16, help="0: a contiguous cache")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  p.add_argument("--compare", action="store_true", help="also run the model on jax.nn.dot_product_attention")
  p.add_argument("--tolerance", type=float, default=None,
                 help="allowed max |decode - recompute| logit difference (default: 5e-2 x the largest logit)")
  p.add_argument("--plot", default="generate_steps.png", help="PNG of the time per decode step ('' for none)")
  args = p.parse_args(argv)
  args.dtype = jnp.dtype(args.dtype)
  args.capacity = args.max_prompt + args.steps

  print(f"fa3_jax {fa3_jax.__version__} on {jax.devices()[0].device_kind}: "
        f"{'kernels' if fa3_jax.kernel_available(args.dtype, args.dim // args.heads) else 'reference path'}")
  model = LM(args.vocab, args.dim, args.depth, args.heads, args.kv_heads, args.dtype, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  lengths = jnp.asarray(rng.integers(1, args.max_prompt + 1, args.batch), jnp.int32)
  prompts = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.max_prompt)), jnp.int32)
  kinds = ["fa3_jax", "jax.nn"] if args.compare else ["fa3_jax"]
  results = {kind: run(args, kind, model, prompts, lengths) for kind in kinds}

  ok = True
  for kind, r in results.items():
    tol = 5e-2 * r["scale"] if args.tolerance is None else args.tolerance
    passed = r["error"] <= tol
    ok &= passed
    print(f"{'PASS' if passed else 'FAIL'} [{kind}]: decode logits vs a full recompute: max |difference| "
          f"{r['error']:.3g} {'<=' if passed else '>'} tolerance {tol:.3g}")
  if args.compare:
    same = float(jnp.mean(results["fa3_jax"]["tokens"] == results["jax.nn"]["tokens"]))
    print(f"fa3_jax and jax.nn chose the same token {same:.0%} of the time (greedy; rounding may split them)")
  if args.plot:
    try:
      import matplotlib
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt
    except ImportError:
      print("matplotlib is not installed: no plot")
    else:
      fig, ax = plt.subplots(figsize=(6, 3.5))
      for kind, r in results.items():
        ax.plot(np.arange(2, args.steps + 1), np.asarray(r["seconds"]) * 1e3, marker=".", label=kind)
      ax.set_xlabel("decode step")
      ax.set_ylabel("ms per step")
      ax.set_title(f"batch {args.batch}, {args.depth} layers, d={args.dim // args.heads}")
      ax.legend()
      fig.tight_layout()
      fig.savefig(args.plot, dpi=100)
      print(f"step times written to {os.path.abspath(args.plot)}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
