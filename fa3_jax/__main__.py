"""`python -m fa3_jax`: environment report, self-check of every compiled kernel against the reference, and a short
timing table against jax.nn.dot_product_attention."""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import jax
import jax.numpy as jnp

import fa3_jax
from fa3_jax import _extension
from fa3_jax import benchmark
from fa3_jax import testing

# The self-check's masks, rotated over the kernel configurations so that every kind runs.
MASKS = (dict(), dict(causal=True), dict(window_size=(64, 16), softcap=10.0))
# Default check: one small awkward shape (partial query and key tiles, GQA, seqlen_q != seqlen_k).
FAST_SHAPE = dict(batch=2, seqlen_q=113, seqlen_k=239, heads=4, kv_heads=2)
# --full: each mask on its own longer shape and head layout, for every kernel configuration.
FULL_SHAPES = (dict(seqlen_q=239, seqlen_k=1023, heads=4, kv_heads=4),
               dict(seqlen_q=1024, seqlen_k=1023, heads=4, kv_heads=2),
               dict(seqlen_q=113, seqlen_k=203, heads=4, kv_heads=1))


def self_check_cases(fwd_kernels, bwd_kernels, full: bool = False) -> list[testing.KernelCase]:
  """The self-check for these compiled kernels ({(dtype name, head_dim, head_dim_v)} per direction): each
  configuration once, on FAST_SHAPE, the masks rotating (configurations ordered by head dims, then dtype, so that the
  two dtypes of a head dim get different masks; with fewer configurations than masks some run twice, so that every
  mask runs); with full, every configuration with every mask on FULL_SHAPES."""
  configs = sorted(set(fwd_kernels) | set(bwd_kernels), key=lambda c: (c[1], c[2], c[0]))
  case = lambda config, mask, shape: testing.KernelCase(*config, backward=config in bwd_kernels, **mask, **shape)
  if full:
    return [case(config, mask, shape) for config in configs for mask, shape in zip(MASKS, FULL_SHAPES)]
  n = max(len(configs), len(MASKS)) if configs else 0
  return [case(configs[i % len(configs)], MASKS[i % len(MASKS)], FAST_SHAPE) for i in range(n)]


def report() -> str | None:
  """Prints the environment and which kernels this build has. Returns why the kernels cannot run here, or None."""
  print(f"fa3_jax {fa3_jax.__version__}  |  jax {jax.__version__}  |  python {sys.version.split()[0]}")
  devices = jax.devices()
  capability = getattr(devices[0], "compute_capability", None)
  print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}"
        f"{f', compute capability {capability}' if capability else ''})")
  missing = testing.extension_problem()
  if missing is None:
    info = _extension.build_info
    print(f"CUDA extension: loaded (XLA FFI API {info['xla_ffi_api'][0]}.{info['xla_ffi_api'][1]}, "
          f"CUTLASS {info['cutlass_version']}, CUDA {info['cuda_version']})")
    print(f"registered targets: {', '.join(sorted(_extension.module.registrations()))}")
    for direction in ("fwd", "bwd"):
      kernels = sorted(_extension.compiled_kernels(direction))
      print(f"{direction} kernels: {', '.join(f'{t} {d}x{dv}' for t, d, dv in kernels) or 'none'}")
  else:
    print(f"CUDA extension: not loaded: {missing}")
  problem = testing.kernel_problem()
  print("kernels: run on this GPU" if problem is None
        else f"kernels: not used here, every call runs the pure-JAX reference: {problem}")
  return problem


def _compile_in(pool: concurrent.futures.Executor, case: testing.KernelCase) -> concurrent.futures.Future:
  """Traces the check on this thread (tracing is Python) and compiles it in the pool (XLA compilations overlap). A
  failure of either is raised by the future's result()."""
  try:
    return pool.submit(testing.compile_check, testing.lower_check(case))
  except Exception as e:  # the same path as a compilation error: this check fails, the others run
    failed = concurrent.futures.Future()
    failed.set_exception(e)
    return failed


def run_self_check(cases: list[testing.KernelCase], workers: int) -> bool:
  """Compiles the checks `workers` at a time and runs each as soon as it is compiled, printing one line per check.
  Returns whether all passed."""
  start = time.perf_counter()
  passed = 0
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    compiling = [_compile_in(pool, case) for case in cases]
    print(f"self-check: {len(cases)} checks traced in {time.perf_counter() - start:.1f} s, compiling {workers} at a "
          "time", flush=True)
    for i, (case, compiled) in enumerate(zip(cases, compiling), 1):
      try:
        results = testing.run_check(case, compiled.result())
      except Exception as e:  # a configuration that fails to trace, compile or run fails its check
        results = [(False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")]
      ok = all(good for good, _ in results)
      passed += ok
      detail = "" if ok else ": " + "; ".join(message for good, message in results if not good)
      print(f"  [{i}/{len(cases)} {time.perf_counter() - start:5.1f} s] {case.describe()}: "
            f"{'PASS' if ok else 'FAIL'}{detail}", flush=True)
  print(f"self-check: {passed} of {len(cases)} passed in {time.perf_counter() - start:.1f} s")
  return passed == len(cases)


def self_check(problem: str | None, full: bool) -> bool:
  """The self-check of every compiled kernel configuration (see self_check_cases); True when skipped."""
  if problem is not None:
    print(f"self-check: skipped ({problem})")
    return True
  cases = self_check_cases(_extension.compiled_kernels("fwd"), _extension.compiled_kernels("bwd"), full)
  return run_self_check(cases, workers=max(1, min(len(cases), os.cpu_count() or 1, 8)))


def timing(seqlens: list[int], problem: str | None) -> None:
  """One row per (seqlen, causal) and implementation: TFLOP/s on a GPU, milliseconds elsewhere (TFLOP/s of a CPU
  round to 0.0), forward / backward."""
  impls = benchmark.implementations()
  on_gpu = jax.default_backend() == "gpu"
  head_dim, hidden, tokens = (128, 2048, 16384) if on_gpu else (64, 256, 1024)
  heads = hidden // head_dim
  unit = "TFLOP/s" if on_gpu else "ms"
  missing = [d for d in ("fwd", "bwd") if not fa3_jax.kernel_available(jnp.bfloat16, head_dim, direction=d)]
  if problem is None and missing:
    problem = f"this build has no bf16 head dim {head_dim} {' or '.join(missing)} kernel"
  print(f"\ntiming: bf16, head dim {head_dim}, {heads} heads, batch = {tokens} tokens // seqlen, {unit} fwd / bwd")
  if problem:
    print(f"fa3_jax's numbers are its pure-JAX reference path's, not the kernels': {problem}")
  print(f"{'seqlen':>7} {'batch':>5} {'causal':>6} " + " ".join(f"{n:>18}" for n in impls), flush=True)
  fmt = lambda x: "-" if x is None else f"{x:.1f}" if on_gpu else f"{x:.2f}"
  for seqlen in seqlens:
    batch = max(1, tokens // seqlen)
    for causal in (False, True):
      cells = []
      for name, attention in impls.items():
        r = benchmark.measure(name, attention, batch, seqlen, heads, head_dim, causal, calls=10, repeats=3)
        fwd, bwd = (r.fwd_tflops, r.bwd_tflops) if on_gpu else (r.fwd_ms, r.bwd_ms)
        cells.append("error" if r.error else f"{fmt(fwd)} / {fmt(bwd)}")
      print(f"{seqlen:>7} {batch:>5} {causal!s:>6} " + " ".join(f"{c:>18}" for c in cells), flush=True)


def _seqlen(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer sequence length, got {text!r}")
  return value


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fa3_jax", description=__doc__)
  parser.add_argument("--full", action="store_true",
                      help="check every compiled kernel configuration with every mask on longer shapes (slow)")
  parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
  parser.add_argument("--seqlens", type=_seqlen, nargs="+",
                      help="sequence lengths of the timing table (default: 4096 on a GPU, 256 elsewhere)")
  args = parser.parse_args(argv)
  if args.no_timing and args.seqlens:
    parser.error("argument --seqlens: not allowed with --no-timing (it sets the timing table's sequence lengths)")
  problem = report()
  ok = self_check(problem, args.full)
  if not args.no_timing:
    timing(args.seqlens or ([4096] if jax.default_backend() == "gpu" else [256]), problem)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
