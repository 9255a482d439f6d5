"""Attention benchmark on the FlashAttention-3 paper grid: ours vs cuDNN and XLA (jax.nn.dot_product_attention) and
flash_attn3_jax (FA3's own kernels) when installed, all in one run on one GPU.

Grid: batch * seqlen = 16k tokens, hidden 2048 (heads = 2048 / head_dim), seqlen 512 .. 16k, causal and not,
forward and backward (timed as (forward + backward) - forward). TFLOP/s with the FlashAttention convention
(fa3_jax.benchmark.attention_flops). Median of repeats of back-to-back calls on random normal bf16 inputs.

  python benchmarks/bench_attention.py --head-dims 64 128 256 --out benchmarks/results/h100

writes results.json, results.md and one PNG plot per head dim into --out. `--quick` runs a tiny grid (CPU smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import jax

from fa3_jax import _extension, benchmark

TOKENS = 16384
HIDDEN = 2048
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)


def grid(head_dims, seqlens, tokens, hidden):
  for head_dim in head_dims:
    for causal in (False, True):
      for seqlen in seqlens:
        yield max(1, tokens // seqlen), seqlen, hidden // head_dim, head_dim, causal


def markdown(results, impls) -> str:
  lines = []
  for head_dim in sorted({r.head_dim for r in results}):
    for causal in (False, True):
      rows = [r for r in results if r.head_dim == head_dim and r.causal == causal]
      seqlens = sorted({r.seqlen for r in rows})
      if not rows:
        continue
      for direction in ("fwd", "bwd"):
        if all(getattr(r, f"{direction}_tflops") is None for r in rows):
          continue
        lines.append(f"\n**head dim {head_dim}, {'causal' if causal else 'non-causal'}, {direction}** (TFLOP/s)\n")
        lines.append("| implementation | " + " | ".join(f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens)
                     + " |")
        lines.append("| --- |" + " --- |" * len(seqlens))
        for impl in impls:
          cells = []
          for s in seqlens:
            r = next((r for r in rows if r.implementation == impl and r.seqlen == s), None)
            value = None if r is None else getattr(r, f"{direction}_tflops")
            cells.append("—" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2g}")
          lines.append(f"| {impl} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results, impls, out_dir: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  directions = [d for d in ("fwd", "bwd") if any(getattr(r, f"{d}_tflops") is not None for r in results)]
  for head_dim in sorted({r.head_dim for r in results}):
    fig, axes = plt.subplots(len(directions), 2, figsize=(11, 4 * len(directions)), sharex=True, squeeze=False)
    for col, causal in enumerate((False, True)):
      for row, direction in enumerate(directions):
        ax = axes[row][col]
        for impl in impls:
          pts = sorted((r.seqlen, getattr(r, f"{direction}_tflops")) for r in results
                       if r.implementation == impl and r.head_dim == head_dim and r.causal == causal
                       and getattr(r, f"{direction}_tflops") is not None)
          if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{direction}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"attention, head dim {head_dim}, bf16, {TOKENS // 1024}k tokens, hidden {HIDDEN} "
                 f"({jax.devices()[0].device_kind})")
    fig.tight_layout()
    fig.savefig(out_dir / f"head_dim_{head_dim}.png", dpi=110)
    plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
  parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
  parser.add_argument("--implementations", nargs="+", default=None,
                      help="subset of: fa3_jax cudnn xla flash_attn3_jax (default: all available)")
  parser.add_argument("--no-backward", action="store_true")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny grid for a CPU smoke test")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)

  tokens, hidden, seqlens, calls, repeats = TOKENS, HIDDEN, args.seqlens, args.calls, args.repeats
  if args.quick:
    tokens, hidden, seqlens, calls, repeats = 256, 128, [64, 128], 2, 2
  impls = benchmark.implementations(args.implementations)
  if "fa3_jax" in impls and jax.default_backend() == "gpu" and not _extension.compiled_kernels("fwd"):
    # Without the extension fa3_jax runs its reference path: timing that as "fa3_jax" would be a wrong number.
    parser.error(f"fa3_jax has no compiled kernels here ({_extension.import_error}); build it or leave it out")
  args.out.mkdir(parents=True, exist_ok=True)

  results = []
  for batch, seqlen, heads, head_dim, causal in grid(args.head_dims, seqlens, tokens, hidden):
    for name, attention in impls.items():
      r = benchmark.measure(name, attention, batch, seqlen, heads, head_dim, causal, backward=not args.no_backward,
                            calls=calls, repeats=repeats)
      results.append(r)
      show = lambda x: "—" if x is None else f"{x:7.1f}"
      print(f"d={head_dim:3d} causal={causal!s:5} s={seqlen:6d} {name:16s} fwd {show(r.fwd_tflops)} "
            f"bwd {show(r.bwd_tflops)} TFLOP/s {r.error or ''}", flush=True)

  meta = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind, jax=jax.__version__,
              command=" ".join([pathlib.Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              tokens=tokens, hidden=hidden, dtype="bfloat16", calls=calls, repeats=repeats)
  (args.out / "results.json").write_text(json.dumps(
      dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
  table = markdown(results, list(impls))
  (args.out / "results.md").write_text(f"{meta['date']}, {meta['device']}, jax {meta['jax']}: "
                                       f"`{meta['command']}`\n{table}")
  plot(results, list(impls), args.out)
  print(table)


if __name__ == "__main__":
  main()
