"""Timing attention implementations the FlashAttention way: used by `python -m fa3_jax` and benchmarks/.

FLOPs follow the FlashAttention papers: forward 4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when
causal; backward 2.5x forward; packed (variable-length) batches count each document on its own
(varlen_attention_flops). The backward is timed as (forward + backward) - forward (forward_backward_seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import fa3_jax


def attention_flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool, direction: str) -> float:
  fwd = 4.0 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
  return fwd * (2.5 if direction == "bwd" else 1.0)


def varlen_attention_flops(seqlens, heads: int, head_dim: int, causal: bool, direction: str) -> float:
  """Useful FLOPs of packed self-attention over documents of lengths `seqlens`: the sum of attention_flops over the
  documents, each attending within itself only (padding and cross-document pairs count nothing)."""
  return float(sum(attention_flops(1, int(s), heads, head_dim, causal, direction) for s in seqlens))


def _ours(q, k, v, causal):
  return fa3_jax.flash_attn_func(q, k, v, causal=causal)


def _jax_nn(implementation):
  def attention(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  return attention


def native_head_dims(library: pathlib.Path) -> frozenset[int]:
  """Head dims a FlashAttention-3 build has forward kernels for, read from its kernel names (flash_fwd_hdim<d>_...)."""
  return frozenset(int(d) for d in re.findall(rb"flash_fwd_hdim(\d+)_", library.read_bytes()))


def flash_attn3_jax_head_dims() -> frozenset[int]:
  """Head dims the installed flash_attn3_jax wheel has native kernels for (ImportError when it is not installed)."""
  import flash_attn3_jax_lib.flash_api as flash_api
  return native_head_dims(pathlib.Path(flash_api.__file__))


def _flash_attn3_jax():
  import flash_attn3_jax  # optional peer: FlashAttention-3's own kernels wrapped for JAX
  head_dims = flash_attn3_jax_head_dims()

  def attention(q, k, v, causal):
    if q.shape[-1] not in head_dims:
      # The wheel would run a larger head dim's kernels on zero-padded inputs: not FA3's number for this head dim.
      raise NotImplementedError(f"this flash_attn3_jax build has kernels for head dims {sorted(head_dims)} only")
    return flash_attn3_jax.flash_mha(q, k, v, is_causal=causal)
  return attention


def implementations(names=None) -> dict[str, Callable]:
  """name -> attention(q, k, v, causal) for every implementation usable here (peers only when installed / on GPU)."""
  on_gpu = jax.default_backend() == "gpu"
  found = {"fa3_jax": _ours, "xla": _jax_nn("xla")}
  if on_gpu:
    found["cudnn"] = _jax_nn("cudnn")
    try:
      found["flash_attn3_jax"] = _flash_attn3_jax()
    except ImportError:
      pass
  return {n: f for n, f in found.items() if names is None or n in names}


def _median_seconds(fn, args, calls: int, repeats: int) -> float:
  """Median over `repeats` of the mean time of `calls` back-to-back asynchronous calls (dispatch overlaps)."""
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def forward_backward_seconds(attention: Callable, args, dout=None, extra_args=(), calls: int = 20,
                             repeats: int = 5) -> tuple[float, float | None]:
  """(forward, backward) median seconds of jit(attention)(*args, *extra_args), differentiated in args only.

  The backward is timed as (forward + backward) - forward with cotangent dout; it is None without dout, and when
  timing noise is larger than the backward itself (tiny shapes). extra_args (e.g. sequence lengths) are traced
  operands that are not differentiated.
  """
  n = len(args)
  t_fwd = _median_seconds(jax.jit(attention), (*args, *extra_args), calls, repeats)
  if dout is None:
    return t_fwd, None

  def fwd_bwd(*operands):
    diff, rest, cotangent = operands[:n], operands[n:-1], operands[-1]
    return jax.vjp(lambda *d: attention(*d, *rest), *diff)[1](cotangent)
  t_bwd = _median_seconds(jax.jit(fwd_bwd), (*args, *extra_args, dout), calls, repeats) - t_fwd
  return t_fwd, (t_bwd if t_bwd > 0 else None)


def error_summary(e: BaseException) -> str:
  """One short line for an implementation that could not run a shape: 'Type: first line of the message'."""
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


@dataclasses.dataclass
class Measurement:
  implementation: str
  batch: int
  seqlen: int
  heads: int
  head_dim: int
  causal: bool
  fwd_ms: float | None
  bwd_ms: float | None
  fwd_tflops: float | None
  bwd_tflops: float | None
  error: str | None = None


def measure(name: str, attention: Callable, batch: int, seqlen: int, heads: int, head_dim: int, causal: bool,
            dtype=jnp.bfloat16, backward: bool = True, calls: int = 20, repeats: int = 5, seed: int = 0) -> Measurement:
  """Times one implementation on random normal inputs (never zeros: they run faster than real data)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, seqlen, heads, head_dim)
  q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
  flops = functools.partial(attention_flops, batch, seqlen, heads, head_dim, causal)
  try:
    t_fwd, t_bwd = forward_backward_seconds(functools.partial(attention, causal=causal), (q, k, v),
                                            dout if backward else None, calls=calls, repeats=repeats)
  except Exception as e:  # an implementation that cannot run a shape (memory, unsupported) is reported, not fatal
    return Measurement(name, batch, seqlen, heads, head_dim, causal, None, None, None, None, error=error_summary(e))
  return Measurement(name, batch, seqlen, heads, head_dim, causal, t_fwd * 1e3,
                     None if t_bwd is None else t_bwd * 1e3, flops("fwd") / t_fwd / 1e12,
                     None if t_bwd is None else flops("bwd") / t_bwd / 1e12)
