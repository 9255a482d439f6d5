"""Variable-length (packed) attention benchmark: ours (fa3_jax.flash_attn_varlen_func) vs FlashAttention-3's own
varlen kernels (flash_attn3_jax.flash_mha_varlen) and cuDNN / XLA (jax.nn.dot_product_attention on the padded batch
with query_seq_lengths / key_value_seq_lengths), all in one run on one GPU.

Document mixes (lengths are printed and stored in results.json):
  a  16384 tokens in 12 documents, lognormal lengths (sigma 1.5, seed 0; each >= 1, summing exactly to 16384)
  b  64 documents, lengths uniform in 32..512 (seed 0)
d=128, 16 heads (MHA), bf16, causal and non-causal (within each document), forward and backward (timed as
(forward + backward) - forward). TFLOP/s counts useful work only: the sum over the documents of the FlashAttention
per-sequence FLOPs (fa3_jax.benchmark.varlen_attention_flops; causal counts half), so padding and cross-document
pairs count nothing. Median of repeats of back-to-back calls on random normal bf16 inputs; packing, padding and
unpadding happen outside the timed region. Every implementation's forward output is also compared with a float32
per-document reference (max_abs_error; --no-check skips it).

  python benchmarks/bench_varlen.py --out benchmarks/results/varlen_h200

writes results.json, results.md (a table per mix) and varlen.png into --out. `--quick` runs tiny mixes (CPU smoke
test: there fa3_jax runs its reference path and the GPU-only peers are reported as skipped). The segment-id path
(fa3_jax_segment_ids: the documents as one row with per-token document ids, default max_segments;
fa3_jax_segment_ids_bounded: max_segments = the document count) runs the same documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import fa3_jax
from fa3_jax import benchmark

HEADS = 16
HEAD_DIM = 128
SEED = 0
LOGNORMAL_SIGMA = 1.5
CHECK_TOLERANCE = 0.05  # max |out - float32 reference| of a correct bf16 kernel is ~1e-2 here; a wrong mask is O(1)
DIRECTIONS = ("fwd", "bwd")
SETTINGS = tuple((causal, direction) for causal in (False, True) for direction in DIRECTIONS)


# ---- document mixes ------------------------------------------------------------------------------------------------

def lognormal_lengths(total: int, documents: int, sigma: float, seed: int) -> list[int]:
  """`documents` lengths >= 1 summing exactly to `total`, proportional to lognormal(0, sigma) draws (largest
  remainders round up)."""
  if not 1 <= documents <= total:
    raise ValueError(f"need 1 <= documents <= total, got {documents} documents for {total} tokens")
  weights = np.random.default_rng(seed).lognormal(0.0, sigma, documents)
  share = weights / weights.sum() * (total - documents)
  lengths = 1 + np.floor(share).astype(np.int64)
  order = np.argsort(-(share - np.floor(share)), kind="stable")
  lengths[order[:total - int(lengths.sum())]] += 1
  return [int(x) for x in lengths]


def uniform_lengths(documents: int, low: int, high: int, seed: int) -> list[int]:
  """`documents` lengths uniform in low..high (inclusive)."""
  return [int(x) for x in np.random.default_rng(seed).integers(low, high + 1, documents)]


@dataclasses.dataclass(frozen=True)
class Mix:
  name: str
  description: str
  lengths: tuple[int, ...]


def mixes(quick: bool = False, seed: int = SEED) -> dict[str, Mix]:
  if quick:
    specs = {"a": (f"192 tokens in 4 documents, lognormal lengths (sigma {LOGNORMAL_SIGMA}, seed {seed})",
                   lognormal_lengths(192, 4, LOGNORMAL_SIGMA, seed)),
             "b": (f"6 documents, lengths uniform in 8..32 (seed {seed})", uniform_lengths(6, 8, 32, seed))}
  else:
    specs = {"a": (f"16384 tokens in 12 documents, lognormal lengths (sigma {LOGNORMAL_SIGMA}, seed {seed})",
                   lognormal_lengths(16384, 12, LOGNORMAL_SIGMA, seed)),
             "b": (f"64 documents, lengths uniform in 32..512 (seed {seed})", uniform_lengths(64, 32, 512, seed))}
  return {name: Mix(name, description, tuple(lengths)) for name, (description, lengths) in specs.items()}


@dataclasses.dataclass(frozen=True)
class Packing:
  """Where a mix's documents lie in the packed (total, ...) and padded (batch, max_seqlen, ...) layouts."""
  lengths: tuple[int, ...]

  @property
  def batch(self) -> int:
    return len(self.lengths)

  @property
  def total(self) -> int:
    return sum(self.lengths)

  @property
  def max_seqlen(self) -> int:
    return max(self.lengths)

  def cu_seqlens(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)

  def padded_rows(self) -> np.ndarray:
    """For each packed token, its row in the padded batch flattened to (batch * max_seqlen, ...)."""
    return np.concatenate([b * self.max_seqlen + np.arange(s) for b, s in enumerate(self.lengths)])

  def segment_ids(self) -> np.ndarray:
    return np.repeat(np.arange(self.batch, dtype=np.int32), self.lengths)


# ---- implementations -----------------------------------------------------------------------------------------------
# A factory(packing, heads, head_dim, causal) returns Runner(attention, layout) or raises Unavailable(reason).
# attention(q, k, v, *extras) takes the layout's arrays:
#   packed       q (total, heads, d), k / v (total, kv_heads, d); extras (cu_seqlens int32 (batch + 1,),)
#   padded       q (batch, max_seqlen, heads, d), ...; extras (lengths int32 (batch,),)
#   segment_ids  q (1, total, heads, d), ...; extras (segment ids int32 (1, total),)

class Unavailable(Exception):
  """This implementation cannot run here (not installed, no GPU, not written yet): reported as skipped."""


@dataclasses.dataclass(frozen=True)
class Runner:
  attention: Callable
  layout: str


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _fa3_jax(packing, heads, head_dim, causal):
  varlen = getattr(fa3_jax, "flash_attn_varlen_func", None)
  if varlen is None:
    raise Unavailable("fa3_jax.flash_attn_varlen_func does not exist in this checkout yet")
  if _on_gpu() and not all(fa3_jax.kernel_available(jnp.bfloat16, head_dim, direction=d) for d in DIRECTIONS):
    # Timing the pure-JAX reference path as "fa3_jax" on a GPU would be a wrong number.
    raise Unavailable(f"no compiled bf16 head dim {head_dim} kernels in this build (would time the reference path)")
  max_seqlen = packing.max_seqlen

  def attention(q, k, v, cu_seqlens):
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal)
  return Runner(attention, "packed")


def _flash_attn3_jax(packing, heads, head_dim, causal):
  if not _on_gpu():
    raise Unavailable("FlashAttention-3's kernels need a CUDA GPU")
  try:
    import flash_attn3_jax  # optional peer: FlashAttention-3's own kernels wrapped for JAX
    head_dims = benchmark.flash_attn3_jax_head_dims()
  except ImportError as e:
    raise Unavailable(f"flash_attn3_jax is not installed ({e})") from e
  if head_dim not in head_dims:
    # The wheel would run a larger head dim's kernels on zero-padded inputs: not FA3's number for this head dim.
    raise Unavailable(f"this flash_attn3_jax build has kernels for head dims {sorted(head_dims)} only")
  max_seqlen = packing.max_seqlen

  def attention(q, k, v, cu_seqlens):
    return flash_attn3_jax.flash_mha_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=max_seqlen,
                                            max_seqlen_k=max_seqlen, is_causal=causal)
  return Runner(attention, "packed")


def _jax_nn_padded(implementation):
  def factory(packing, heads, head_dim, causal):
    if implementation == "cudnn" and not _on_gpu():
      raise Unavailable("cuDNN needs a CUDA GPU")

    def attention(q, k, v, lengths):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                          key_value_seq_lengths=lengths, implementation=implementation)
    return Runner(attention, "padded")
  return factory


def _fa3_jax_segment_ids(bounded: bool):
  """Our segment-id path: the documents as one row of batch 1 with per-token document ids (flash_attn_func's
  q_segment_ids), causal within each document. max_segments is the default bound (the row's length: every row
  layout is valid) or, bounded, the mix's document count (what a caller who knows its packer's bound passes)."""
  def factory(packing, heads, head_dim, causal):
    max_segments = packing.batch if bounded else None

    def attention(q, k, v, segment_ids):
      return fa3_jax.flash_attn_func(q, k, v, causal=causal, q_segment_ids=segment_ids, max_segments=max_segments)
    return Runner(attention, "segment_ids")
  return factory


IMPLEMENTATIONS: dict[str, Callable[..., Runner]] = {
    "fa3_jax": _fa3_jax,
    "flash_attn3_jax": _flash_attn3_jax,
    "cudnn": _jax_nn_padded("cudnn"),
    "xla": _jax_nn_padded("xla"),
    "fa3_jax_segment_ids": _fa3_jax_segment_ids(bounded=False),
    "fa3_jax_segment_ids_bounded": _fa3_jax_segment_ids(bounded=True),
}
DEFAULT_IMPLEMENTATIONS = ("fa3_jax", "fa3_jax_segment_ids", "fa3_jax_segment_ids_bounded", "flash_attn3_jax", "cudnn",
                           "xla")


# ---- inputs, reference, measurement --------------------------------------------------------------------------------

class Inputs:
  """One mix's random normal q, k, v, dout in every layout (the padded batch is drawn, padding included, so that no
  layout has zeros; the packed arrays are its valid rows), made once, outside the timed region."""

  def __init__(self, packing: Packing, heads: int, head_dim: int, dtype, seed: int):
    self.packing = packing
    shape = (packing.batch, packing.max_seqlen, heads, head_dim)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    self.padded = tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    self._rows = jnp.asarray(packing.padded_rows())
    self.packed = tuple(self.to_packed(x, "padded") for x in self.padded)
    self._layouts = {}

  def to_packed(self, x, layout: str):
    """An array of `layout` ((batch, max_seqlen, ...) padded, (1, total, ...) segment_ids) as (total, ...)."""
    if layout == "padded":
      return jnp.take(x.reshape(-1, *x.shape[2:]), self._rows, axis=0)
    return x[0] if layout == "segment_ids" else x

  def layout(self, layout: str):
    """((q, k, v), dout, extras) in `layout`."""
    if layout not in self._layouts:
      p = self.packing
      if layout == "packed":
        arrays, extras = self.packed, (jnp.asarray(p.cu_seqlens()),)
      elif layout == "padded":
        arrays, extras = self.padded, (jnp.asarray(p.lengths, jnp.int32),)
      elif layout == "segment_ids":
        arrays, extras = tuple(x[None] for x in self.packed), (jnp.asarray(p.segment_ids())[None],)
      else:
        raise ValueError(f"unknown layout {layout!r}")
      self._layouts[layout] = (arrays[:3], arrays[3], extras)
    return self._layouts[layout]


def reference_output(inputs: Inputs, causal: bool) -> np.ndarray:
  """float32 attention of each document on its own (NumPy, on the host), packed (total, heads, head_dim)."""
  q, k, v = (np.asarray(x.astype(jnp.float32)) for x in inputs.packed[:3])
  out = np.empty_like(q)
  scale = 1.0 / np.sqrt(q.shape[-1])
  for start, end in zip(inputs.packing.cu_seqlens()[:-1], inputs.packing.cu_seqlens()[1:]):
    visible = np.tril(np.ones((end - start,) * 2, bool)) if causal else None
    for h in range(q.shape[1]):  # one head at a time: the largest document's scores stay a few hundred MB
      scores = q[start:end, h] @ k[start:end, h].T * scale
      if causal:
        scores = np.where(visible, scores, -np.inf)
      p = np.exp(scores - scores.max(axis=-1, keepdims=True))
      out[start:end, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[start:end, h]
  return out


@dataclasses.dataclass
class Measurement:
  implementation: str
  mix: str
  documents: int
  tokens: int
  max_seqlen: int
  heads: int
  head_dim: int
  causal: bool
  fwd_ms: float | None = None
  bwd_ms: float | None = None
  fwd_tflops: float | None = None
  bwd_tflops: float | None = None
  max_abs_error: float | None = None  # forward output vs the float32 per-document reference
  skipped: str | None = None
  error: str | None = None

  def tflops(self, direction: str) -> float | None:
    return getattr(self, f"{direction}_tflops")

  def ms(self, direction: str) -> float | None:
    return getattr(self, f"{direction}_ms")


def measure(name: str, factory: Callable[..., Runner], mix: Mix, inputs: Inputs, heads: int, head_dim: int,
            causal: bool, reference: np.ndarray | None, backward: bool = True, calls: int = 20,
            repeats: int = 5) -> Measurement:
  packing = inputs.packing
  m = Measurement(name, mix.name, packing.batch, packing.total, packing.max_seqlen, heads, head_dim, causal)
  try:
    runner = factory(packing, heads, head_dim, causal)
  except Unavailable as e:
    m.skipped = str(e)
    return m
  except Exception as e:  # a factory that fails otherwise (bad arguments for it): reported, not fatal
    m.error = benchmark.error_summary(e)
    return m
  try:
    (q, k, v), dout, extras = inputs.layout(runner.layout)
    if reference is not None:
      out = inputs.to_packed(jax.jit(runner.attention)(q, k, v, *extras), runner.layout)
      m.max_abs_error = float(np.max(np.abs(np.asarray(out.astype(jnp.float32)) - reference)))
    t_fwd, t_bwd = benchmark.forward_backward_seconds(runner.attention, (q, k, v), dout if backward else None,
                                                      extras, calls=calls, repeats=repeats)
  except Exception as e:  # an implementation that cannot run a mix (memory, unsupported) is reported, not fatal
    m.error = benchmark.error_summary(e)
    return m
  flops = lambda direction: benchmark.varlen_attention_flops(mix.lengths, heads, head_dim, causal, direction)
  m.fwd_ms, m.fwd_tflops = t_fwd * 1e3, flops("fwd") / t_fwd / 1e12
  if t_bwd is not None:
    m.bwd_ms, m.bwd_tflops = t_bwd * 1e3, flops("bwd") / t_bwd / 1e12
  return m


# ---- output --------------------------------------------------------------------------------------------------------

def _setting(causal: bool, direction: str) -> str:
  return f"{'causal' if causal else 'non-causal'} {direction}"


def _cell(r: Measurement | None, direction: str) -> str:
  if r is None:
    return "—"
  if r.skipped is not None:
    return "skipped"
  if r.error is not None:
    return "error"
  value, ms = r.tflops(direction), r.ms(direction)
  if value is None:
    return "—"
  wrong = "†" if r.max_abs_error is not None and r.max_abs_error > CHECK_TOLERANCE else ""
  return f"{value:.0f}{wrong} ({ms:.3g} ms)" if value >= 10 else f"{value:.2g}{wrong} ({ms:.3g} ms)"


def markdown(results: list[Measurement], impls: list[str], mix_info: dict[str, Mix]) -> str:
  lines = []
  for mix in mix_info.values():
    rows = [r for r in results if r.mix == mix.name]
    if not rows:
      continue
    lengths = ", ".join(map(str, mix.lengths))
    lines.append(f"\n**mix {mix.name}: {mix.description}**: {sum(mix.lengths)} tokens, max length "
                 f"{max(mix.lengths)}; TFLOP/s of useful work (forward / backward time)\n")
    lines.append(f"lengths: {lengths}\n")
    lines.append("| implementation | " + " | ".join(_setting(c, d) for c, d in SETTINGS) + " |")
    lines.append("| --- |" + " --- |" * len(SETTINGS))
    notes = {}
    for impl in impls:
      cells = []
      for causal, direction in SETTINGS:
        r = next((r for r in rows if r.implementation == impl and r.causal == causal), None)
        cells.append(_cell(r, direction))
        if r is not None and (r.skipped or r.error):
          notes.setdefault(f"{impl}: {'skipped' if r.skipped else 'error'}: {r.skipped or r.error}", None)
        elif r is not None and r.max_abs_error is not None and r.max_abs_error > CHECK_TOLERANCE:
          notes.setdefault(f"{impl} {'causal' if causal else 'non-causal'}: † forward output differs from the "
                           f"float32 reference by {r.max_abs_error:.3g} > {CHECK_TOLERANCE}", None)
      lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    if notes:
      lines.append("")
      lines += [f"- {note}" for note in notes]
  return "\n".join(lines) + "\n"


def plot(results: list[Measurement], impls: list[str], mix_info: dict[str, Mix], path: pathlib.Path, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ran = [impl for impl in impls if any(r.implementation == impl and r.tflops(d) is not None
                                       for r in results for d in DIRECTIONS)]  # skipped ones get no empty bars
  fig, axes = plt.subplots(1, len(mix_info), figsize=(6.5 * len(mix_info), 4.5), squeeze=False)
  width = 0.8 / max(1, len(ran))
  for ax, mix in zip(axes[0], mix_info.values()):
    for i, impl in enumerate(ran):
      values = []
      for causal, direction in SETTINGS:
        r = next((r for r in results if r.mix == mix.name and r.implementation == impl and r.causal == causal), None)
        values.append(np.nan if r is None or r.tflops(direction) is None else r.tflops(direction))
      bars = ax.bar(np.arange(len(SETTINGS)) + (i - (len(ran) - 1) / 2) * width, values, width, label=impl)
      ax.bar_label(bars, ["" if np.isnan(x) else f"{x:.0f}" if x >= 10 else f"{x:.2g}" for x in values],
                   fontsize=7)
    ax.set_xticks(np.arange(len(SETTINGS)), [_setting(c, d) for c, d in SETTINGS])
    ax.set_ylabel("TFLOP/s (useful work)")
    ax.set_title(f"mix {mix.name}: {len(mix.lengths)} docs, {sum(mix.lengths)} tokens, max {max(mix.lengths)}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  if ran:
    axes[0][0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _peer_versions() -> dict[str, str]:
  versions = {"fa3_jax": fa3_jax.__version__}
  try:
    import flash_attn3_jax
    versions["flash_attn3_jax"] = flash_attn3_jax.__version__
  except Exception:  # not installed, or its extension does not load here
    pass
  return versions


def _show(x, fmt=None):
  if x is None:
    return "—"
  return format(x, fmt) if fmt else f"{x:7.1f}" if x >= 10 else f"{x:7.2g}"  # default: TFLOP/s, also tiny CPU ones


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--implementations", nargs="+", default=list(DEFAULT_IMPLEMENTATIONS),
                      choices=list(IMPLEMENTATIONS), metavar="NAME",
                      help=f"subset of: {' '.join(IMPLEMENTATIONS)} (default: {' '.join(DEFAULT_IMPLEMENTATIONS)}; "
                           "those that cannot run here are reported as skipped)")
  parser.add_argument("--mixes", nargs="+", default=["a", "b"], choices=["a", "b"])
  parser.add_argument("--heads", type=int, default=HEADS)
  parser.add_argument("--head-dim", type=int, default=HEAD_DIM)
  parser.add_argument("--seed", type=int, default=SEED, help="seed of the document lengths and of the inputs")
  parser.add_argument("--no-backward", action="store_true")
  parser.add_argument("--no-check", action="store_true", help="skip the comparison with a float32 reference")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny mixes for a CPU smoke test")
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args(argv)

  heads, calls, repeats = args.heads, args.calls, args.repeats
  if args.quick:
    heads, calls, repeats = 2, 2, 2
  mix_info = {name: mix for name, mix in mixes(args.quick, args.seed).items() if name in args.mixes}
  impls = list(dict.fromkeys(args.implementations))
  args.out.mkdir(parents=True, exist_ok=True)
  device = jax.devices()[0].device_kind
  print(f"{device}, jax {jax.__version__}, heads {heads}, head dim {args.head_dim}, bf16", flush=True)
  for mix in mix_info.values():
    print(f"mix {mix.name}: {mix.description}: {len(mix.lengths)} documents, {sum(mix.lengths)} tokens, "
          f"max {max(mix.lengths)}; lengths {list(mix.lengths)}", flush=True)

  results = []
  for mix in mix_info.values():
    inputs = Inputs(Packing(mix.lengths), heads, args.head_dim, jnp.bfloat16, args.seed)
    for causal in (False, True):
      reference = None if args.no_check else reference_output(inputs, causal)
      for name in impls:
        r = measure(name, IMPLEMENTATIONS[name], mix, inputs, heads, args.head_dim, causal, reference,
                    backward=not args.no_backward, calls=calls, repeats=repeats)
        results.append(r)
        line = f"mix {mix.name} causal={causal!s:5} {name:20s} "
        if r.skipped or r.error:
          line += f"skipped: {r.skipped}" if r.skipped else f"error: {r.error}"
        else:
          line += (f"fwd {_show(r.fwd_tflops)} TFLOP/s {_show(r.fwd_ms, '8.3f')} ms  bwd {_show(r.bwd_tflops)} "
                   f"TFLOP/s {_show(r.bwd_ms, '8.3f')} ms  max|out - ref| {_show(r.max_abs_error, '.2g')}")
        print(line, flush=True)
    del inputs

  meta = dict(date=datetime.date.today().isoformat(), device=device, jax=jax.__version__, versions=_peer_versions(),
              command=" ".join([pathlib.Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              heads=heads, head_dim=args.head_dim, dtype="bfloat16", calls=calls, repeats=repeats, seed=args.seed,
              check_tolerance=None if args.no_check else CHECK_TOLERANCE,
              mixes={m.name: dict(description=m.description, lengths=list(m.lengths)) for m in mix_info.values()})
  (args.out / "results.json").write_text(json.dumps(
      dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
  table = markdown(results, impls, mix_info)
  (args.out / "results.md").write_text(f"{meta['date']}, {device}, jax {meta['jax']}, {heads} heads, head dim "
                                       f"{args.head_dim}, bf16: `{meta['command']}`\n{table}")
  plot(results, impls, mix_info, args.out / "varlen.png",
       f"varlen attention, {heads} heads, head dim {args.head_dim}, bf16 ({device})")
  print(table)


if __name__ == "__main__":
  main()
