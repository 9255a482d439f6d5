"""Decode benchmark (KV cache, one query token per sequence): ours (fa3_jax.flash_attn_with_kvcache, contiguous and
paged caches, split-KV chosen and off) vs FlashAttention-3's kvcache kernels (flash_attn3_jax.flash_mha_with_kvcache,
contiguous and paged, best of several num_splits) and cuDNN (jax.nn.dot_product_attention with key_value_seq_lengths),
all in one run on one GPU.

The grid is issue 21's: GQA 32 query / 8 KV heads, d = 128, bf16, full caches of batch x cache length. Decode is
bound by reading the cache, so each cell reports microseconds, the cache's bytes over the time (TB/s) and the floor,
the bytes at 4.8 TB/s (the H200's HBM3e). Median of repeats of back-to-back calls on random normal inputs; every
implementation's output is compared with ours (max |difference|).

  python benchmarks/bench_decode.py --out benchmarks/results/decode_h200

writes results.json and results.md into --out. `--quick` runs tiny caches (a CPU smoke test: there fa3_jax runs its
reference path and the GPU-only peers are reported as skipped). `--prefill` runs issue 21's short prefill against a
long cache instead: 128..2048 causal queries at the end of a full cache of 32768 keys, where flash_attn_with_kvcache
must be no slower than the dense forward (flash_attn_func on the same q, k, v: the same attention, bottom-right
causal); FA3's kvcache kernel runs it too (jax.nn's causal is top-left, another attention, so cuDNN sits this out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax import benchmark

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PEAK_TBPS = 4.8
CELLS = ((1, 131072), (8, 32768), (32, 8192), (64, 16384), (128, 2048))
QUICK_CELLS = ((1, 512), (2, 256))
PREFILL_CELLS = ((1, 32768, 128), (1, 32768, 512), (1, 32768, 2048), (4, 32768, 512))  # batch, cache, seqlen_q
QUICK_PREFILL_CELLS = ((1, 256, 16),)
PAGE_SIZE = 256
FA3_SPLITS = (1, 4, 8, 16, 32)


def paged(cache, page_size: int):
  """A contiguous (batch, capacity, ...) cache as pages (batch * capacity / page_size, page_size, ...) in a shuffled
  order, and the page table (batch, capacity / page_size) that reads it back."""
  b, capacity = cache.shape[:2]
  per_seq = capacity // page_size
  order = np.random.default_rng(0).permutation(b * per_seq)
  pages = cache.reshape(b * per_seq, page_size, *cache.shape[2:])[np.argsort(order)]
  return pages, jnp.asarray(order.reshape(b, per_seq), jnp.int32)


def implementations(on_gpu: bool, prefill: bool):
  """name -> (builder(q, k_cache, v_cache, lens) -> (fn, args) list to try; the fastest counts). Prefill calls are
  causal (bottom-right: the queries are the cache's last rows)."""
  causal = prefill

  def ours(splits, page=None):
    def build(q, kc, vc, lens):
      if page is None:
        return [(lambda q, kc, vc, lens: fa3_jax.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, num_splits=splits, causal=causal), (q, kc, vc, lens))]
      (kp, table), (vp, _) = paged(kc, page), paged(vc, page)
      return [(lambda q, kp, vp, lens, table: fa3_jax.flash_attn_with_kvcache(
          q, kp, vp, cache_seqlens=lens, page_table=table, num_splits=splits, causal=causal),
               (q, kp, vp, lens, table))]
    return build

  def dense(q, kc, vc, lens):  # full caches: the same attention as the kvcache call
    return [(lambda q, kc, vc: fa3_jax.flash_attn_func(q, kc, vc, causal=True), (q, kc, vc))]

  if prefill:
    found = {"fa3_jax": ours(0), "fa3_jax_dense_fwd": dense}
  else:
    found = {"fa3_jax": ours(0), "fa3_jax_unsplit": ours(1), f"fa3_jax_paged{PAGE_SIZE}": ours(0, PAGE_SIZE)}
  if not on_gpu:
    return found
  try:
    import flash_attn3_jax

    def fa3(page=None):
      def build(q, kc, vc, lens):
        tries = []
        for s in FA3_SPLITS:
          if page is None:
            tries.append((lambda q, kc, vc, lens, s=s: flash_attn3_jax.flash_mha_with_kvcache(
                q, kc, vc, cache_seqlens=lens, num_splits=s, is_causal=causal), (q, kc, vc, lens)))
          else:
            (kp, table), (vp, _) = paged(kc, page), paged(vc, page)
            tries.append((lambda q, kp, vp, lens, table, s=s: flash_attn3_jax.flash_mha_with_kvcache(
                q, kp, vp, cache_seqlens=lens, page_table=table, num_splits=s, is_causal=causal),
                          (q, kp, vp, lens, table)))
        return tries
      return build
    found["flash_attn3_jax"] = fa3()
    if not prefill:
      found[f"flash_attn3_jax_paged{PAGE_SIZE}"] = fa3(PAGE_SIZE)
  except ImportError:
    pass
  if prefill:
    return found

  def cudnn(q, kc, vc, lens):
    return [(lambda q, kc, vc, lens: jax.nn.dot_product_attention(
        q, kc, vc, key_value_seq_lengths=lens, implementation="cudnn"), (q, kc, vc, lens))]
  found["cudnn"] = cudnn
  return found


def run(cells, calls: int, repeats: int, prefill: bool = False) -> list[dict]:
  """cells: (batch, cache) pairs, or with prefill (batch, cache, seqlen_q) triples."""
  on_gpu = jax.default_backend() == "gpu"
  impls = implementations(on_gpu, prefill)
  rows = []
  for batch, capacity, *rest in cells:
    seqlen_q = rest[0] if rest else 1
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
    q = normal(batch, seqlen_q, HEADS, HEAD_DIM)
    kc, vc = normal(batch, capacity, KV_HEADS, HEAD_DIM), normal(batch, capacity, KV_HEADS, HEAD_DIM)
    lens = jnp.full((batch,), capacity, jnp.int32)
    nbytes = 2 * kc.size * kc.dtype.itemsize
    floor_us = nbytes / (PEAK_TBPS * 1e12) * 1e6
    want = None
    for name, build in impls.items():
      row = dict(implementation=name, batch=batch, cache=capacity, seqlen_q=seqlen_q, kv_bytes=nbytes,
                 floor_us=floor_us)
      try:
        best = None
        for fn, args in build(q, kc, vc, lens):
          f = jax.jit(fn)
          seconds = benchmark._median_seconds(f, args, calls, repeats)
          if best is None or seconds < best[0]:
            best = (seconds, f, args)
        seconds, f, args = best
        out = np.asarray(f(*args), np.float32)
        want = out if want is None else want
        row.update(us=seconds * 1e6, tbps=nbytes / seconds / 1e12, of_floor=floor_us / (seconds * 1e6),
                   max_diff_vs_fa3_jax=float(np.max(np.abs(out - want))))
      except Exception as e:  # a peer that cannot run a cell is reported, not fatal
        row["error"] = benchmark.error_summary(e)
      rows.append(row)
      print(f"{batch:4d} x {capacity:6d} q {seqlen_q:4d} {name:24s} " + (
          f"{row['us']:8.1f} us  {row['tbps']:5.2f} TB/s  floor {floor_us:7.1f} us  "
          f"max|diff| {row['max_diff_vs_fa3_jax']:.3g}" if "us" in row else row["error"]), flush=True)
  return rows


def markdown(rows) -> str:
  names = list(dict.fromkeys(r["implementation"] for r in rows))
  cells = list(dict.fromkeys((r["batch"], r["cache"], r["seqlen_q"]) for r in rows))
  lines = ["| batch x cache length | queries | KV bytes | floor (us) | " + " | ".join(names) + " |",
           "| --- " * (4 + len(names)) + "|"]
  for b, s, sq in cells:
    cell = {r["implementation"]: r for r in rows if (r["batch"], r["cache"], r["seqlen_q"]) == (b, s, sq)}
    first = next(iter(cell.values()))
    entry = lambda r: f"{r['us']:.0f} ({r['tbps']:.2f} TB/s)" if "us" in r else "error"
    lines.append(f"| {b} x {s} | {sq} | {first['kv_bytes'] / 1e9:.2f} GB | {first['floor_us']:.0f} | "
                 + " | ".join(entry(cell[n]) if n in cell else "-" for n in names) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_decode_out"))
  parser.add_argument("--quick", action="store_true", help="tiny caches (CPU smoke test)")
  parser.add_argument("--prefill", action="store_true", help="short causal prefill against a long full cache")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  cells = (QUICK_PREFILL_CELLS if args.quick else PREFILL_CELLS) if args.prefill else (
      QUICK_CELLS if args.quick else CELLS)
  rows = run(cells, args.calls, args.repeats, args.prefill)
  args.out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0].device_kind
  meta = dict(date=datetime.date.today().isoformat(), device=device, jax=jax.__version__, heads=HEADS,
              kv_heads=KV_HEADS, head_dim=HEAD_DIM, peak_tbps=PEAK_TBPS, page_size=PAGE_SIZE, fa3_splits=FA3_SPLITS)
  (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  table = markdown(rows)
  (args.out / "results.md").write_text(
      f"{'Prefill against a cache' if args.prefill else 'Decode'}, {device}, jax {jax.__version__}, "
      f"{meta['date']}: GQA {HEADS}/{KV_HEADS} heads, d={HEAD_DIM}, bf16, "
      f"{'causal queries at the end of' if args.prefill else 'one query token,'} full caches; microseconds (cache bytes / time); floor = bytes at {PEAK_TBPS} TB/s; "
      f"flash_attn3_jax: best of num_splits {FA3_SPLITS}\n\n{table}\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
