"""Helpers for checking attention kernels the way FlashAttention-3 does (docs/kernels.md §9.1); used by our GPU tests
and the self-check of `python -m fa3_jax`, and usable by anyone comparing an attention implementation with the
reference.

The rule: an implementation passes if its error against the float32 reference is at most `rtol` times the error of
a plain same-precision implementation (`same_precision_attention`) plus `atol`, the output dtype's rounding noise.

One check (`KernelCase`) is one XLA program: flash_attn_func's forward and backward (flash_attn_varlen_func's for a
`Packing`), the float32 reference's and the same-precision baseline's, computed together (`compile_check`), then
judged on the host (`run_check`). Compiling is what a check costs, so callers with many checks compile them in
parallel; `check_kernel` does both steps.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from fa3_jax import reference
from fa3_jax._config import AttentionConfig
from fa3_jax._config import SequenceLayout
from fa3_jax._config import visible

# XLA's GEMM autotuning would only speed up the reference's and the baseline's matmuls (the kernels are custom calls)
# and costs seconds per compilation, so checks compile without it. Never for timing: XLA's own attention needs it.
CHECK_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}


def extension_problem() -> str | None:
  """Why the CUDA extension is not loaded in this process, or None if it is. Its ImportError alone does not say
  whether the build skipped CUDA (the build records why in fa3_jax/_build_config.py) or the source tree shadows an
  install."""
  from fa3_jax import _extension
  if _extension.module is not None:
    return None
  try:
    from fa3_jax import _build_config
  except ImportError:
    return (f"fa3_jax is imported from the source tree {pathlib.Path(_extension.__file__).parent}, which holds no "
            "build (it hides an installed fa3_jax; `pip install --no-build-isolation -e .` serves it with its build)")
  if not _build_config.cuda_extension:
    return f"this install was built without the CUDA extension ({_build_config.reason})"
  return f"the CUDA extension was built but does not import ({_extension.import_error})"


def kernel_problem() -> str | None:
  """Why our kernels cannot run in this process (no GPU, a GPU other than Hopper, or no CUDA extension), or None
  if they can."""
  gpus = [d for d in jax.devices() if d.platform == "gpu"]
  if not gpus:
    return f"no GPU visible to JAX (backend {jax.default_backend()}): the kernels need a Hopper GPU"
  others = sorted({f"{d.device_kind} (compute capability {getattr(d, 'compute_capability', 'unknown')})"
                   for d in gpus if getattr(d, "compute_capability", None) != "9.0"})
  if others:
    return f"the kernels need a Hopper GPU (compute capability 9.0), found {', '.join(others)}"
  problem = extension_problem()
  return None if problem is None else f"this Hopper GPU has no kernels to run: {problem}"


def same_precision_attention(q, k, v, cfg: AttentionConfig, sequences: SequenceLayout = SequenceLayout(),
                             sinks=None):
  """Dense attention computed in the input precision (FA3's `pt` baseline): the softmax scale is applied to K, the
  scores, probabilities and output are rounded to the input dtype after each step. q, k, v are BSHD, or packed where
  `sequences` says so (each sequence is padded to its side's max_seqlen, as the reference does); sinks (h,) float32
  join each row's softmax as a column of their own. Returns out in q's layout: (b, s_q, h, d_v) or (total_q, h,
  d_v)."""
  pq, pk = reference.paddings(sequences, q, k)
  q, k, v = pq.pad(q), pk.pad(k), pk.pad(v)
  dtype = q.dtype
  b, sq, h, _ = q.shape
  sk, hk = k.shape[1], k.shape[2]
  k = jnp.repeat(k, h // hk, axis=2)
  v = jnp.repeat(v, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, (k * cfg.softmax_scale).astype(dtype),
                 preferred_element_type=jnp.float32).astype(dtype)
  if cfg.softcap > 0:
    s = (cfg.softcap * jnp.tanh(s.astype(jnp.float32) / cfg.softcap)).astype(dtype)
  lengths = lambda n, seqlen: seqlen if n is None else n[:, None, None, None]  # per batch, against (b, h, s_q, s_k)
  attend = visible(jnp.arange(sq)[:, None], jnp.arange(sk)[None, :], lengths(pq.lengths, sq), lengths(pk.lengths, sk),
                   cfg)
  s = jnp.where(attend, s.astype(jnp.float32), -jnp.inf)
  if sinks is None:
    p = jax.nn.softmax(s, axis=-1)
  else:
    sink = jnp.broadcast_to(sinks[None, :, None, None], (*s.shape[:-1], 1))
    p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
  p = jnp.where(attend.any(axis=-1, keepdims=True), p, 0.0).astype(dtype)
  return pq.unpad(jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(dtype), 0)


# The cross-device operations of compiled HLO text: a sharded call that needs no communication has none of them.
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


def collectives(hlo: str) -> dict[str, int]:
  """How often each of COLLECTIVES (or its async -start form) occurs in compiled HLO text."""
  return {c: len(re.findall(rf"\b{c}(-start)?\(", hlo)) for c in COLLECTIVES}


def fa3_tolerance(ref, pt, dtype, rtol: float, extra_atol: float = 0.0) -> float:
  """rtol * max|pt - ref| + atol with atol = 2 * the dtype's rounding noise near 0.3 (+ extra_atol)."""
  ref = np.asarray(ref, np.float32)
  # Each step computed in float32 and rounded to dtype, as PyTorch does (JAX would first round 0.3 itself to dtype,
  # which makes the noise vanish wherever ref is exactly 0).
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
  noise = rounded(rounded(rounded(ref) + np.float32(0.3)) - np.float32(0.3)) - rounded(ref)
  atol = 2.0 * float(np.max(np.abs(noise), initial=0.0)) + extra_atol
  return rtol * float(np.max(np.abs(np.asarray(pt, np.float32) - ref), initial=0.0)) + atol


def fa3_check(name: str, out, ref, pt, *, softcap: bool, gradient: bool = False) -> tuple[bool, str]:
  """(passed, message) for `out` against `ref` under the FA3 rule: rtol 2 (3 with softcap); gradients get
  3e-4 more atol with softcap. NaN never passes."""
  rtol = 3.0 if softcap else 2.0
  extra = 3e-4 if (gradient and softcap) else 0.0
  out32 = np.asarray(jnp.asarray(out).astype(jnp.float32))
  err = float(np.max(np.abs(out32 - np.asarray(ref, np.float32)), initial=0.0))
  tol = fa3_tolerance(ref, pt, jnp.asarray(out).dtype, rtol, extra)
  passed = bool(np.isfinite(out32).all()) and err <= tol
  return passed, f"{name}: max error {err:.3e} vs allowed {tol:.3e}"


def _poison_device_memory(nbytes: int) -> None:
  """Fill about nbytes of freed device memory with NaN, so that a kernel's unwritten output elements (which XLA
  allocates from that memory next) show up as NaN instead of stale plausible values."""
  # A power of two: one compiled fill serves many checks.
  n = 1 << (max(nbytes // 4, 1) - 1).bit_length()
  jax.block_until_ready(jnp.full((n,), jnp.nan, jnp.float32)).delete()


@dataclasses.dataclass(frozen=True)
class Packing:
  """The sequences of a variable-length check, back to back: sequence b is allotted lengths_q[b] query and
  lengths_k[b] key rows (cu_seqlens), of which the first used_q[b] / used_k[b] take part (seqused; None: all);
  extra_q / extra_k rows after the last sequence belong to none."""

  lengths_q: tuple[int, ...]
  lengths_k: tuple[int, ...]
  used_q: tuple[int, ...] | None = None
  used_k: tuple[int, ...] | None = None
  extra_q: int = 0
  extra_k: int = 0

  def rows(self, side: str) -> int:
    """Rows of side "q" or "k"'s tensors (total_q / total_k)."""
    return sum(getattr(self, f"lengths_{side}")) + getattr(self, f"extra_{side}")

  def cu_seqlens(self, side: str) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(getattr(self, f"lengths_{side}"))]).astype(np.int32)

  def seqused(self, side: str) -> np.ndarray | None:
    used = getattr(self, f"used_{side}")
    return None if used is None else np.asarray(used, np.int32)

  def describe(self) -> str:
    used = "".join(f", used {side} {u}" for side, u in (("q", self.used_q), ("k", self.used_k)) if u is not None)
    extra = f", {self.extra_q} / {self.extra_k} extra rows" if self.extra_q or self.extra_k else ""
    return f"sequences q {self.lengths_q} k {self.lengths_k}{used}{extra}"


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """One check: flash_attn_func's arguments and the input shapes q (batch, seqlen_q, heads, head_dim),
  k (batch, seqlen_k, kv_heads, head_dim), v (batch, seqlen_k, kv_heads, head_dim_v), dout like the output.
  backward=False checks out and lse only.

  With a packing, the check runs flash_attn_varlen_func on q (total_q, heads, head_dim), k, v (total_k, kv_heads,
  ...) packed as it says, with max_seqlen_q / max_seqlen_k = seqlen_q / seqlen_k (batch is then unused), and also
  checks that rows of no sequence get exactly 0 (out, dq, dk, dv) and lse -inf."""

  dtype: str  # "bfloat16" or "float16"
  head_dim: int
  head_dim_v: int
  seqlen_q: int
  seqlen_k: int
  batch: int = 2
  heads: int = 6
  kv_heads: int = 6
  causal: bool = False
  window_size: tuple[int, int] = (-1, -1)
  softcap: float = 0.0
  backward: bool = True
  deterministic: bool = False
  seed: int = 0
  packing: Packing | None = None
  sinks_scale: float = 0.0  # > 0: random normal sink logits of this scale
  attention_chunk: int = 0

  def attention_kwargs(self) -> dict:
    return dict(causal=self.causal, window_size=self.window_size, softcap=self.softcap,
                deterministic=self.deterministic, attention_chunk=self.attention_chunk)

  def describe(self) -> str:
    """One line, e.g. 'bfloat16 128x128 fwd+bwd causal, 2 x 113 x 239, heads 4 / kv 2'."""
    mask = [name for name, on in (("causal", self.causal),
                                  (f"window {self.window_size}", self.window_size != (-1, -1)),
                                  (f"softcap {self.softcap:g}", self.softcap > 0),
                                  (f"chunk {self.attention_chunk}", self.attention_chunk > 0),
                                  (f"sinks x{self.sinks_scale:g}", self.sinks_scale > 0)) if on]
    problem = (f"{self.batch} x {self.seqlen_q} x {self.seqlen_k}" if self.packing is None else
               f"{self.packing.describe()}, max {self.seqlen_q} x {self.seqlen_k}")
    return (f"{self.dtype} {self.head_dim}x{self.head_dim_v} {'fwd+bwd' if self.backward else 'fwd'} "
            f"{' + '.join(mask) or 'no mask'}, {problem}, heads {self.heads} / kv {self.kv_heads}")


def _shapes(case: KernelCase) -> tuple[tuple[int, ...], ...]:
  """Shapes of q, k, v, dout."""
  b, sq, sk, h, hk, d, dv = (case.batch, case.seqlen_q, case.seqlen_k, case.heads, case.kv_heads, case.head_dim,
                             case.head_dim_v)
  if case.packing is not None:
    tq, tk = case.packing.rows("q"), case.packing.rows("k")
    return (tq, h, d), (tk, hk, d), (tk, hk, dv), (tq, h, dv)
  return (b, sq, h, d), (b, sk, hk, d), (b, sk, hk, dv), (b, sq, h, dv)


def _sequences(case: KernelCase) -> SequenceLayout:
  """The sequence layout of the case's inputs (host arrays): its packing, or uniform (BSHD)."""
  p = case.packing
  if p is None:
    return SequenceLayout()
  return SequenceLayout(p.cu_seqlens("q"), p.cu_seqlens("k"), p.seqused("q"), p.seqused("k"),
                        max_seqlen_q=case.seqlen_q, max_seqlen_k=case.seqlen_k)


def _inputs(case: KernelCase):
  """Fresh random normal q, k, v, dout of case.dtype, and the sinks (float32, or None), as host arrays (generating
  them with JAX would compile a program per shape)."""
  rng = np.random.default_rng(case.seed)
  q, k, v, dout = (rng.standard_normal(shape, np.float32) for shape in _shapes(case))
  if case.softcap > 0:
    q = q * np.float32(case.softcap / 4)  # FA3's recipe: make the cap bite
  sinks = rng.standard_normal(case.heads).astype(np.float32) * case.sinks_scale if case.sinks_scale > 0 else None
  return (*(x.astype(jnp.dtype(case.dtype)) for x in (q, k, v, dout)), sinks)


def lower_check(case: KernelCase) -> jax.stages.Lowered:
  """The check as one program (q, k, v, dout, sequence layout) -> {"out": (ours, reference, baseline),
  "lse": (ours, reference), "dq" / "dk" / "dv": (ours, reference, baseline) with case.backward}, traced and lowered
  for the default backend."""
  from fa3_jax import _validate, attention, sinks as sinks_lib  # late: fa3_jax imports this module's siblings

  cfg = _validate.attention_config(case.head_dim, None, case.causal, case.window_size, case.softcap,
                                   case.deterministic, case.attention_chunk)
  kwargs = case.attention_kwargs()
  as_f32 = lambda *xs: [x.astype(jnp.float32) for x in xs]
  names = ("dq", "dk", "dv") + (("dsinks",) if case.sinks_scale > 0 else ())

  def program(q, k, v, dout, sinks, sequences):
    if case.packing is None:
      ours = lambda q, k, v, sinks: attention.flash_attn_func(q, k, v, return_lse=True, sinks=sinks, **kwargs)
    else:
      ours = lambda q, k, v, sinks: attention.flash_attn_varlen_func(
          q, k, v, sequences.cu_seqlens_q, sequences.cu_seqlens_k, sequences.max_seqlen_q, sequences.max_seqlen_k,
          sequences.seqused_q, sequences.seqused_k, return_lse=True, sinks=sinks, **kwargs)
    if case.backward:
      # lse as aux: it gets no cotangent, so the backward is the one every caller without return_lse gets.
      out, vjp, lse = jax.vjp(ours, q, k, v, sinks, has_aux=True)
      grads = vjp(dout)
    else:
      (out, lse), grads = ours(q, k, v, sinks), ()
    # Everything else reads its inputs through a barrier with our results, so it runs after our kernels: they write
    # into memory that, apart from their inputs, only the poisoning in run_check touched before.
    q, k, v, dout = jax.lax.optimization_barrier(((q, k, v, dout), (out, lse, grads)))[0]
    # The oracle: the blockwise reference on float32 copies of the same inputs, with its own blockwise backward
    # (memory linear in seqlen, cheap to compile), at full float32 matmul precision (JAX's default on GPUs is
    # TF32, whose 10-bit mantissa is no better than the fp16 kernel under test). Sinks join it as they join the
    # kernels' results (fa3_jax/sinks.py, checked against a dense oracle by the CPU tests).
    with jax.default_matmul_precision("highest"):
      ref_out, ref_lse = reference.varlen_forward(*as_f32(q, k, v), cfg, sequences)
      if sinks is not None:
        ref_out, ref_lse = sinks_lib.apply(ref_out, ref_lse, sinks)
      ref_grads = ()
      if case.backward:
        ref_grads = reference.varlen_backward(*as_f32(q, k, v), ref_out, ref_lse, dout.astype(jnp.float32), cfg,
                                              sequences)
        if sinks is not None:
          ref_grads = (*ref_grads, sinks_lib.gradient(dout, ref_out, ref_lse, None, sinks))
    baseline = lambda q, k, v, sinks: same_precision_attention(q, k, v, cfg, sequences, sinks)
    if case.backward:
      pt_out, pt_vjp = jax.vjp(baseline, q, k, v, sinks)
      pt_grads = pt_vjp(dout)
    else:
      pt_out, pt_grads = baseline(q, k, v, sinks), ()
    results = {"out": (out, ref_out, pt_out), "lse": (lse, ref_lse)}
    results.update(zip(names, zip(grads, ref_grads, pt_grads)))
    return results

  arrays = [jax.ShapeDtypeStruct(shape, jnp.dtype(case.dtype)) for shape in _shapes(case)]
  sinks = jax.ShapeDtypeStruct((case.heads,), jnp.float32) if case.sinks_scale > 0 else None
  return jax.jit(program).lower(*arrays, sinks, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             _sequences(case)))


def compile_check(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """Compiles a lowered check. XLA releases the GIL while it compiles, so calls from several threads overlap."""
  return lowered.compile(CHECK_COMPILER_OPTIONS)


def run_check(case: KernelCase, compiled: jax.stages.Compiled) -> list[tuple[bool, str]]:
  """Runs a compiled check of `case` on fresh inputs and judges out, lse (and dq, dk, dv) with the FA3 rule.
  Returns [(passed, message)]."""
  *tensors, sinks = _inputs(case)
  tensors, sinks = [jax.device_put(x) for x in tensors], None if sinks is None else jax.device_put(sinks)
  sequences = jax.device_put(_sequences(case))
  memory = compiled.memory_analysis()
  _poison_device_memory(memory.output_size_in_bytes + memory.temp_size_in_bytes)
  results = compiled(*tensors, sinks, sequences)
  softcap = case.softcap > 0
  judged = [fa3_check("out", *results["out"], softcap=softcap)]
  lse, ref_lse = (np.asarray(x) for x in results["lse"])
  same_inf = np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  finite = np.isfinite(lse) & np.isfinite(ref_lse)
  lse_err = float(np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0))
  judged.append((same_inf and lse_err <= 1e-3, f"lse: -inf rows match {same_inf}, max error {lse_err:.2e}"))
  judged += [fa3_check(name, *results[name], softcap=softcap, gradient=True)
             for name in ("dq", "dk", "dv", "dsinks") if name in results]
  if case.packing is not None:
    judged.append(_judge_uncovered_rows(case, results, sinks))
  return judged


def _uncovered(case: KernelCase, side: str) -> np.ndarray:
  """(rows,) bool: the rows of side "q" or "k" that belong to no sequence."""
  rows = case.packing.rows(side)
  offset, length = (np.asarray(x)[None, :] for x in _sequences(case).extents(side, rows))
  index = np.arange(rows)[:, None]
  return ~((index >= offset) & (index < offset + length)).any(axis=1)


def _judge_uncovered_rows(case: KernelCase, results, sinks) -> tuple[bool, str]:
  """Rows of no sequence: out and dq exactly 0 and lse -inf (the sink with sinks); key rows of no sequence: dk and
  dv exactly 0."""
  rows_q, rows_k = _uncovered(case, "q"), _uncovered(case, "k")
  ours = {name: np.asarray(results[name][0]) for name in ("out", "lse", "dq", "dk", "dv") if name in results}
  no_keys = -np.inf if sinks is None else np.asarray(sinks)[:, None]
  exact = [np.all(ours["out"][rows_q] == 0), np.all(ours["lse"][:, rows_q] == no_keys)]
  exact += [np.all(ours[name][rows] == 0) for name, rows in (("dq", rows_q), ("dk", rows_k), ("dv", rows_k))
            if name in ours]
  return bool(all(exact)), (f"uncovered rows: {int(rows_q.sum())} query rows and {int(rows_k.sum())} key rows "
                            f"exactly 0 / -inf: {all(exact)}")


def check_kernel(dtype, head_dim: int, head_dim_v: int, seqlen_q: int, seqlen_k: int, *, batch: int = 2,
                 heads: int = 6, kv_heads: int = 6, causal: bool = False, window_size=(-1, -1),
                 softcap: float = 0.0, backward: bool = True, deterministic: bool = False, seed: int = 0,
                 packing: Packing | None = None, sinks_scale: float = 0.0,
                 attention_chunk: int = 0) -> list[tuple[bool, str]]:
  """Runs flash_attn_func (the kernel, on a GPU build), or flash_attn_varlen_func with a packing (see KernelCase),
  and the float32 reference on fresh random inputs and checks out, lse and (with backward) dq, dk, dv with the FA3
  rule. Returns [(passed, message)]. sinks_scale > 0 adds random sinks of that scale (and checks their gradient);
  attention_chunk as flash_attn_func's."""
  case = KernelCase(jnp.dtype(dtype).name, head_dim, head_dim_v, seqlen_q, seqlen_k, batch=batch, heads=heads,
                    kv_heads=kv_heads, causal=causal, window_size=tuple(window_size), softcap=softcap,
                    backward=backward, deterministic=deterministic, seed=seed, packing=packing,
                    sinks_scale=sinks_scale, attention_chunk=attention_chunk)
  return run_check(case, compile_check(lower_check(case)))
