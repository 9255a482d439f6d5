"""`python -m fa3_jax`: environment report, self-check of every compiled kernel against the reference, and a short
timing table against jax.nn.dot_product_attention."""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import fa3_jax
from fa3_jax import _extension
from fa3_jax import benchmark
from fa3_jax import testing


def report() -> None:
  print(f"fa3_jax {fa3_jax.__version__}  |  jax {jax.__version__}  |  python {sys.version.split()[0]}")
  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
  if _extension.module is None:
    print(f"CUDA extension: not built ({_extension.import_error}); every call runs the pure-JAX reference")
    return
  info = _extension.build_info
  print(f"CUDA extension: loaded (XLA FFI API {info['xla_ffi_api'][0]}.{info['xla_ffi_api'][1]}, "
        f"CUTLASS {info['cutlass_version']}, CUDA {info['cuda_version']})")
  print(f"registered targets: {', '.join(sorted(_extension.module.registrations()))}")
  for direction in ("fwd", "bwd"):
    kernels = sorted(_extension.compiled_kernels(direction))
    listed = ", ".join(f"{t} {d}x{dv}" for t, d, dv in kernels) or "none"
    print(f"{direction} kernels: {listed}")
  if not any(d.platform == "gpu" for d in devices):
    print("no GPU visible: the kernels are registered but the reference path runs on this machine")


def self_check() -> bool:
  """Every compiled forward kernel (and its backward, if compiled) on a few awkward shapes, FA3 tolerance rule."""
  if _extension.module is None or jax.default_backend() != "gpu":
    print("self-check: skipped (needs a GPU and the CUDA extension)")
    return True
  ok = True
  masks = [dict(), dict(causal=True), dict(window_size=(64, 16), softcap=10.0)]
  for dtype, d, dv in sorted(_extension.compiled_kernels("fwd")):
    for mask, (sq, sk), kv_heads in zip(masks, [(239, 1023), (1024, 1023), (113, 203)], (4, 2, 1)):
      results = testing.check_kernel(jnp.dtype(dtype), d, dv, sq, sk, heads=4, kv_heads=kv_heads,
                                     backward=(dtype, d, dv) in _extension.compiled_kernels("bwd"), **mask)
      passed = all(r[0] for r in results)
      ok &= passed
      detail = "; ".join(m for _, m in results) if not passed else ""
      print(f"self-check {dtype} {d}x{dv} {mask or 'no mask'} s={sq}x{sk}: {'PASS' if passed else 'FAIL'} {detail}")
  return ok


def timing(seqlens) -> None:
  impls = benchmark.implementations()
  on_gpu = jax.default_backend() == "gpu"
  head_dim, hidden, tokens = (128, 2048, 16384) if on_gpu else (64, 256, 1024)
  print(f"\ntiming: bf16, head dim {head_dim}, {tokens} tokens, {hidden // head_dim} heads, TFLOP/s fwd / bwd")
  print(f"{'seqlen':>7} {'causal':>6} " + " ".join(f"{n:>18}" for n in impls))
  for seqlen in seqlens if on_gpu else (256,):
    for causal in (False, True):
      cells = []
      for name, attention in impls.items():
        r = benchmark.measure(name, attention, max(1, tokens // seqlen), seqlen, hidden // head_dim, head_dim,
                              causal, calls=10, repeats=3)
        fmt = lambda x: "-" if x is None else f"{x:.1f}"
        cells.append(f"{fmt(r.fwd_tflops)} / {fmt(r.bwd_tflops)}" if r.error is None else "error")
      print(f"{seqlen:>7} {causal!s:>6} " + " ".join(f"{c:>18}" for c in cells))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fa3_jax", description=__doc__)
  parser.add_argument("--no-timing", action="store_true")
  parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
  args = parser.parse_args(argv)
  report()
  ok = self_check()
  if not args.no_timing:
    timing(args.seqlens)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
