"""Attention variants against the plain call they extend, in one run on one GPU (issue: sinks and chunked attention).

- sinks: flash_attn_func with learnable sinks (random normal logits) against the same call without, forward and
  backward (the backward also computes d(sinks)); the target is a cost within 3%.
- attention_chunk: chunked causal attention against a causal sliding window with the same number of visible
  (query, key) pairs, throughput counted over the visible pairs only (4 * d FLOPs per pair forward, 2.5x that
  backward); the target is within 10% of the window's.

Grid: batch * seqlen = 16k tokens, 16 heads of head dim 128 (and --head-dims), seqlens 1k .. 16k, bf16, random
normal inputs. Median of repeats of back-to-back calls (fa3_jax.benchmark).

  python benchmarks/bench_variants.py --out benchmarks/results/variants

writes results.json and results.md into --out. `--quick` runs a tiny grid (CPU smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax import _extension, benchmark

TOKENS = 16384
HEADS = 16
SEQLENS = (1024, 4096, 16384)
CHUNKS = (1024, 8192)


@dataclasses.dataclass
class Row:
  variant: str  # "sinks" / "no sinks" / "chunk C" / "window L"
  comparison: str  # which pair of rows it belongs to, e.g. "sinks s=4096 causal"
  batch: int
  seqlen: int
  head_dim: int
  causal: bool
  visible_pairs: int  # per batch entry and head
  fwd_ms: float | None
  bwd_ms: float | None
  fwd_tflops: float | None
  bwd_tflops: float | None
  error: str | None = None


def visible_pairs(seqlen: int, chunk: int = 0, window: int | None = None) -> int:
  """(query, key) pairs a causal call sees: per chunk of `chunk` tokens, or within a left `window`."""
  if chunk:
    full, rest = divmod(seqlen, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
  rows = np.arange(seqlen)
  return int(np.minimum(rows, seqlen if window is None else window).sum() + seqlen)


def matching_window(seqlen: int, chunk: int) -> int:
  """The left window whose causal call sees (about) as many pairs as chunks of `chunk`."""
  target = visible_pairs(seqlen, chunk=chunk)
  lo, hi = 0, seqlen
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (mid + 1, hi) if visible_pairs(seqlen, window=mid) < target else (lo, mid)
  return lo


def time_call(name, comparison, batch, seqlen, head_dim, causal, pairs, with_sinks, kwargs, calls, repeats) -> Row:
  """Times flash_attn_func(causal=causal, **kwargs), with random sinks (differentiated too) if with_sinks."""
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  shape = (batch, seqlen, HEADS, head_dim)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys[:4])
  sinks = jax.random.normal(keys[4], (HEADS,), jnp.float32) if with_sinks else None
  args = (q, k, v) if sinks is None else (q, k, v, sinks)
  attention = lambda q, k, v, s=None: fa3_jax.flash_attn_func(q, k, v, causal=causal, sinks=s, **kwargs)
  flops = 4.0 * batch * HEADS * head_dim * pairs
  try:
    t_fwd, t_bwd = benchmark.forward_backward_seconds(attention, args, dout, calls=calls, repeats=repeats)
  except Exception as e:  # reported, not fatal
    return Row(name, comparison, batch, seqlen, head_dim, causal, pairs, None, None, None, None,
               benchmark.error_summary(e))
  return Row(name, comparison, batch, seqlen, head_dim, causal, pairs, t_fwd * 1e3,
             None if t_bwd is None else t_bwd * 1e3, flops / t_fwd / 1e12,
             None if t_bwd is None else 2.5 * flops / t_bwd / 1e12)


def plan(head_dims, seqlens, chunks, tokens):
  """(name, comparison, batch, seqlen, head_dim, causal, pairs, with_sinks, kwargs) of every timed call, each
  variant right after the call it is compared with."""
  for head_dim in head_dims:
    for seqlen in seqlens:
      batch = max(1, tokens // seqlen)
      for causal in (False, True):
        pairs = visible_pairs(seqlen) if causal else seqlen * seqlen
        comparison = f"sinks d={head_dim} s={seqlen} {'causal' if causal else 'non-causal'}"
        yield "no sinks", comparison, batch, seqlen, head_dim, causal, pairs, False, {}
        yield "sinks", comparison, batch, seqlen, head_dim, causal, pairs, True, {}
      for chunk in chunks:
        if chunk >= seqlen:
          continue
        window = matching_window(seqlen, chunk)
        comparison = f"chunk d={head_dim} s={seqlen} C={chunk}"
        yield (f"window {window}", comparison, batch, seqlen, head_dim, True, visible_pairs(seqlen, window=window),
               False, {"window_size": (window, 0)})
        yield (f"chunk {chunk}", comparison, batch, seqlen, head_dim, True, visible_pairs(seqlen, chunk=chunk),
               False, {"attention_chunk": chunk})


def markdown(rows) -> str:
  lines = ["| comparison | variant | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd ratio | bwd ratio |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  show = lambda x, f: "—" if x is None else format(x, f)
  for i in range(0, len(rows), 2):
    base, variant = rows[i], rows[i + 1]
    for r in (base, variant):
      # Sinks: time ratio to the plain call (cost); chunks: throughput ratio to the window (efficiency).
      ratio = lambda d: (None if getattr(r, f"{d}_ms") is None or getattr(base, f"{d}_ms") is None else
                         getattr(r, f"{d}_ms") / getattr(base, f"{d}_ms") if r.comparison.startswith("sinks") else
                         getattr(r, f"{d}_tflops") / getattr(base, f"{d}_tflops"))
      lines.append(f"| {r.comparison} | {r.variant} | {show(r.fwd_ms, '.3f')} | {show(r.fwd_tflops, '.0f')} | "
                   f"{show(r.bwd_ms, '.3f')} | {show(r.bwd_tflops, '.0f')} | {show(ratio('fwd'), '.3f')} | "
                   f"{show(ratio('bwd'), '.3f')} |{' ' + r.error if r.error else ''}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
  parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS))
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny grid for a CPU smoke test")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)
  tokens, head_dims, seqlens, chunks, calls, repeats = (TOKENS, args.head_dims, args.seqlens, args.chunks,
                                                       args.calls, args.repeats)
  if args.quick:
    tokens, head_dims, seqlens, chunks, calls, repeats = 128, [32], [64], [16], 2, 2
  if jax.default_backend() == "gpu" and not _extension.compiled_kernels("fwd"):
    parser.error(f"fa3_jax has no compiled kernels here ({_extension.import_error}); build it first")
  args.out.mkdir(parents=True, exist_ok=True)
  rows = []
  for call in plan(head_dims, seqlens, chunks, tokens):
    rows.append(time_call(*call, calls, repeats))
    name, comparison = call[:2]
    r = rows[-1]
    show = lambda x: "—" if x is None else f"{x:.3f}"
    print(f"{comparison:34s} {name:12s} fwd {show(r.fwd_ms)} ms bwd {show(r.bwd_ms)} ms {r.error or ''}", flush=True)
  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind, jax=jax.__version__,
              command=" ".join([pathlib.Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              tokens=tokens, heads=HEADS, dtype="bfloat16", calls=calls, repeats=repeats)
  (args.out / "results.json").write_text(json.dumps(dict(meta=meta, results=[dataclasses.asdict(r) for r in rows]),
                                                    indent=1))
  table = markdown(rows)
  (args.out / "results.md").write_text(f"{meta['date']}, {meta['device']}, jax {meta['jax']}: "
                                       f"`{meta['command']}`\n\n{table}")
  print(table)


if __name__ == "__main__":
  main()
