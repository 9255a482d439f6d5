"""Summarise interleaved fwd_check benchmark rounds of several source trees (cuda/tests/run_fwd_ab.sh).

Input lines: "<variant> r<round> bench <kernel> <mask> h=<h>: <seqlen>k <tflops> ... TFLOP/s" (fwd_check --bench-only,
prefixed). Prints, per kernel and mask, each variant's median TFLOP/s per sequence length and its change against the
first variant, plus the spread of the per-round paired changes (min..max), which says whether a difference is noise.
"""
import collections
import statistics
import sys


def parse(lines):
  rounds = collections.defaultdict(dict)  # (kernel, mask, round) -> variant -> [tflops per seqlen]
  variants, seqlens = [], []
  for line in lines:
    f = line.split()
    if len(f) < 7 or f[2] != "bench":
      continue
    variant, rnd, kernel, mask = f[0], f[1], f[3], f[4]
    if variant not in variants:
      variants.append(variant)
    rest = f[6:-1]  # "<s>k <tflops>" pairs
    seqlens = [rest[i] for i in range(0, len(rest), 2)]
    rounds[(kernel, mask, rnd)][variant] = [float(rest[i]) for i in range(1, len(rest), 2)]
  return rounds, variants, seqlens


def main():
  rounds, variants, seqlens = parse(open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin)
  base = variants[0]
  cells = sorted({(k, m) for k, m, _ in rounds})
  print(f"{'kernel':13s} {'mask':10s} {'variant':8s} " + " ".join(f"{s:>6s}" for s in seqlens)
        + f"   change vs {base} (median; per-round min..max)")
  for kernel, mask in cells:
    per_round = [v for (k, m, _), v in rounds.items() if (k, m) == (kernel, mask)]
    for variant in variants:
      runs = [r[variant] for r in per_round if variant in r]
      if not runs:
        continue
      med = [statistics.median(c) for c in zip(*runs)]
      line = f"{kernel:13s} {mask:10s} {variant:8s} " + " ".join(f"{x:6.1f}" for x in med)
      if variant != base:
        base_med = [statistics.median(c) for c in zip(*[r[base] for r in per_round if base in r])]
        paired = [[(a / b - 1) * 100 for a, b in zip(r[variant], r[base])] for r in per_round
                  if variant in r and base in r]
        line += "   " + " ".join(f"{(a / b - 1) * 100:+5.1f}% ({min(p):+.1f}..{max(p):+.1f})"
                                 for a, b, p in zip(med, base_med, zip(*paired)))
      print(line)


if __name__ == "__main__":
  main()
