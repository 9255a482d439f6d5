"""Multi-device check and benchmark: sharded attention (batch/heads, ring context parallelism) vs one device.

1. Correctness: batch x head sharding under jit (Auto axes, custom_partitioning), the sequence sharded under jit
   (automatic ring), and context_parallel_attention in shard_map (ring/all-gather, contiguous/zig-zag), each forward
   and gradient compared with the same computation on one device; the compiled HLO's collectives are counted.
2. Timing: ring attention forward and forward+backward over all visible devices vs flash_attn_func on one device, at
   long sequences (default 32k..128k tokens, causal with zig-zag balancing and non-causal).

Writes multi_gpu.json and multi_gpu.md to --out and prints the markdown.

  GPUs:       python benchmarks/multi_gpu.py --out /tmp/mg
  CPU (fake): python benchmarks/multi_gpu.py --out /tmp/mg --cpu-devices 4   (tiny sizes, reference path)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="directory for multi_gpu.json and multi_gpu.md")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="run on this many fake CPU devices with tiny sizes (a smoke test of the script)")
  p.add_argument("--seqlens", default=None, help="comma-separated total tokens for timing (default 32768,65536,"
                 "131072; with --cpu-devices 128,256)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=None, help="query heads (default 16; CPU 2)")
  p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default = heads)")
  p.add_argument("--head-dim", type=int, default=None, help="default 128; CPU 32")
  p.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 10; CPU 2)")
  p.add_argument("--skip-single", action="store_true", help="do not time the one-device baseline")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.cpu_devices:
  # Let XLA overlap the ring's collective permutes with the attention kernels.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_latency_hiding_scheduler=true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fa3_jax  # noqa: E402
from fa3_jax import context_parallel as cp  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


def collectives(hlo: str) -> dict:
  return {c: len(re.findall(rf"\b{c}(-start)?\(", hlo)) for c in COLLECTIVES}


def random_inputs(key, shape_q, shape_kv, dtype, sharding=None):
  ks = jax.random.split(key, 3)
  make = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  fn = jax.jit(lambda ks: (make(ks[0], shape_q), make(ks[1], shape_kv), make(ks[2], shape_kv)),
               out_shardings=sharding)
  return fn(ks)


def rel_error(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(1e-6, float(np.max(np.abs(want)))))


def loss_of(f):
  # Squared, so the output cotangent depends on the data: a constant cotangent lets XLA constant-fold the
  # zig-zag restore's transpose (a large scatter) for tens of seconds at compile time.
  return lambda q, k, v: jnp.sum(jnp.square(f(q, k, v).astype(jnp.float32))) * 1e-3


def compare(name, sharded_fn, single_fn, args_sharded, args_single, tol):
  """Forward + gradient of a sharded computation vs the single-device one; HLO collectives of the sharded grad."""
  grad = lambda f: jax.jit(jax.grad(loss_of(f), argnums=(0, 1, 2)))
  fwd_s = jax.jit(sharded_fn).lower(*args_sharded).compile()
  grad_s = grad(sharded_fn).lower(*args_sharded).compile()
  errors = {"out": rel_error(fwd_s(*args_sharded), jax.jit(single_fn)(*args_single))}
  for n, g, w in zip(("dq", "dk", "dv"), grad_s(*args_sharded), grad(single_fn)(*args_single)):
    errors[n] = rel_error(g, w)
  row = dict(check=name, max_rel_error=max(errors.values()), errors=errors, passed=max(errors.values()) <= tol,
             fwd_collectives=collectives(fwd_s.as_text()), grad_collectives=collectives(grad_s.as_text()))
  print(f"  {name}: max rel error {row['max_rel_error']:.2e} ({'ok' if row['passed'] else 'FAIL'}), "
        f"fwd {row['fwd_collectives']}, grad {row['grad_collectives']}", flush=True)
  return row


def correctness(cfg):
  devices = jax.devices()
  n = len(devices)
  dtype, b, h, hk, d = cfg["dtype"], cfg["batch_check"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
  s = cfg["seq_check"]
  tol = cfg["tol"]
  single = lambda xs: [jax.device_put(x, devices[0]) for x in xs]
  rows = []
  print(f"correctness on {n} devices (batch {b}, seqlen {s}, heads {h}/{hk}, head_dim {d}, {np.dtype(dtype).name})")

  # batch x heads, plain jit, Auto axes
  dp = 2 if n % 2 == 0 and n > 1 else 1
  mesh = jax.make_mesh((dp, n // dp), ("dp", "tp"), axis_types=(AxisType.Auto,) * 2)
  spec = NamedSharding(mesh, P("dp", None, "tp", None))
  q, k, v = random_inputs(jax.random.PRNGKey(0), (b, s, h, d), (b, s, hk, d), dtype)
  args = [jax.device_put(x, spec) for x in (q, k, v)]
  f = lambda q, k, v: fa3_jax.flash_attn_func(q, k, v, causal=True)
  rows.append(compare(f"jit batch x heads ({dp}x{n // dp}), causal", f, f, args, single((q, k, v)), tol))

  # the sequence sharded under jit: automatic ring
  mesh_sp = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
  seq = NamedSharding(mesh_sp, P(None, "sp"))
  args = [jax.device_put(x, seq) for x in (q, k, v)]
  rows.append(compare(f"jit sequence-sharded ({n}), causal (automatic ring)", f, f, args, single((q, k, v)), tol))

  # context_parallel_attention in shard_map
  for strategy, layout, causal in (("ring", "zigzag", True), ("ring", "contiguous", False),
                                   ("allgather", "zigzag", True)):
    body = lambda q, k, v, st=strategy, la=layout, c=causal: cp.context_parallel_attention(
        q, k, v, "sp", causal=c, layout=la, strategy=st)
    sm = jax.shard_map(body, mesh=mesh_sp, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
    if layout == "zigzag":
      ring = lambda q, k, v, sm=sm: cp.zigzag_restore(sm(*(cp.zigzag_reorder(x, n) for x in (q, k, v))), n)
    else:
      ring = sm
    ref = lambda q, k, v, c=causal: fa3_jax.flash_attn_func(q, k, v, causal=c)
    note = " (+ zig-zag reorder/restore gathers)" if layout == "zigzag" else ""
    rows.append(compare(f"shard_map {strategy} {layout} ({n}), {'causal' if causal else 'non-causal'}{note}", ring, ref,
                        args, single((q, k, v)), tol))
  return rows


def timed(fn, args, iters: int) -> float:
  """Median seconds per call over `iters` calls (after a compile + warm-up call)."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def timing(cfg):
  devices = jax.devices()
  n = len(devices)
  dtype, b, h, hk, d = cfg["dtype"], cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
  mesh = jax.make_mesh((n,), ("sp",), axis_types=(AxisType.Auto,))
  seq = NamedSharding(mesh, P(None, "sp"))
  rows = []
  print(f"timing ring attention on {n} devices vs 1 (batch {b}, heads {h}/{hk}, head_dim {d})")
  for s in cfg["seqlens"]:
    for causal in (True, False):
      layout = "zigzag" if causal else "contiguous"
      flops_fwd = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
      # Inputs are generated already in the layout the ring wants (zig-zag is a fixed permutation of tokens).
      q, k, v = random_inputs(jax.random.PRNGKey(s), (b, s, h, d), (b, s, hk, d), dtype, seq)
      body = lambda q, k, v, la=layout, c=causal: cp.context_parallel_attention(q, k, v, "sp", causal=c, layout=la)
      ring = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
      single = lambda q, k, v, c=causal: fa3_jax.flash_attn_func(q, k, v, causal=c)
      fwd_bwd = lambda f: jax.jit(jax.grad(loss_of(f), argnums=(0, 1, 2)))
      row = dict(seqlen=s, causal=causal, layout=layout, devices=n)
      row["ring_fwd_ms"] = 1e3 * timed(jax.jit(ring), (q, k, v), cfg["iters"])
      row["ring_fwd_bwd_ms"] = 1e3 * timed(fwd_bwd(ring), (q, k, v), cfg["iters"])
      if not cfg["skip_single"]:
        one = [jax.device_put(x, devices[0]) for x in (q, k, v)]
        row["single_fwd_ms"] = 1e3 * timed(jax.jit(single), one, cfg["iters"])
        row["single_fwd_bwd_ms"] = 1e3 * timed(fwd_bwd(single), one, cfg["iters"])
        row["speedup_fwd"] = row["single_fwd_ms"] / row["ring_fwd_ms"]
        row["speedup_fwd_bwd"] = row["single_fwd_bwd_ms"] / row["ring_fwd_bwd_ms"]
        del one
      # FlashAttention convention: bwd = 2.5 x fwd flops; per-device throughput of the ring.
      row["ring_fwd_tflops_per_device"] = flops_fwd / (row["ring_fwd_ms"] * 1e-3) / n / 1e12
      row["ring_fwd_bwd_tflops_per_device"] = 3.5 * flops_fwd / (row["ring_fwd_bwd_ms"] * 1e-3) / n / 1e12
      rows.append(row)
      print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True)
      del q, k, v
  return rows


def markdown(env, checks, times) -> str:
  lines = [f"# Multi-device attention: {env['devices']} x {env['device_kind']}", "",
           f"jax {env['jax']}, fa3_jax {env['fa3_jax']}, kernels: {env['kernels']}, {env['date']}", "",
           "## Correctness (sharded vs one device, max relative error over out, dq, dk, dv)", "",
           "| check | max rel error | passed | fwd collectives | grad collectives |", "| --- | --- | --- | --- | --- |"]
  short = lambda c: ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"
  for r in checks:
    lines.append(f"| {r['check']} | {r['max_rel_error']:.2e} | {'yes' if r['passed'] else '**NO**'} | "
                 f"{short(r['fwd_collectives'])} | {short(r['grad_collectives'])} |")
  lines += ["", f"## Ring attention timing (batch {env['batch']}, heads {env['heads']}/{env['kv_heads']}, "
            f"head_dim {env['head_dim']}, {env['dtype']})", "",
            "| seqlen | causal (layout) | ring fwd ms | 1-dev fwd ms | speedup | ring fwd+bwd ms | 1-dev fwd+bwd ms "
            "| speedup | TFLOP/s/device fwd | fwd+bwd |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  f = lambda r, k, fmt=".1f": format(r[k], fmt) if k in r else "-"
  for r in times:
    lines.append(f"| {r['seqlen']} | {r['causal']} ({r['layout']}) | {f(r, 'ring_fwd_ms')} | {f(r, 'single_fwd_ms')} | "
                 f"{f(r, 'speedup_fwd', '.2f')} | {f(r, 'ring_fwd_bwd_ms')} | {f(r, 'single_fwd_bwd_ms')} | "
                 f"{f(r, 'speedup_fwd_bwd', '.2f')} | {f(r, 'ring_fwd_tflops_per_device')} | "
                 f"{f(r, 'ring_fwd_bwd_tflops_per_device')} |")
  return "\n".join(lines) + "\n"


def main(args) -> int:
  cpu = bool(args.cpu_devices)
  heads = args.heads or (2 if cpu else 16)
  cfg = dict(dtype=jnp.float16 if cpu else jnp.bfloat16, batch=args.batch, heads=heads,
             kv_heads=args.kv_heads or heads, head_dim=args.head_dim or (32 if cpu else 128),
             iters=args.iters or (2 if cpu else 10), skip_single=args.skip_single,
             seqlens=[int(x) for x in (args.seqlens or ("128,256" if cpu else "32768,65536,131072")).split(",")],
             batch_check=2, seq_check=64 if cpu else 4096, tol=2e-2)
  devices = jax.devices()
  env = dict(devices=len(devices), device_kind=devices[0].device_kind, platform=devices[0].platform,
             jax=jax.__version__, fa3_jax=fa3_jax.__version__, date=time.strftime("%Y-%m-%d %H:%M"),
             kernels=fa3_jax.kernel_available(cfg["dtype"], cfg["head_dim"]), batch=cfg["batch"], heads=heads,
             kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], dtype=np.dtype(cfg["dtype"]).name)
  checks = correctness(cfg)
  times = timing(cfg)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "multi_gpu.json"), "w") as fh:
    json.dump(dict(env=env, config={k: (np.dtype(v).name if k == "dtype" else v) for k, v in cfg.items()},
                   correctness=checks, timing=times), fh, indent=1)
  md = markdown(env, checks, times)
  with open(os.path.join(args.out, "multi_gpu.md"), "w") as fh:
    fh.write(md)
  print(md)
  return 0 if all(r["passed"] for r in checks) else 1


if __name__ == "__main__":
  if ARGS.cpu_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", ARGS.cpu_devices)
  sys.exit(main(ARGS))
